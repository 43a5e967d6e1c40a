"""NuSLERP: spherical interpolation between two models, weighted, optionally row by row.

The two models' weights w₀, w₁ give t = w₁ / (w₀ + w₁) (0.5 when the sum is ~0). Without a base
the models themselves are interpolated; with a base, their task vectors τ_i = θ_i − θ₀, and the
base is added back (slerp of task vectors). Along the great circle (:func:`~.sphere.great_circle`)
of the whole flattened tensors (``nuslerp_flatten``, the default) or of each row vector of the
last dimension (each vector along dimension 0 with ``nuslerp_row_wise``); pairs whose directions
are parallel to float precision (1 − cos² Ω ≤ 10⁻¹⁶) are interpolated linearly. Shoemake 1985,
"Animating rotation with quaternion curves"; parameters and numerics as mergekit's ``nuslerp``.
``slerp`` with t is nuslerp without a base and weights 1 − t, t (up to slerp's wider linear
fallback, |cos Ω| > 0.9995).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mergeforge.methods.base import Method, register
from mergeforge.methods.checks import check_bool
from mergeforge.methods.params import WeightParams
from mergeforge.methods.sphere import great_circle, work_dtype

PARALLEL_EPS = 1e-8
"""Pairs with 1 − cos² Ω ≤ PARALLEL_EPS² are interpolated linearly (mergekit's ``eps``)."""


@dataclass(frozen=True)
class NuSlerpParams:
    nuslerp_flatten: bool = True
    """Interpolate the whole flattened tensor as one vector; false: vector by vector."""
    nuslerp_row_wise: bool = False
    """With nuslerp_flatten false: the vectors along dimension 0 instead of the last one."""

    def __post_init__(self) -> None:
        check_bool("nuslerp_flatten", self.nuslerp_flatten)
        check_bool("nuslerp_row_wise", self.nuslerp_row_wise)


def interpolation_t(w0: float, w1: float) -> float:
    """t = w₁ / (w₀ + w₁): 0 gives the first model, 1 the second; 0.5 when the sum is ~0."""
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def slerp_vectors(a: Tensor, b: Tensor, t: float, *, flatten: bool, row_wise: bool) -> Tensor:
    """Slerp of ``a`` towards ``b`` (same shape S): as one vector (``flatten``) or per vector
    of the last dimension (of dimension 0 with ``row_wise``); returns shape S."""
    if flatten or a.dim() < 2:
        moved_a, moved_b = a.reshape(1, -1), b.reshape(1, -1)
    elif row_wise:
        moved_a, moved_b = a.transpose(0, -1), b.transpose(0, -1)
    else:
        moved_a, moved_b = a, b
    rows_a = moved_a.reshape(-1, moved_a.shape[-1])
    rows_b = moved_b.reshape(-1, moved_b.shape[-1])

    def unit(x: Tensor) -> Tensor:  # as mergekit: a zero row stays zero (norm clamped at 1e-7)
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = (unit(rows_a) * unit(rows_b)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    linear = (1 - cos.square()) <= PARALLEL_EPS**2
    out = great_circle(rows_a, rows_b, cos, t, linear).reshape(moved_a.shape)
    if row_wise and not flatten and a.dim() >= 2:
        out = out.transpose(0, -1)
    return out.reshape(a.shape)


def nuslerp(base, tensors, params, model_params, ctx):
    t = interpolation_t(float(model_params[0].weight), float(model_params[1].weight))
    dt = work_dtype(tensors[0])
    a, b = tensors[0].to(dt), tensors[1].to(dt)
    if base is not None:
        a, b = a - base.to(dt), b - base.to(dt)
    out = slerp_vectors(a, b, t, flatten=params.nuslerp_flatten, row_wise=params.nuslerp_row_wise)
    if base is not None:
        out = base.to(dt) + out
    return out.to(tensors[0].dtype)


register(
    Method(
        name="nuslerp",
        fn=nuslerp,
        summary="NuSLERP: slerp between two models (or their task vectors, with a base) at "
        "t = w₁/(w₀ + w₁), whole tensor or vector by vector.",
        reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
        params=NuSlerpParams,
        model_params=WeightParams,
        base="optional",
        min_models=2,
        max_models=2,
    )
)
