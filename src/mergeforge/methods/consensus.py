"""Sign consensus: TIES' ``elect_sign`` and ``disjoint_mean`` (2306.01708, §3).

Shapes: ``deltas`` is (N, *S), the N (weighted, sparsified) task vectors of one tensor of
shape S stacked; ``weights`` is (N, 1, …, 1) so that it broadcasts against ``deltas``.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def elect_sign_list(
    deltas: list[Tensor], method: str = "sum", weights: Sequence[Tensor] | None = None
) -> Tensor:
    """:func:`elect_sign` for a list of N tensors of shape S, without stacking them: returns
    a boolean S, True where the elected sign is +1 (a tied vote elects +1, as mergekit).

    ``weights`` (one tensor per model, broadcasting to S): each model's vote is weighted entry
    by entry, Σ_i w_i τ_i (``sum``) or Σ_i w_i sign(τ_i) (``count``; UMTAM's curvature-weighted
    vote with w_i = K_i). Without them the votes are as above, bit for bit."""
    if method not in ("sum", "count"):
        raise ValueError(f"unknown consensus method {method!r}: expected 'sum' or 'count'")
    if weights is not None:
        votes = (d if method == "sum" else torch.sign(d) for d in deltas)
        vote = None
        for v, w in zip(votes, weights, strict=True):
            vote = v * w if vote is None else vote.add_(v * w)
        assert vote is not None
        return vote >= 0
    if method == "sum":  # (d0 + d1) + d2 …: the same sums as clone-then-add, one pass fewer
        vote = torch.add(deltas[0], deltas[1]) if len(deltas) > 1 else deltas[0].clone()
        for d in deltas[2:]:
            vote.add_(d)
    else:
        vote = torch.sign(deltas[0])
        for d in deltas[1:]:
            vote.add_(torch.sign(d))
    return vote >= 0


def disjoint_sum(
    deltas: list[Tensor], weights: Sequence[float | Tensor], positive: Tensor
) -> tuple[Tensor, Tensor]:
    """The TIES disjoint step for a list of N weighted task vectors (each S), consuming them:
    returns (Σ_i [sign τ_i = γ] τ_i, Σ_i [sign τ_i = γ] w_i) with a zero divisor replaced by
    1 (mergekit). Zeros never agree. Same sums, in the same order, as :func:`disjoint_mean`.
    A weight may be a tensor broadcasting to S (UMTAM's per-entry curvature K_i, with the task
    vectors given as K_i ⊙ τ_i)."""
    gamma = positive.to(deltas[0].dtype).mul_(2).sub_(1)  # ±1
    merged = divisor = None
    for d, w in zip(deltas, weights, strict=True):
        agree = torch.mul(d, gamma).gt_(0)  # sign(d) == γ and d != 0
        d.mul_(agree)
        if isinstance(w, Tensor) or w != 1:  # agree·1 = agree: skipping it is exact
            agree.mul_(w)
        if merged is None:
            merged, divisor = d, agree
        else:
            merged.add_(d)
            divisor.add_(agree)
    assert merged is not None and divisor is not None
    divisor.masked_fill_(divisor == 0, 1.0)
    return merged, divisor
