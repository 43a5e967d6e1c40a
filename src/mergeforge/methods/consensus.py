"""Sign consensus: TIES' ``elect_sign`` and ``disjoint_mean`` (2306.01708, §3).

Shapes: ``deltas`` is (N, *S), the N (weighted, sparsified) task vectors of one tensor of
shape S stacked; ``weights`` is (N, 1, …, 1) so that it broadcasts against ``deltas``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def elect_sign(deltas: Tensor, method: str = "sum", *, zero_sign: int = 1) -> Tensor:
    """The elected sign γ ∈ {−1, +1} of every entry, shape S.

    ``sum``: sign of Σ_i τ_i, the mass vote of the TIES paper (PEFT "total"); ``count``: sign
    of Σ_i sign(τ_i), one vote per model (PEFT "frequency"). A tied vote elects ``zero_sign``:
    +1 as in mergekit and PEFT; EMR's reference code uses −1.
    """
    if method == "sum":
        vote = deltas.sum(dim=0)
    elif method == "count":
        vote = deltas.sign().sum(dim=0)
    else:
        raise ValueError(f"unknown consensus method {method!r}: expected 'sum' or 'count'")
    positive = vote >= 0 if zero_sign > 0 else vote > 0
    return positive.to(deltas.dtype) * 2 - 1


def agrees(deltas: Tensor, sign: Tensor) -> Tensor:
    """Boolean (N, *S): τ_i is non-zero and has the elected sign (zeros never count)."""
    return deltas.sign() == sign


def disjoint_mean(
    deltas: Tensor, weights: Tensor, mask: Tensor | None = None, *, normalize: bool = True
) -> Tensor:
    """Merge N weighted task vectors (N, *S) into one (S), over the entries in ``mask``.

    With ``normalize``, divides by the sum of the weights of the entries that took part (the
    TIES disjoint mean; with weights 1 the mean over agreeing models); otherwise returns the
    (disjoint) sum. ``mask=None`` means every entry takes part (task arithmetic). A divisor of
    zero (no model agrees; weights cancelling) is replaced by 1, as mergekit does — the entry
    then keeps its sum, which is zero when nobody agreed.
    """
    if mask is None:
        total = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    else:
        mask = mask.to(deltas.dtype)
        total = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return total / divisor if normalize else total
