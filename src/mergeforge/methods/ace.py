"""ACE-Merging (2603.02945, CVPR 2026): the covariance primitive with an adaptive covariance
estimate from the task vectors themselves, plus an isotropic refinement.

Per 2-D weight (out, in), T task vectors τ_t (ALGORITHMS.md §3; authors' code
``unravel-xu/ACE-Merging: src/merge/strategy.py``):

1. heterogeneity γ = Var(ℓ)/(Mean(ℓ)² + 1e-12), ℓ_t = log(‖τ_t‖² + 1e-12); hetero = γ > 0.3;
2. row-centred τ̃_t = τ_t − mean of its rows; S_t = τ̃_tᵀτ̃_t (D2, D2); Σ_t = S_t/tr S_t if
   hetero else S_t; Σ_t^ε = Σ_t + ε_t I;
3. W = B A⁻¹ with B = Σ τ̃_t Σ_t^ε and A = Σ Σ_t^ε + c_agg (the collective prior);
4. if hetero: Σ̄ = Σ Σ_t^ε / T, R = Σ τ_t (Σ_t − Σ̄), U S Vᵀ = svd(R + W), k = ⌊0.3·rank⌋,
   W += mean(S[:k]) U_k V_kᵀ;
5. θ = θ₀ + scaling·W. Non-matrices: the mean task vector.

``ridge: absolute, prior: code`` reproduce the authors' code. Defaults differ in the ridge:
see :class:`AceParams`.

``side`` picks the dimension the covariances live on. The formula above (``side: input``) is
the paper's and the authors' code on ``nn.Linear`` models (BERT, ViT). On GPT-2 the authors'
code applies the same lines to the ``Conv1D`` weights as stored, (in, out), with no transpose,
so its GPT-2 numbers (the paper's +4 over TA / TIES) use (out, out) covariances over the
*output* features: ``side: output`` (shared with WUDI / SWUDI, :class:`ProxyGramParams`; with
``orientation: auto`` it means the output features for ``Linear`` and ``Conv1D`` alike).
Measured on the text suites (BENCHMARKS.md §3d) the output side scores higher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mergeforge.methods.base import Method, register
from mergeforge.methods.checks import check_choice, check_real
from mergeforge.methods.covariance import Quadratic, mean, negligible, solve_exact
from mergeforge.methods.matrix import ProxyGramParams, merge_matrices


@dataclass(frozen=True)
class AceParams(ProxyGramParams):
    eps: float = 1e-2
    """Ridge ε added to each task covariance."""
    hetero_threshold: float = 0.3
    """γ above which the task covariances are trace-normalised and refined."""
    refine_fraction: float = 0.3
    """Fraction of the singular values whose mean sets the isotropic refinement."""
    prior: str = "code"
    """Collective prior c_agg added to A: ``code`` (the authors' code: every row of A gets
    the column means of Σ Σ_t, over mean ‖τ_t‖² if hetero — not symmetric) or ``isotropic``
    (the same mass as a multiple of I: tr(Σ Σ_t)/D2 · I, same hetero scaling; symmetric and
    equivariant under rotations of the input space). Default ``code``: the behaviour that was
    measured (see ``ridge``); ``isotropic``, the symmetric reading of the paper, scored 81.5
    against 82.1 on the MiniLM text suite (BENCHMARKS.md §3)."""
    ridge: str = "relative"
    """ε_t: ``absolute`` (the authors: ε, or ε/tr S_t when hetero) or ``relative``
    (ε·tr Σ_t/D2: ε·tr S_t/D2, or ε/D2 when hetero). Default ``relative``: the absolute ridge
    is in the units of the weights, so with short fine-tunes (mean |τ| ≈ 5e-4) εI swamps S_t
    and ACE degenerates to averaging the centred task vectors (measured below TIES on a
    MiniLM text suite); the relative ridge, scale-free like the rest of the solve, made it
    the best method measured there (ALGORITHMS.md §3, "Caution, measured")."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("eps", self.eps, lo=0.0)
        check_real("hetero_threshold", self.hetero_threshold, lo=0.0)
        check_real("refine_fraction", self.refine_fraction, lo=0.0, hi=1.0)
        check_choice("prior", self.prior, ("code", "isotropic"))
        check_choice("ridge", self.ridge, ("absolute", "relative"))


def heterogeneity(deltas: Sequence[Tensor]) -> float:
    """γ = Var(ℓ)/(Mean(ℓ)² + 1e-12), ℓ_t = log(‖τ_t‖² + 1e-12), with the unbiased variance of
    the authors' ``torch.var``; 0 for a single task (where that variance is undefined).

    As the authors define it, γ depends on the units of the weights, not only on how unequal
    the task norms are: Mean(ℓ) is near 0 where ‖τ_t‖² is near 1, and γ then exceeds the
    threshold for norms that barely differ. On the text suite's experts (7 tasks, mean |τ| 6e-4
    to 1.2e-3 everywhere) only the last layer's two FFN matrices (‖τ_t‖² 0.35–1.14, a 2–3×
    spread) come out heterogeneous (γ 0.37 and 0.69); the other 34 have γ ≤ 0.2, the
    attention matrices (‖τ_t‖² ≈ 0.15, nearly equal) ≤ 0.03."""
    if len(deltas) < 2:
        return 0.0
    ell = torch.tensor([math.log(float(d.square().sum()) + 1e-12) for d in deltas])
    return float(ell.var() / (ell.mean() ** 2 + 1e-12))


