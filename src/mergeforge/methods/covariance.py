"""The covariance family: one primitive ``τ* = (Σ τ_i G_i)(Σ G_i)⁻¹`` per 2-D weight.

(Being written: WUDI, SWUDI, SWUDI-A, ACE gram sources and solvers.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def exact_solve(deltas: Sequence[Tensor], grams: Sequence[Tensor]) -> Tensor:
    """τ* = (Σ τ_i G_i)(Σ G_i)⁻¹ for task vectors τ_i (out, in) and symmetric PSD Grams
    G_i (in, in). Solved as a linear system (Cholesky/LU), falling back to the pseudo-inverse
    when Σ G_i is singular."""
    num = sum(d @ g for d, g in zip(deltas, grams, strict=True))
    den = sum(grams)
    try:  # X den = num  <=>  den X^T = num^T (den symmetric)
        return torch.linalg.solve(den, num.T).T
    except RuntimeError:  # singular: minimum-norm least squares
        return num @ torch.linalg.pinv(den, hermitian=True)
