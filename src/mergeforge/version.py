"""The package version: one constant on the ground floor, so any module can record it (sidecar
metadata, model cards) without importing the package root and its public API."""

__version__ = "0.1.0"
