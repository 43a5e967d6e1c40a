"""Karcher mean: the Riemannian barycentre of the models' directions, times their mean norm.

Per tensor, for the N inputs x_i (flattened) with equal weights α_i = 1/N: the unit directions
u_i = x_i/‖x_i‖ of the inputs whose norm exceeds ``tol`` are averaged on the sphere by the
fixed-point iteration of Buss & Fillmore (2001, "Spherical averages and applications to spherical
splines and interpolation"), also arXiv 2603.04972: start from the normalised Euclidean mean m;
repeat v = Σ α_i log_m(u_i) (:func:`~.sphere.log_map`, weights renormalised over those inputs),
m ← exp_m(v) (:func:`~.sphere.exp_map`), until ‖v‖ < ``tol`` or ``max_iter`` steps. The result is
(Σ_i α_i ‖x_i‖)·m, all N norms counted. Every input is one point: a ``base_model``, when given,
is one more (mergekit ignores the base role for karcher and adds it as an input). Numerics,
tolerances and step order as mergekit's ``karcher``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergeforge.methods.base import Method, NoParams, register
from mergeforge.methods.checks import check_real, fail
from mergeforge.methods.sphere import exp_map, log_map, work_dtype


@dataclass(frozen=True)
class KarcherParams:
    max_iter: int = 10
    """Most fixed-point steps of the spherical mean."""
    tol: float = 1e-5
    """Stop when the mean's tangent step is shorter; inputs with a smaller norm have no
    direction and are left out of the mean (their norm still counts in the scale)."""

    def __post_init__(self) -> None:
        it = self.max_iter
        if isinstance(it, bool) or not isinstance(it, int) or it < 0:
            fail("max_iter", it, "a whole number ≥ 0 (fixed-point steps)")
        check_real("tol", self.tol, 0.0)


def karcher_mean(points, tol: float, max_iter: int):
    """Karcher mean of the rows ``points`` (N flattened tensors, one dtype) with equal weights:
    (Σ α_i ‖x_i‖) times the spherical mean direction (zeros if no point has a direction)."""
    dt = work_dtype(points[0])  # float32 at least: half precision inputs are promoted
    points = [p.to(dt) for p in points]
    norms = [torch.linalg.vector_norm(p) for p in points]
    alpha = 1.0 / len(points)
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(points[0])
    units = [points[i] / norms[i] for i in valid]
    alpha_sum = sum([alpha] * len(valid))  # α renormalised over the inputs with a direction
    weights = [alpha / alpha_sum] * len(valid)
    mean = sum(w * u for w, u in zip(weights, units, strict=True))
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, units, strict=True):
            dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            if torch.arccos(dot).item() < tol:  # u is (numerically) the mean: no pull
                continue
            tangent += w * log_map(mean, u, dot)
        length = torch.linalg.vector_norm(tangent)
        if length.item() < tol:
            break
        mean = exp_map(mean, tangent, length)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(alpha * n for n in norms) * mean


def karcher(base, tensors, params, model_params, ctx):
    inputs = [*tensors, *([base] if base is not None else [])]
    if len(inputs) == 1:
        return inputs[0]
    out = karcher_mean([x.reshape(-1) for x in inputs], params.tol, params.max_iter)
    return out.reshape(inputs[0].shape).to(inputs[0].dtype)


register(
    Method(
        name="karcher",
        fn=karcher,
        summary="Karcher mean: Riemannian barycentre of the models' directions on the sphere, "
        "scaled by their mean norm.",
        reference="https://arxiv.org/abs/2603.04972",
        params=KarcherParams,
        model_params=NoParams,
        base="optional",
        notes="A base_model is one more input point, as in mergekit (no task vectors).",
    )
)
