"""Merge methods: one pure tensor function plus frozen parameter records per method.

Importing this package registers every method (see :mod:`.base` for the contract).
"""

from __future__ import annotations

from mergeforge.methods import (  # noqa: F401  (imported to register their methods)
    ace,
    arcee_fusion,
    covariance,
    emr,
    fisher,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    ota,
    passthrough,
    prune,
    ram,
    regmean,
    sce,
    slerp,
    svd,
    task_arithmetic,
    ties,
    umtam,
    wudi,
)
from mergeforge.methods.base import Method, TensorContext, all_methods, get_method

__all__ = ["Method", "TensorContext", "all_methods", "get_method"]
