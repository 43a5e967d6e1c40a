"""WUDI (2503.08099) and its closed-form spectral versions SWUDI / SWUDI-A (2606.07289).

All three minimise WUDI's data-free loss per 2-D weight (out, in):

    L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖² / ‖τ_i‖²,   gradient 2(τ_m C − D),
    C = Σ τ_iᵀτ_i/‖τ_i‖² (D2, D2),  D = Σ τ_i τ_iᵀτ_i/‖τ_i‖² (D1, D2),  tr C = N,

from τ_m = Σ τ_i, and θ = θ₀ + scaling·τ_m (scaling 1). The exact minimiser D C⁻¹ merges worse
than stopping early (82.3 vs 84.6 on ViT-B/32 × 8): WUDI stops Adam after 300 steps, SWUDI
filters the gradient flow in C's eigenbasis, SWUDI-A keeps a per-layer top-K of it exactly.
Non-matrices get the mean task vector; ``lm_head`` and embeddings are skipped by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mergeforge.methods.base import Method, register
from mergeforge.methods.checks import check_choice, check_real, fail
from mergeforge.methods.covariance import (
    EIGEN_FLOOR,
    Spectrum,
    initial,
    mean,
    negligible,
    solve_adam,
    solve_spectral,
    spectrum,
    wudi_quadratic,
)
from mergeforge.methods.matrix import ProxyGramParams, merge_matrices

FILTERS = ("exp", "landweber", "tikhonov", "none")
INITS = ("sum", "zero", "mean")
RANK_RULES = ("participation_sqrt", "gavish_donoho", "entropy")


def check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        fail(name, value, "a whole number ≥ 0")


def _ceil(x: float) -> int:
    """ceil that ignores floating-point fuzz (0.65 · 100 = 65.00000000000001 → 65)."""
    return math.ceil(round(x, 6))


@dataclass(frozen=True)
class WudiParams(ProxyGramParams):
    iterations: int = 300
    """Adam steps (the paper's 300; FusionBench's configs use 400)."""
    lr: float = 1e-5
    """Adam learning rate."""
    init: str = "sum"
    """Start point: ``sum`` of the task vectors (the paper) or ``zero``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("iterations", self.iterations)
        check_real("lr", self.lr, lo=0.0)
        check_choice("init", self.init, ("sum", "zero"))


def wudi(base, tensors, params: WudiParams, model_params, ctx):
    def solve(deltas: list[Tensor]) -> Tensor:
        if negligible(deltas):
            return mean(deltas)
        q = wudi_quadratic(deltas, initial(deltas, params.init))
        return solve_adam(q, iterations=params.iterations, lr=params.lr)

    return merge_matrices(base, tensors, params, ctx, solve)


# --- spectral filters f(λ) ∈ [0, 1] on the eigenvalues of C ------------------------------


def filter_gain(values: Tensor, kind: str, *, t: float, steps: int, alpha: float) -> Tensor:
    """f(λ̃), λ̃ = max(λ, 1e-8), and f = 0 where λ = 0 (A's null space):
    ``exp`` 1 − e^{−λ̃t} (gradient flow at time t); ``landweber`` 1 − (1 − ηλ̃)^n with
    η = 0.9/λ_max (n steps of gradient descent on L with step η/2); ``tikhonov``
    λ̃/(λ̃ + α); ``none`` 1."""
    lam = values.clamp(min=EIGEN_FLOOR)
    if kind == "exp":
        gain = -torch.expm1(-lam * t)
    elif kind == "landweber":
        eta = 0.9 / float(lam.max())
        gain = 1 - (1 - eta * lam).clamp(0, 1).pow(steps)
    elif kind == "tikhonov":
        gain = lam / (lam + alpha)
    else:
        gain = torch.ones_like(lam)
    return torch.where(values > 0, gain, torch.zeros_like(gain))


def top_k(gain: Tensor, k: int) -> Tensor:
    """Keep f on the k largest eigenvalues (``values`` are sorted descending), 0 elsewhere."""
    out = torch.zeros_like(gain)
    out[:k] = gain[:k]
    return out


# --- SWUDI-A's per-layer rank rules: (eigenvalues of C descending, rows of F) -> K ---------


def _eigenvalues(values: Tensor) -> Tensor | None:
    """λ of a Gram in float64 with round-off negatives (−1e-9 from ``eigh``) set to 0, whose
    square roots would be NaN; None when every λ is 0 (F = 0: nothing to keep)."""
    lam = values.double().clamp_min(0)
    return lam if float(lam.sum()) > 0 else None


def participation_sqrt(values: Tensor, rows: int) -> int:
    """K = ⌈(Σ√λ)² / Σλ⌉: the participation ratio of the singular values √λ of F."""
    lam = _eigenvalues(values)
    if lam is None:
        return 0
    return _ceil(float(lam.sqrt().sum() ** 2 / lam.sum()))


def entropy_rank(values: Tensor, rows: int) -> int:
    """K = ⌈exp(−Σ p log p)⌉, p = λ/Σλ (effective rank, Roy & Vetterli 2007)."""
    lam = _eigenvalues(values)
    if lam is None:
        return 0
    p = lam / lam.sum()
    h = -torch.special.xlogy(p, p).sum()
    return _ceil(float(h.exp()))


def gavish_donoho(values: Tensor, rows: int) -> int:
    """K = #{σ > ω(β)·median(σ)} over the min(m, D2) singular values σ = √λ of F (m, D2),
    β = min/max aspect ratio, ω(β) ≈ 0.56β³ − 0.95β² + 1.82β + 1.43 (Gavish & Donoho 2014,
    unknown noise level)."""
    n = min(rows, values.numel())
    sigma = values[:n].double().clamp_min(0).sqrt()
    beta = n / max(rows, values.numel())
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    return int((sigma > omega * torch.quantile(sigma, 0.5)).sum())


