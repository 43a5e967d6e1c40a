"""SLERP: spherical linear interpolation between the base and one other model.

Per tensor, with a = θ₀ and b = θ₁ (same shape S, flattened for the angle):
Ω = arccos(⟨a/‖a‖, b/‖b‖⟩), θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, and the linear
interpolation (1−t)·a + t·b when |cos Ω| > 0.9995 (nearly parallel or antiparallel, where the
spherical formula divides by ~0). t = 0 gives the base, t = 1 the other model. Shoemake 1985,
"Animating rotation with quaternion curves"; numerics as mergekit's ``slerp``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergeforge.methods.base import Method, NoParams, register
from mergeforge.methods.checks import check_real
from mergeforge.methods.sphere import great_circle

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@dataclass(frozen=True)
class SlerpParams:
    t: float
    """Interpolation factor: 0 = base, 1 = the other model (values outside extrapolate)."""

    def __post_init__(self) -> None:
        check_real("t", self.t)


def slerp(base, tensors, params, model_params, ctx):
    # float32 (or float64) even for half inputs: acos near ±1 needs the precision
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    a = base.reshape(1, -1).to(dtype)
    b = tensors[0].reshape(1, -1).to(dtype)
    t = torch.tensor(params.t, dtype=dtype, device=a.device)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    # a zero vector has no direction; dividing by 1 keeps its dot 0 instead of NaN
    na = na if na > EPS else torch.ones_like(na)
    nb = nb if nb > EPS else torch.ones_like(nb)
    cos = ((a / na) * (b / nb)).sum(dim=1).clamp(-1, 1)
    linear = (cos.abs() > DOT_THRESHOLD) | (a.shape[1] == 0)
    return great_circle(a, b, cos, t, linear).reshape(base.shape).to(base.dtype)


register(
    Method(
        name="slerp",
        fn=slerp,
        summary="Spherical interpolation between the base (t = 0) and one model (t = 1).",
        reference="https://en.wikipedia.org/wiki/Slerp",
        params=SlerpParams,
        model_params=NoParams,
        min_models=1,
        max_models=1,
        notes=f"Linear interpolation where |cos Ω| > {DOT_THRESHOLD}.",
    )
)
