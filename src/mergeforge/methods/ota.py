"""OTA merging (arXiv 2509.11167, ``pmahdavi/ota-merge``; ../shared/ALGORITHMS.md §4): per
entry, the average of the experts weighted by the curvature their optimizer saw,

    θ = Σ_t P_t θ_t / Σ_t P_t,   P_t = norm(v_t^p) + ε

with v_t Adam's ``exp_avg_sq`` (the curvature sidecar's ``P:v``, kept with
``CurvatureRecorder(keep_exp_avg_sq=True)``) or its rank-1 estimate from the recorded row /
column moments, v̂ = R Cᵀ / ΣR (:func:`.curvature.second_moment`; OTA's rank-1 option, "Lemma
1"; for a 1-D tensor v̂ = R). ``normalization`` divides v^p by its mean (OTA's ``global``) or sum
over the tensor, per expert. p = 0 is the plain average.

Fast Fisher Grafting (``density`` < 1, needs a base): each expert keeps the ``density`` of its
entries with the largest v ⊙ τ² (τ = θ_t − θ₀) per tensor, the others take no part in the
average (P_t = 0 there); where every expert is masked the base's value is kept. (OTA's code
masks by a threshold on v ⊙ τ²; a per-tensor fraction is the same mask for the threshold that
keeps that fraction.) OTA's further option of merging the masked task vectors by TIES instead is
not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mergeforge.errors import ConfigError, ValidationError
from mergeforge.methods.base import Method, SidecarInputs, register
from mergeforge.methods.checks import check_choice, check_real, fail
from mergeforge.methods.curvature import curvature_inputs, moments, second_moment, uses_means
from mergeforge.methods.sparsify import keep_top

PRECONDITIONERS = ("auto", "exp_avg_sq", "rank1")


@dataclass(frozen=True)
class OtaParams:
    power: float = 0.5
    """p of P = v^p (OTA's default 0.5; 0.25 in one of its examples; 0: the plain average)."""
    epsilon: float = 1e-26
    """ε added to every weight (OTA's), so that Σ_t P_t > 0; > 0."""
    normalization: str = "none"
    """Each expert's v^p as it is (``none``), or divided by its ``mean`` (OTA's ``global``) or
    ``sum`` over the tensor."""
    preconditioner: str = "auto"
    """v: ``exp_avg_sq`` (Adam's, recorded with keep_exp_avg_sq; every expert needs it),
    ``rank1`` (R Cᵀ / ΣR from the recorded moments), ``auto`` (exp_avg_sq where every expert
    has it for the tensor, else rank1)."""

    def __post_init__(self) -> None:
        check_real("power", self.power, 0.0)
        check_real("epsilon", self.epsilon, 0.0)
        if self.epsilon <= 0:
            fail("epsilon", self.epsilon, "a positive number (it keeps Σ P_t > 0)")
        check_choice("normalization", self.normalization, ("none", "mean", "sum"))
        check_choice("preconditioner", self.preconditioner, PRECONDITIONERS)


@dataclass(frozen=True)
class OtaModelParams:
    density: float = 1.0
    """Fast Fisher Grafting: the fraction of this expert's entries that take part, the largest
    v ⊙ τ² per tensor (needs a base); 1 keeps all."""

    def __post_init__(self) -> None:
        check_real("density", self.density, 0.0, 1.0)


def preconditioner(stat, shape, use_v: bool, meta) -> Tensor:
    """v of one expert for one tensor, fp32: its ``exp_avg_sq`` or the rank-1 estimate."""
    if use_v:
        return stat[":v"]
    R, C = moments(stat)
    return second_moment(R, C, shape, means=uses_means(meta))


def ota(base, tensors, params: OtaParams, model_params, ctx) -> Tensor:
    stats = ctx.sidecars
    if not stats or any(s is None for s in stats):
        raise ValidationError(f"ota: no curvature statistics for {ctx.key!r} (see its docs)")
    if base is None and any(mp.density < 1 for mp in model_params):
        raise ConfigError("ota: density < 1 (Fast Fisher Grafting) masks by τ = θ − θ₀ and "
                          "needs a base_model; set one or leave density at 1")  # fmt: skip
    use_v = params.preconditioner == "exp_avg_sq" or (
        params.preconditioner == "auto" and all(":v" in s for s in stats)
    )
    metas = ctx.sidecar_meta or (None,) * len(tensors)
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    num = den = None
    masked = False
    for x, mp, stat, meta in zip(tensors, model_params, stats, metas, strict=True):
        v = preconditioner(stat, x.shape, use_v, meta)
        w = v.pow(params.power)
        if params.normalization != "none":
            scale = float(w.mean() if params.normalization == "mean" else w.sum())
            w = w / scale if scale > 0 else w
        w = (w + params.epsilon).to(dtype)
        if mp.density < 1:  # FFG: the top v ⊙ τ² of this expert take part
            masked = True
            keep = keep_top(v * (x - base).float().square(), mp.density) if mp.density > 0 else 0
            w = w * keep
        num = w * x.to(dtype) if num is None else num.add_(w * x.to(dtype))
        den = w if den is None else den.add_(w)
    assert num is not None and den is not None
    out = num / den
    if masked:  # every expert masked: the base's value
        out = torch.where(den == 0, base.to(dtype), out)
    return out.to(tensors[0].dtype)


def ota_sidecars(params: OtaParams) -> SidecarInputs:
    if params.preconditioner == "exp_avg_sq":
        return curvature_inputs(optional=(), needed=(":v",))
    return curvature_inputs(optional=(":v",) if params.preconditioner == "auto" else ())


register(
    Method(
        name="ota",
        fn=ota,
        summary="OTA: average weighted by each expert's Adam second moment v^p (or its rank-1 "
        "estimate from recorded curvature), optional Fast Fisher Grafting mask.",
        reference="https://arxiv.org/abs/2509.11167",
        params=OtaParams,
        model_params=OtaModelParams,
        base="optional",
        sidecar_inputs=ota_sidecars,
        notes="Needs each expert's curvature, recorded while it trained "
        "(mergeforge.train.CurvatureRecorder(keep_exp_avg_sq=True) for v; README: Train "
        "merge-ready experts).",
    )
)
