"""Model Stock (2403.19522): interpolate between the average of k fine-tuned models and the base.

With offsets τ_i = θ_i − θ₀ and cos φ the mean pairwise cosine between them,
t = k·cos φ / (1 + (k − 1)·cos φ) and θ = t·mean_i(θ_i) + (1 − t)·θ₀. Per tensor (shape S,
flattened) or, with ``filter_wise``, per row along the last dimension (for 2-D weights
(out, in): per output filter), as mergekit. Needs k ≥ 2 models besides the base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergeforge.methods.base import Method, NoParams, register
from mergeforge.methods.checks import check_bool


@dataclass(frozen=True)
class ModelStockParams:
    filter_wise: bool = False
    """One t per row (last dimension) instead of one per tensor."""

    def __post_init__(self) -> None:
        check_bool("filter_wise", self.filter_wise)


def model_stock(base, tensors, params, model_params, ctx):
    if params.filter_wise:  # rows along the last dim; a 1-D tensor is one row
        w0 = base if base.dim() > 1 else base.unsqueeze(0)
        ws = [x if x.dim() > 1 else x.unsqueeze(0) for x in tensors]
    else:
        w0, ws = base.reshape(-1), [x.reshape(-1) for x in tensors]
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = [
        ((offsets[i] * offsets[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(len(offsets))
        for j in range(i + 1, len(offsets))
    ]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # (*rows, 1): broadcasts over a row
    k = len(ws)
    denominator = 1 + (k - 1) * cos
    # cos φ = −1/(k − 1): no finite interpolation; keep the base rather than blow up
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, k * cos / torch.where(singular, 1.0, denominator))
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(base.shape)


register(
    Method(
        name="model_stock",
        fn=model_stock,
        summary="Model Stock: move from the base towards the average by the offsets' angle.",
        reference="https://arxiv.org/abs/2403.19522",
        params=ModelStockParams,
        model_params=NoParams,
        min_models=2,
    )
)
