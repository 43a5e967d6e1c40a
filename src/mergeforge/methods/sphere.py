"""Hypersphere geometry shared by the spherical methods (slerp, nuslerp, multislerp, karcher).

Points are rows: tensors of shape (R, D) holding R vectors of dimension D (a whole flattened
tensor is R = 1). Three steps, each written once:

* :func:`great_circle`: the point a fraction t of the way from a to b along their great circle,
  sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b with cos Ω given, or the straight line where the
  caller says the pair is (nearly) parallel (Shoemake 1985, "Animating rotation with quaternion
  curves");
* :func:`exp_map`: from a unit point p along a tangent vector v of length ‖v‖,
  cos ‖v‖ · p + sin ‖v‖ · v/‖v‖ (back onto the sphere);
* :func:`log_map`: the tangent vector at p pointing to the unit point u, Ω/sin Ω · (u − cos Ω·p),
  whose length is the arc length Ω (Buss & Fillmore 2001, "Spherical averages and applications
  to spherical splines and interpolation").
"""

from __future__ import annotations

import torch
from torch import Tensor


def work_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32: acos and sin near 0 need more than half
    precision (the engine's fp32 default is left as it is)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def great_circle(a: Tensor, b: Tensor, cos: Tensor, t, linear: Tensor) -> Tensor:
    """Rows of ``a`` (R, D) moved a fraction ``t`` towards the rows of ``b`` along the great
    circle through them; ``cos`` (R, 1) is cos Ω of each pair (of the directions; ``a`` and
    ``b`` need not be unit), ``linear`` (R, 1) boolean marks the pairs interpolated on the
    straight line (1−t)·a + t·b instead (parallel or antiparallel: sin Ω ≈ 0)."""
    if linear.numel() == 1:  # one pair (slerp, flattened nuslerp): compute one branch only
        if bool(linear):
            return (1 - t) * a + t * b
        omega = torch.acos(cos)
        sin_omega = torch.sin(omega)
        return torch.sin((1 - t) * omega) / sin_omega * a + torch.sin(t * omega) / sin_omega * b
    # rows: the linear rows get Ω = 0 in the spherical branch (0/0 there, never selected)
    omega = torch.acos(torch.where(linear, torch.zeros_like(cos), cos))
    sin_omega = torch.sin(omega)
    spherical = torch.sin((1 - t) * omega) / sin_omega * a + torch.sin(t * omega) / sin_omega * b
    return torch.where(linear, (1 - t) * a + t * b, spherical)


def exp_map(p: Tensor, v: Tensor, length: Tensor) -> Tensor:
    """cos(length)·p + sin(length)/length · v: the point reached from the unit point ``p``
    along the tangent ``v``. ``length`` is ‖v‖ (callers add their own ε or skip length 0)."""
    return p * torch.cos(length) + v * (torch.sin(length) / length)


def log_map(p: Tensor, u: Tensor, dot: Tensor) -> Tensor:
    """Ω/sin Ω · (u − cos Ω·p), Ω = arccos(dot): the tangent at unit ``p`` towards unit ``u``
    (``dot`` = ⟨p, u⟩, clamped to [−1, 1] by the caller; Ω > 0)."""
    theta = torch.arccos(dot)
    return (theta / torch.sin(theta)) * (u - dot * p)