RULES: dict[str, Callable[[Tensor, int], int]] = {
    "participation_sqrt": participation_sqrt,
    "gavish_donoho": gavish_donoho,
    "entropy": entropy_rank,
}


def spectral_merge(deltas: list[Tensor], init: str, gain_of: Callable[[Spectrum], Tensor]):
    """The SWUDI solver: one eigendecomposition of C (from the (N·D1)² Gram of
    F = [τ_i/‖τ_i‖] when N·D1 < D2), a filter, X₀ − R₀ V diag(f/λ̃) Vᵀ."""
    if negligible(deltas):
        return mean(deltas)
    small = len(deltas) * deltas[0].shape[0] < deltas[0].shape[1]
    q = wudi_quadratic(deltas, initial(deltas, init), gram=not small, factor=small)
    spec = spectrum(q)
    return solve_spectral(q, spec, gain_of(spec))


@dataclass(frozen=True)
class SwudiParams(ProxyGramParams):
    exp_time: float = 300.0
    """t of the ``exp`` filter (scale-free: tr C = N). Authors: 300 (their standalone copy,
    CLIP-B/32 and Llama-3B), 1300 / 1800 in their B/32 / B/16 configs."""
    rank_ratio: float = 0.65
    """Keep the ⌈r·D2⌉ largest eigenvalues of C (0.65 CLIP-B/32, 0.85 Llama-3B)."""
    filter: str = "exp"
    """``exp`` | ``landweber`` | ``tikhonov`` | ``none`` (f = 1: with ``rank_ratio: 1``
    the exact D C⁻¹, which merges worse than the filtered flow)."""
    init: str = "sum"
    """X₀: ``sum`` (the paper; the merged delta is then ~N× a task vector), ``mean``, ``zero``."""
    steps: int = 150
    """Landweber steps n."""
    alpha: float = 1e-2
    """Tikhonov α."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("exp_time", self.exp_time, lo=0.0)
        check_real("rank_ratio", self.rank_ratio, lo=0.0, hi=1.0)
        check_choice("filter", self.filter, FILTERS)
        check_choice("init", self.init, INITS)
        check_count("steps", self.steps)
        check_real("alpha", self.alpha, lo=0.0)


def swudi(base, tensors, params: SwudiParams, model_params, ctx):
    def gain_of(spec: Spectrum) -> Tensor:
        gain = filter_gain(
            spec.values, params.filter, t=params.exp_time, steps=params.steps, alpha=params.alpha
        )
        return top_k(gain, _ceil(params.rank_ratio * spec.values.numel()))

    return merge_matrices(
        base, tensors, params, ctx, lambda d: spectral_merge(d, params.init, gain_of)
    )


@dataclass(frozen=True)
class SwudiAParams(ProxyGramParams):
    rank_rule: str = "participation_sqrt"
    """Per-layer K from C's spectrum: ``participation_sqrt`` (the authors' default),
    ``gavish_donoho`` (their choice for full-parameter LLM deltas), ``entropy``."""
    init: str = "sum"
    """X₀ outside the kept directions: ``sum``, ``mean`` or ``zero``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("rank_rule", self.rank_rule, RANK_RULES)
        check_choice("init", self.init, INITS)


def swudi_a(base, tensors, params: SwudiAParams, model_params, ctx):
    def gain_of(spec: Spectrum) -> Tensor:
        k = RULES[params.rank_rule](spec.values, spec.rows)
        return top_k(filter_gain(spec.values, "none", t=0.0, steps=0, alpha=0.0), max(k, 1))

    return merge_matrices(
        base, tensors, params, ctx, lambda d: spectral_merge(d, params.init, gain_of)
    )


SHARED_NOTES = (
    "Per 2-D weight (out, in; GPT-2 Conv1D transposed); other tensors get the mean task "
    "vector (non_matrix), embeddings and lm_head are skipped (skip: '' = FusionBench). "
    "All-zero task vectors give the base."
)
register(
    Method(
        name="wudi",
        fn=wudi,
        summary="WUDI: Adam on Σ‖(τ_m − τ_i)τ_iᵀ‖²/‖τ_i‖² from the sum of task vectors.",
        reference="https://arxiv.org/abs/2503.08099",
        params=WudiParams,
        notes=SHARED_NOTES + " Closed-form gradient 2(τ_m C − D) with torch.optim.Adam: equal "
        "to FusionBench's wudi_merging to rounding, one D1·D2² product per step.",
    )
)
register(
    Method(
        name="swudi",
        fn=swudi,
        summary="SWUDI: WUDI's gradient flow in closed form, spectrally filtered, top-K of C.",
        reference="https://arxiv.org/abs/2606.07289",
        params=SwudiParams,
        notes=SHARED_NOTES + " One eigh per weight (of the (N·D1)² Gram when N·D1 < D2). "
        "filter: none + rank_ratio: 1 is the exact D C⁻¹ (the papers: worse than early "
        "stopping; on our text suite between WUDI and SWUDI). With init: sum "
        "some settings want scaling ≈ 1/N.",
    )
)
register(
    Method(
        name="swudi_a",
        fn=swudi_a,
        summary="SWUDI-A: exact WUDI solution on a per-layer top-K of C chosen from its spectrum.",
        reference="https://arxiv.org/abs/2606.07289",
        params=SwudiAParams,
        notes=SHARED_NOTES + " No hyper-parameters besides the rank rule.",
    )
)
