"""Shared fixtures: tiny real-architecture checkpoints built from `transformers` configs
(tests/helpers.py builds them), and the ``mergekit`` marker: skip a comparison, not a module."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings as _hyp_settings

from tests.helpers import make_family, mergekit_missing

# CI: the same examples every run (a red CI must be reproducible, not a lottery)
_hyp_settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "mergekit: compares with mergekit (the reference from PyPI); skipped, with "
        "the reason, when mergekit is not importable",
    )  # fmt: skip


def pytest_runtest_setup(item):
    """Only a test that compares with mergekit needs it: skip that one test, not its module."""
    if item.get_closest_marker("mergekit") is not None:
        reason = mergekit_missing()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_families(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {arch: make_family(root, arch) for arch in ("llama", "gpt2", "bert")}


@pytest.fixture(scope="session")
def llama_family(tiny_families) -> dict:
    return tiny_families["llama"]