def task_covariance(
    delta: Tensor, *, hetero: bool, eps: float, ridge: str
) -> tuple[Tensor, Tensor, float]:
    """(τ̃_t (D1, D2), Σ_t (D2, D2), ε_t) for one task vector τ_t (D1, D2)."""
    centred = delta - delta.mean(dim=0, keepdim=True)
    s = centred.T @ centred
    trace = float(torch.trace(s)) + 1e-12
    sigma = s / trace if hetero else s
    if ridge == "absolute":
        eps_t = eps / trace if hetero else eps
    else:
        eps_t = eps * float(torch.trace(sigma)) / s.shape[0]
    return centred, sigma, eps_t


def collective_prior(sigma_sum: Tensor, prior: str, scale: float) -> Tensor:
    """c_agg (broadcastable to (D2, D2)) from Σ_t Σ_t, divided by ``scale``."""
    if prior == "code":
        return sigma_sum.mean(dim=0, keepdim=True) / scale  # (1, D2): added to every row
    d2 = sigma_sum.shape[0]
    eye = torch.eye(d2, dtype=sigma_sum.dtype, device=sigma_sum.device)
    return (float(torch.trace(sigma_sum)) / d2 / scale) * eye


def ace_quadratic(
    deltas: Sequence[Tensor], params: AceParams, hetero: bool
) -> tuple[Quadratic, Tensor | None]:
    """ACE's Gram source: the primitive with G_t = Σ_t^ε on the centred τ̃_t, A += c_agg;
    X₀ = 0 so R₀ = −B. Also R = Σ τ_t (Σ_t − Σ̄) (D1, D2) for the refinement when hetero,
    accumulated as Σ τ_t Σ_t − (Σ τ_t) Σ̄ so that no per-task Σ_t is kept."""
    d1, d2 = deltas[0].shape
    like = {"dtype": deltas[0].dtype, "device": deltas[0].device}
    eye = torch.eye(d2, **like)
    a, sigma_sum = torch.zeros(d2, d2, **like), torch.zeros(d2, d2, **like)
    b, spread = torch.zeros(d1, d2, **like), torch.zeros(d1, d2, **like)
    for d in deltas:
        centred, sigma, eps_t = task_covariance(
            d, hetero=hetero, eps=params.eps, ridge=params.ridge
        )
        ridged = sigma + eps_t * eye
        b += centred @ ridged
        a += ridged
        sigma_sum += sigma
        if hetero:
            spread += d @ sigma
    scale = sum(float(d.square().sum()) for d in deltas) / len(deltas) + 1e-12 if hetero else 1.0
    gram = a + collective_prior(sigma_sum, params.prior, scale)
    q = Quadratic(init=torch.zeros_like(b), residual=-b, gram=gram)
    target = spread - torch.stack(list(deltas)).sum(dim=0) @ (a / len(deltas)) if hetero else None
    return q, target


def isotropic_refinement(w: Tensor, target: Tensor, fraction: float) -> Tensor:
    """W + mean(S[:k]) U_k V_kᵀ for U S Vᵀ = svd(R + W), k = ⌊fraction · min(D1, D2)⌋ (the
    authors' ``int``); no refinement when k = 0 (their code takes the mean of nothing: NaN)."""
    u, s, vh = torch.linalg.svd(target + w, full_matrices=False)
    k = int(s.numel() * fraction)
    if k == 0:
        return w
    return w + s[:k].mean() * (u[:, :k] @ vh[:k])


def ace_merge(deltas: Sequence[Tensor], params: AceParams) -> Tensor:
    """The merged task vector (D1, D2) of one weight."""
    if negligible(deltas):
        return mean(deltas)
    hetero = heterogeneity(deltas) > params.hetero_threshold
    q, target = ace_quadratic(deltas, params, hetero)
    w = solve_exact(q)  # B A⁻¹ as a linear solve (the authors invert A), pinv if singular
    return w if target is None else isotropic_refinement(w, target, params.refine_fraction)


def ace(base, tensors, params: AceParams, model_params, ctx):
    return merge_matrices(base, tensors, params, ctx, lambda deltas: ace_merge(deltas, params))


register(
    Method(
        name="ace",
        fn=ace,
        summary="ACE-Merging: covariance merge with centred, adaptively normalised task Grams.",
        reference="https://arxiv.org/abs/2603.02945",
        params=AceParams,
        notes="Data-free. Per 2-D weight (out, in); other tensors get the mean task vector. "
        "Defaults ridge: relative (scale-free; the authors' absolute eps swamps small "
        "fine-tunes), prior: code, side: input. ridge: absolute + prior: code reproduce the "
        "authors' code; add side: output for what it computes on GPT-2 (Conv1D as stored).",
    )
)
