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
from mergeforge.methods.sphere import exp_map, work_dtype


@dataclass(frozen=True)
class MultiSlerpParams:
    normalize_weights: bool = True
    """Divide the weights by their sum (a barycentre); false uses them as given."""
    eps: float = 1e-8
    """Added to every norm before dividing by it (numerical guard), as mergekit."""

    def __post_init__(self) -> None:
        check_bool("normalize_weights", self.normalize_weights)
        check_real("eps", self.eps, 0.0)


def multislerp(base, tensors, params, model_params, ctx):
    if len(tensors) == 1:
        return tensors[0]
    dt, eps = work_dtype(tensors[0]), params.eps
    points = [x.to(dt) if base is None else x.to(dt) - base.to(dt) for x in tensors]
    flat = [p.reshape(-1) for p in points]
    w = torch.tensor([mp.weight for mp in model_params], dtype=dt, device=flat[0].device)
    if params.normalize_weights:
        w = w / w.sum()
    norms = [torch.linalg.vector_norm(f) for f in flat]
    units = [f / (n + eps) for f, n in zip(flat, norms, strict=True)]
    mean = sum(wi * u for wi, u in zip(w, units, strict=True))
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2 or all(n < eps for n in norms):
            out = sum(wi * p for wi, p in zip(w, points, strict=True))
            return _finish(out, base, tensors[0])
        raise ValidationError(
            f"multislerp: the weighted sum of the directions of {ctx.key!r} is zero (antipodal "
            "models whose weights cancel), so their spherical mean has no direction. Change a "
            "'weight' for this tensor, or merge it with linear."
        )
    mean = mean / mean_norm
    tangent = sum(wi * (u - (u * mean).sum() * mean) for wi, u in zip(w, units, strict=True))
    out = exp_map(mean, tangent, torch.linalg.vector_norm(tangent) + eps)
    out = out * sum(wi * n for wi, n in zip(w, norms, strict=True))
    return _finish(out.view(points[0].shape), base, tensors[0])


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
