"""UMTAM's curvature-aware merge (arXiv 2512.17109; ../shared/ALGORITHMS.md §4): TIES' three
steps with the curvature each expert recorded while it trained. Per tensor, for each task t
with τ_t = θ_t − θ₀, curvature K_t = √(R_t ⊗ C_t) ≥ 1e-8 and saliency S_t:

    trim:           m_t = top ``density`` of S_t              (:func:`.sparsify.keep_top`)
    elect sign:     σ = sign(Σ_t K_t m_t sign τ_t)             (:func:`.consensus.elect_sign_list`)
    disjoint mean:  a_t = m_t [sign τ_t = σ];  Δ = Σ a_t K_t τ_t / Σ a_t K_t  (0 where the
                    denominator is ≤ 1e-8)                    (:func:`.consensus.disjoint_sum`)
    θ = θ₀ + λ Δ

S_t is the expert's recorded ``P:S`` where its sidecar has one (the optimizer's running saliency),
else :func:`.curvature.saliency` of τ_t (τ² ⊙ √(R ⊗ C), unfloored); K's floor only keeps the
weights positive. With K ≡ 1 and S = τ² this is TIES with ``consensus_method: count`` (the paper's
vote counts signs) and λ = 1, bit for bit. A tied vote elects + (as TIES; the authors' code
elects 0, which keeps nothing).

1-D tensors (biases, norms) take the same steps with their elementwise moment: K = √R.
The authors' ablation options: ``sign_weight: saliency`` (their notebooks vote with S_t m_t),
``normalize_curvature`` (K / its per-matrix max) and ``normalize_saliency`` (S / its per-matrix
mean in the vote): together, their later variant (c). ``curvature: fisher-sampled |
fisher-empirical`` runs the same pipeline on a post-hoc diagonal Fisher (K = F, S = F ⊙ τ²;
``mergeforge stats fisher``): the comparison of curvature recorded in training with curvature
computed afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mergeforge.errors import ValidationError
from mergeforge.methods.base import Method, SidecarInputs, register
from mergeforge.methods.checks import check_bool, check_choice, check_real, fail
from mergeforge.methods.consensus import disjoint_sum, elect_sign_list
from mergeforge.methods.curvature import (
    check_same_scale,
    curvature,
    curvature_inputs,
    moments,
    saliency,
)
from mergeforge.methods.fisher import FisherParams, fisher_sidecars
from mergeforge.methods.sparsify import keep_top

FLOOR = 1e-8
"""K ≥ FLOOR, and Δ = 0 where Σ a_t K_t ≤ FLOOR (the paper's 1e-8)."""
CURVATURES = ("recorded", "fisher-sampled", "fisher-empirical")


@dataclass(frozen=True)
class UmtamParams:
    lambda_: float = 1.0
    """Scale of the merged task vector: θ = θ₀ + λ·Δ."""
    curvature: str = "recorded"
    """K: ``recorded`` (each expert's curvature sidecar, written while it trained), or a post-hoc
    diagonal Fisher from ``mergeforge stats fisher`` (``fisher-sampled``, ``fisher-empirical``)."""
    sign_weight: str = "curvature"
    """What weighs each task's sign vote: ``curvature`` K (the paper) or ``saliency`` S (the
    authors' notebooks)."""
    normalize_curvature: bool = False
    """Divide each task's K by its maximum over the tensor (the authors' variant (c))."""
    normalize_saliency: bool = False
    """Divide each task's S by its mean over the tensor in the sign vote (variant (c)); needs
    ``sign_weight: saliency``."""

    def __post_init__(self) -> None:
        check_real("lambda", self.lambda_)
        check_choice("curvature", self.curvature, CURVATURES)
        check_choice("sign_weight", self.sign_weight, ("curvature", "saliency"))
        check_bool("normalize_curvature", self.normalize_curvature)
        check_bool("normalize_saliency", self.normalize_saliency)
        if self.normalize_saliency and self.sign_weight != "saliency":
            fail("normalize_saliency", True, "false unless sign_weight: saliency (S only votes)")


@dataclass(frozen=True)
class UmtamModelParams:
    density: float = 0.2
    """Fraction of this task vector's entries kept per tensor, the most salient (the authors'
    k = 20 %)."""

    def __post_init__(self) -> None:
        check_real("density", self.density, 0.0, 1.0)


def weights(stat, tau: Tensor, params: UmtamParams) -> tuple[Tensor, Tensor]:
    """(K, S) of one task for one tensor, fp32 of ``tau``'s shape, from its statistics (the
    curvature mapping ``{":R", ":C", ":S"}`` or a Fisher tensor)."""
    if stat is None:
        raise ValidationError("umtam: no curvature statistics for this tensor (see its docs)")
    if params.curvature == "recorded":
        R, C = moments(stat)
        S = stat[":S"] if ":S" in stat else saliency(tau, R, C)
        K = curvature(R, C, tau.shape)
    else:
        K, S = stat, stat * tau.float().square()
    K = K.clamp_min(FLOOR)
    return (K / K.max() if params.normalize_curvature else K), S


def umtam(base, tensors, params: UmtamParams, model_params, ctx) -> Tensor:
    if params.curvature == "recorded" and not params.normalize_curvature:
        check_same_scale(ctx, "umtam", "set normalize_curvature: true")
    deltas, ks, votes = [], [], []
    for i, (x, mp) in enumerate(zip(tensors, model_params, strict=True)):
        tau = torch.sub(x, base)  # fresh: consumed below
        K, S = weights(ctx.sidecars[i] if ctx.sidecars else None, tau, params)
        if mp.density <= 0:
            tau.zero_()
        elif mp.density < 1:
            tau.mul_(keep_top(S, mp.density))  # trim: m_t
        k = K.to(tau.dtype)
        if params.sign_weight == "curvature":
            votes.append(k)
        else:
            mean = float(S.mean()) if params.normalize_saliency else 0.0
            votes.append((S / mean if mean > 0 else S).to(tau.dtype))
        deltas.append(tau.mul_(k))  # K_t ⊙ m_t τ_t: the same signs as τ_t (K > 0)
        ks.append(k)
    positive = elect_sign_list(deltas, "count", votes)  # σ: Σ_t w_t sign(m_t τ_t) ≥ 0
    merged, divisor = disjoint_sum(deltas, ks, positive)  # Σ a_t K_t τ_t, Σ a_t K_t
    merged.div_(divisor).masked_fill_(divisor <= FLOOR, 0.0)
    if params.lambda_ != 1:
        merged.mul_(params.lambda_)
    return merged.add_(base)


def umtam_sidecars(params: UmtamParams) -> SidecarInputs:
    if params.curvature == "recorded":
        return curvature_inputs(optional=(":S",))
    fisher = params.curvature.removeprefix("fisher-")
    return fisher_sidecars(FisherParams(fisher=fisher))


register(
    Method(
        name="umtam",
        fn=umtam,
        summary="UMTAM: trim by saliency, curvature-weighted sign vote and disjoint mean, with "
        "the curvature each expert recorded in training; θ = θ₀ + λ·Δ.",
        reference="https://arxiv.org/abs/2512.17109",
        params=UmtamParams,
        model_params=UmtamModelParams,
        sidecar_inputs=umtam_sidecars,
        notes="Needs each expert's curvature, recorded while it trained "
        "(mergeforge.train.CurvatureRecorder / CurvatureCallback / UMTAM; README: Train "
        "merge-ready experts); curvature: fisher-* reads `mergeforge stats fisher` instead.",
    )
)
