"""Multi-SLERP: a weighted spherical barycentre of N models (Goddard, "Multi-SLERP", 2025).

Per tensor, with x_i the models' tensors (or their task vectors x_i − θ₀ when a base is given),
flattened, and weights w_i (divided by Σ w_i with ``normalize_weights``):

1. project to the unit sphere: u_i = x_i / (‖x_i‖ + ε);
2. tangent plane at the weighted mean direction m = Σ w_i u_i / ‖Σ w_i u_i‖:
   v_i = u_i − ⟨u_i, m⟩ m, and their weighted sum v = Σ w_i v_i;
3. back onto the sphere (:func:`~.sphere.exp_map` with length ‖v‖ + ε), scaled by the weighted
   mean norm Σ w_i ‖x_i‖; plus θ₀ when a base is given.

One model returns it unchanged (as mergekit, base or not). Where Σ w_i u_i ≈ 0 the mean has no
direction: two models are interpolated linearly, as mergekit does; so are N models that are all
(near) zero — task vectors of a tensor no model changed — where mergekit raises for N > 2;
otherwise (antipodal models with cancelling weights) the error names the tensor and the fix.
Numerics as mergekit's ``multislerp`` (float32 at least).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergeforge.errors import ValidationError
from mergeforge.methods.base import Method, register
from mergeforge.methods.checks import check_bool, check_real
from mergeforge.methods.params import WeightParams
from mergeforge.methods.sphere import work_dtype


@dataclass(frozen=True)
class MultiSlerpParams:
    normalize_weights: bool = True
    """Divide the weights by their sum (a barycentre); false uses them as given."""
    eps: float = 1e-8
    """Added to every norm before dividing by it (numerical guard), as mergekit."""

    def __post_init__(self) -> None:
        check_bool("normalize_weights", self.normalize_weights)
        check_real("eps", self.eps, 0.0)


_CHUNK = 1 << 17
"""Entries per block of the two streaming passes (a few MB of float32 across the models)."""


def multislerp(base, tensors, params, model_params, ctx):
    """Every vector the algorithm forms (the unit directions, their mean, the tangent, the
    result) is a linear combination of the N points p_i, so only their N × N Gram matrix is
    needed to find the coefficients: one pass over the inputs accumulates it (float64, by
    blocks), the steps run on N-vectors, and a second pass writes θ₀ + Σ c_i p_i. Two reads of
    the inputs instead of ~5N full-tensor passes; the same arithmetic in exact algebra as the
    step-by-step definition above (mergekit's), float64 where it cancels (the tangent of nearly
    parallel points)."""
    if len(tensors) == 1:
        return tensors[0]
    dt, eps = work_dtype(tensors[0]), params.eps
    gram = _gram(base, tensors, dt)
    w = torch.tensor([mp.weight for mp in model_params], dtype=torch.float64)
    if params.normalize_weights:
        w = w / w.sum()
    norms = gram.diagonal().clamp_min(0).sqrt()
    # mergekit's float32 steps round ‖x_i‖, its eps guards and its sums in float32; the
    # coefficients here are float64, which moves results by a few float32 ulps at most
    a = w / (norms + eps)  # Σ w_i u_i = Σ a_i p_i
    mean_norm = _norm(a, gram)
    if mean_norm < eps:
        if len(tensors) == 2 or bool((norms < eps).all()):
            return _combine(base, tensors, w, dt)
        raise ValidationError(
            f"multislerp: the weighted sum of the directions of {ctx.key!r} is zero (antipodal "
            "models whose weights cancel), so their spherical mean has no direction. Change a "
            "'weight' for this tensor, or merge it with linear."
        )
    b = a / mean_norm  # m = Σ b_i p_i
    dots = (gram @ b) / (norms + eps)  # ⟨u_i, m⟩
    t = a - (w * dots).sum() * b  # Σ w_i (u_i − ⟨u_i, m⟩ m) = Σ t_i p_i
    length = _norm(t, gram) + eps
    coef = (b * torch.cos(length) + t * (torch.sin(length) / length)) * (w * norms).sum()
    return _combine(base, tensors, coef, dt)


def _blocks(base, tensors, dt):
    """(base block or None, [point blocks]) in ``dt``, by blocks of ``_CHUNK`` entries."""
    flat = [x.reshape(-1) for x in tensors]
    b_flat = None if base is None else base.reshape(-1)
    for start in range(0, flat[0].numel(), _CHUNK):
        sl = slice(start, start + _CHUNK)
        b = None if b_flat is None else b_flat[sl].to(dt)
        yield b, [x[sl].to(dt) if b is None else x[sl].to(dt) - b for x in flat]


def _gram(base, tensors, dt) -> torch.Tensor:
    n = len(tensors)
    gram = torch.zeros(n, n, dtype=torch.float64, device=tensors[0].device)
    for _, points in _blocks(base, tensors, dt):
        p = torch.stack(points).to(torch.float64)
        gram.addmm_(p, p.T)
    return gram.cpu()


def _norm(c: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """‖Σ c_i p_i‖ from the Gram matrix."""
    return (c @ gram @ c).clamp_min(0).sqrt()


def _combine(base, tensors, coef, dt):
    """θ₀ + Σ coef_i p_i (Σ coef_i x_i without a base), block by block, in ``like``'s dtype."""
    like = tensors[0]
    out = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    c = [float(ci) for ci in coef]
    for i, (b, points) in enumerate(_blocks(base, tensors, dt)):
        acc = torch.mul(points[0], c[0])  # fresh: without a base the blocks are input views
        for ci, p in zip(c[1:], points[1:], strict=True):
            acc.add_(p, alpha=ci)
        if b is not None:
            acc.add_(b)
        out[i * _CHUNK : i * _CHUNK + acc.numel()] = acc
    return out.view(like.shape)


def _finish(out, base, like):
    out = out if base is None else out + base.to(out.dtype)
    return out.to(like.dtype)


register(
    Method(
        name="multislerp",
        fn=multislerp,
        summary="Multi-SLERP: weighted spherical barycentre of the models (of their task "
        "vectors when a base is given), scaled by their weighted mean norm.",
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        params=MultiSlerpParams,
        model_params=WeightParams,
        base="optional",
        notes="With a base, the task vectors are averaged and the base added back. One model "
        "is returned unchanged.",
    )
)
