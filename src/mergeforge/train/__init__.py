"""Merge-ready training: experts that carry what a curvature-aware merge or saliency pruning
needs (UMTAM, arXiv 2512.17109). Below the engine; it writes sidecars, never merges.

* :mod:`.artifact`: the curvature artifact (a ``curvature`` sidecar: R, C, optional S and Adam's
  ``exp_avg_sq`` per parameter) and :func:`saliency`, S = τ² ⊙ √(R ⊗ C) (the formula lives in
  :mod:`mergeforge.methods.curvature`, a floor below, where the merge methods read it too);
* :mod:`.optimizer`: :class:`UMTAM`, the merge-ready optimizer (low-rank momentum, factored
  curvature, AdamW for vectors) that exports the same artifact;
* :mod:`.recorder`: :class:`CurvatureRecorder`, R and C recorded beside any optimizer;
* :mod:`.callback`: :class:`CurvatureCallback`, the same for a ``transformers.Trainer`` (imported
  on first use: it loads the Trainer's machinery).
"""

from mergeforge.train.artifact import (
    VARIANTS,
    Curvature,
    CurvatureMeta,
    load_curvature,
    saliency,
    save_curvature,
)
from mergeforge.train.optimizer import UMTAM
from mergeforge.train.recorder import CurvatureRecorder

__all__ = [
    "VARIANTS",
    "Curvature",
    "CurvatureCallback",
    "CurvatureMeta",
    "CurvatureRecorder",
    "UMTAM",
    "load_curvature",
    "saliency",
    "save_curvature",
]


def __getattr__(name: str):
    if name == "CurvatureCallback":
        from mergeforge.train.callback import CurvatureCallback

        return CurvatureCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
