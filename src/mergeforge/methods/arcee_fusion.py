"""Arcee Fusion: keep only the other model's changes whose importance is an outlier.

For the base θ₀ and one model θ₁ (same shape S; rows are the vectors of the last dimension, a
1-D tensor is one row):

* importance: I = |θ₁ − θ₀| ⊙ KL(softmax(θ₁) ‖ softmax(θ₀)) with the KL divergence of each row
  (softmax over the last dimension, 10⁻⁸ added to both distributions) broadcast over the row;
* dynamic threshold: τ = median(I) + 1.5·(Q₃ − Q₁), Tukey's outlier fence (quantiles as the
  sorted entry at index ⌊q·(n − 1)⌋);
* fusion: θ = θ₀ + (θ₁ − θ₀) ⊙ [I ≥ τ]. (When over ¾ of the scores are 0 — a row shifted by
  a constant has KL 0 — the fence is 0 and the other model is taken whole, as in mergekit.)

Arcee AI (mergekit's docs/merge_methods.md, "Arcee Fusion"; no paper); numerics as mergekit's
``arcee_fusion``, except that the
quantiles are always exact: mergekit estimates them from 10⁶ entries drawn at random (torch's
global RNG, unseeded) for tensors of more than 10⁶ entries, so its result there varies from run
to run; up to 10⁶ entries both are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mergeforge.methods.base import Method, NoParams, register

QUANTILES = (0.25, 0.5, 0.75)
KL_EPS = 1e-8


def importance(base: Tensor, other: Tensor) -> Tensor:
    """|θ₁ − θ₀| times the KL divergence of the rows' softmax distributions (shape S)."""
    p = F.softmax(other, dim=-1) + KL_EPS
    q = F.softmax(base, dim=-1) + KL_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (other - base).abs() * kl


def quantiles(x: Tensor, qs=QUANTILES) -> list[Tensor]:
    """Entries at sorted index ⌊q·(n − 1)⌋ of the flattened ``x``, by selection (O(n))."""
    flat = x.reshape(-1)
    n = flat.numel()
    return [torch.kthvalue(flat, int(q * (n - 1)) + 1).values for q in qs]


def fusion_threshold(scores: Tensor) -> Tensor:
    """Tukey's upper fence over the scores: median + 1.5·(Q₃ − Q₁)."""
    q1, median, q3 = quantiles(scores)
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base, tensors, params, model_params, ctx):
    other = tensors[0]
    if base.numel() == 0:
        return base.clone()
    scores = importance(base, other)
    mask = (scores >= fusion_threshold(scores)).to(base.dtype)
    return base + (other - base) * mask


register(
    Method(
        name="arcee_fusion",
        fn=arcee_fusion,
        summary="Arcee Fusion: keep the other model's changes whose importance |Δ|·KL(softmax) "
        "is above the outlier fence median + 1.5·IQR.",
        reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
        params=NoParams,
        model_params=NoParams,
        min_models=1,
        max_models=1,
    )
)
