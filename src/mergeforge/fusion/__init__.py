"""Fusion of independently trained networks (ALGORITHMS.md §5): neuron-centric fusion (HF, KF,
KF-gradient) and the alignment baselines (averaging, last-layer KD, OT-Fusion, Git Re-Basin,
ZipIt!). Importing the package registers every method in :data:`FUSION_METHODS`."""

from mergeforge.fusion import baselines, kd, neuron, otfusion, rebasin, zipit  # noqa: F401 (registers)
from mergeforge.fusion.base import FUSION_METHODS, FusionData, FusionMethod, fuse, get_method

__all__ = ["FUSION_METHODS", "FusionData", "FusionMethod", "fuse", "get_method"]
