"""Linear merge: weighted average of whole models (model soups, 2203.05482).

θ = Σ_i w_i θ_i / Σ_i w_i (``normalize: true``, the default) or Σ_i w_i θ_i. No base model:
every input, base included if listed, is one of the θ_i. Shapes: every input and the result
have the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergeforge.errors import ConfigError
from mergeforge.methods.base import Method, register
from mergeforge.methods.checks import check_bool
from mergeforge.methods.params import WeightParams


@dataclass(frozen=True)
class LinearParams:
    normalize: bool = True
    """Divide by the sum of the weights (a weighted average rather than a weighted sum)."""

    def __post_init__(self) -> None:
        check_bool("normalize", self.normalize)


def linear(base, tensors, params, model_params, ctx):
    # accumulate in float32 at least (as mergekit): a half-precision running sum loses bits
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    # the first term by a multiplication (0 + w·x is w·x), the rest added in place: one pass
    # fewer than starting from zeros, and no fresh buffer but the output
    out = torch.mul(tensors[0].to(dtype), model_params[0].weight)
    for x, mp in zip(tensors[1:], model_params[1:], strict=True):
        out.add_(x.to(dtype), alpha=mp.weight)
    if not params.normalize:
        return out.to(tensors[0].dtype)
    # the sum in the compute dtype, as mergekit, so both divide by the same number
    total = torch.tensor([mp.weight for mp in model_params], dtype=out.dtype).sum().item()
    if abs(total) < 1e-8:
        # mergekit divides anyway and writes inf/NaN; an error that says why is kinder
        raise ConfigError(
            f"linear with normalize: true needs weights that do not sum to 0, but the weights "
            f"for {ctx.key!r} sum to {total}. Change a 'weight' or set normalize: false."
        )
    return out.div_(total).to(tensors[0].dtype)


register(
    Method(
        name="linear",
        elementwise=True,
        fn=linear,
        summary="Weighted average of the models (model soup): Σ w_i θ_i / Σ w_i.",
        reference="https://arxiv.org/abs/2203.05482",
        params=LinearParams,
        model_params=WeightParams,
        base="none",
        notes="Idempotent with normalize: true (the default).",
    )
)
