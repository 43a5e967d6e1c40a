"""The covariance family: one primitive ``τ* = (Σ τ_i G_i)(Σ G_i)⁻¹`` per 2-D weight.

Every method of the family minimises, for one weight matrix, the quadratic

    L(X) = Σ_i ‖(X − τ_i) G_i^{1/2}‖²       X, τ_i: (D1, D2) = (out, in);  G_i: (D2, D2) PSD

whose gradient is 2(X A − B) with A = Σ G_i, B = Σ τ_i G_i and whose minimiser is B A⁻¹
(ALGORITHMS.md §3). The methods differ in two plug-ins:

* the **Gram source**: RegMean's data Grams (``regmean.py``), WUDI's proxy
  G_i = τ_iᵀτ_i/‖τ_i‖² (:func:`wudi_quadratic`, 2503.08099), ACE's centred, normalised, ridged
  estimate with a collective prior (``ace.py``, 2603.02945);
* the **solver**: exact (:func:`solve_exact`), Adam iterations (:func:`solve_adam`, WUDI), a
  spectral filter of the gradient flow (:func:`solve_spectral`, SWUDI / SWUDI-A, 2606.07289)
  and ACE's isotropic refinement (``ace.py``).

A :class:`Quadratic` is kept as its start point X₀ and the half-gradient there,
R₀ = X₀A − B, which the Gram source computes from the τ_i directly (Σ_i (X₀ − τ_i) G_i)
instead of as the difference of the two large products X₀A and B: solvers move X₀ by
−R₀·(…), so identical experts stay bit-exact and the gradient equals FusionBench's autograd
gradient of the loss to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

TINY = 1e-12
"""Squared norms below this count as zero (the SWUDI authors' guard)."""
EIGEN_FLOOR = 1e-8
"""λ̃ = max(λ, 1e-8) in the filters (SWUDI's ``min_eigenvalue``)."""


def exact_solve(deltas: Sequence[Tensor], grams: Sequence[Tensor]) -> Tensor:
    """τ* = (Σ τ_i G_i)(Σ G_i)⁻¹ for task vectors τ_i (out, in) and symmetric PSD Grams
    G_i (in, in). Solved as a linear system (Cholesky/LU), falling back to the pseudo-inverse
    when Σ G_i is singular."""
    num = sum(d @ g for d, g in zip(deltas, grams, strict=True))
    den = sum(grams)
    return right_solve(num, den)


def right_solve(num: Tensor, den: Tensor) -> Tensor:
    """X with X den = num (num (D1, D2), den (D2, D2), not necessarily symmetric); the
    minimum-norm least-squares X = num den⁺ when den is singular."""
    try:
        return torch.linalg.solve(den, num, left=False)
    except RuntimeError:  # singular
        return num @ torch.linalg.pinv(den)


def negligible(deltas: Sequence[Tensor]) -> bool:
    """All task vectors (numerically) zero: every method of the family returns their mean."""
    return all(float(d.square().sum()) < TINY for d in deltas)


def mean(deltas: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(deltas)).mean(dim=0)


def initial(deltas: Sequence[Tensor], init: str) -> Tensor:
    """The start point X₀: ``sum`` (WUDI, SWUDI), ``mean`` or ``zero``."""
    if init == "zero":
        return torch.zeros_like(deltas[0])
    total = torch.stack(list(deltas)).sum(dim=0)
    return total / len(deltas) if init == "mean" else total


@dataclass(frozen=True)
class Quadratic:
    """L(X) = Σ_i ‖(X − τ_i) G_i^{1/2}‖², stored as what the solvers need."""

    init: Tensor
    """X₀ (D1, D2): where the iterative and filtered solvers start."""
    residual: Tensor
    """R₀ = X₀A − B (D1, D2): half the gradient of L at X₀."""
    gram: Tensor | None
    """A = Σ G_i (D2, D2); ``None`` when only ``factor`` was built (the small-Gram path)."""
    factor: Tensor | None = None
    """F (m, D2) with FᵀF = A, or ``None``: lets :func:`spectrum` eigendecompose the
    (m, m) Gram F Fᵀ instead of A when m < D2."""

    def full_gram(self) -> Tensor:
        if self.gram is not None:
            return self.gram
        assert self.factor is not None
        return self.factor.T @ self.factor


def proxy_weights(deltas: Sequence[Tensor]) -> list[float]:
    """w_i = 1/max(‖τ_i‖², 1e-12): WUDI's proxy Gram is G_i = w_i τ_iᵀτ_i, so tr A = N."""
    return [1.0 / max(float(d.square().sum()), TINY) for d in deltas]


def wudi_quadratic(
    deltas: Sequence[Tensor], init: Tensor, *, gram: bool = True, factor: bool = False
) -> Quadratic:
    """WUDI's loss L(X) = Σ_i ‖(X − τ_i) τ_iᵀ‖²/‖τ_i‖² (2503.08099), i.e. the primitive with
    the proxy Gram G_i = τ_iᵀτ_i/‖τ_i‖²: A = C = Σ w_i τ_iᵀτ_i (D2, D2) and
    B = D = Σ w_i τ_i τ_iᵀτ_i (D1, D2). ``gram=False`` skips C (N·D1·D2² flops, D2² memory)
    for solvers that use ``factor`` F = [√w_1 τ_1; …; √w_N τ_N] (N·D1, D2) instead."""
    weights = proxy_weights(deltas)
    d1, d2 = deltas[0].shape
    residual = torch.zeros_like(init)
    c = torch.zeros(d2, d2, dtype=init.dtype, device=init.device) if gram else None
    for w, d in zip(weights, deltas, strict=True):
        gi = d.T @ d if (gram or d1 > d2) else None  # (D2, D2)
        if c is not None:
            c += w * gi
        # (X₀ − τ_i) τ_iᵀ τ_i, multiplied in the cheaper order
        residual += w * ((init - d) @ gi if gi is not None else ((init - d) @ d.T) @ d)
    f = (
        torch.cat([d * math.sqrt(w) for w, d in zip(weights, deltas, strict=True)])
        if factor
        else None
    )
    return Quadratic(init=init, residual=residual, gram=c, factor=f)


def solve_exact(q: Quadratic) -> Tensor:
    """The minimiser X₀ − R₀ A⁻¹ = B A⁻¹ (pseudo-inverse when A is singular)."""
    return q.init - right_solve(q.residual, q.full_gram())


def solve_adam(q: Quadratic, *, iterations: int, lr: float) -> Tensor:
    """``iterations`` Adam steps (β 0.9/0.999, eps 1e-8, no weight decay) on L from X₀, as
    WUDI (2503.08099) and FusionBench run it. The gradient is the closed form
    2(R₀ + (X − X₀) A) — the autograd gradient of L to rounding, at one (D1, D2)·(D2, D2)
    product per step instead of 3N (D1, D2)·(D2, D1) ones — so no autograd graph is needed
    and the engine's ``no_grad`` does not matter."""
    a = q.full_gram()
    x = q.init.clone()
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    for step in range(1, iterations + 1):
        adam_step(x, 2 * (q.residual + (x - q.init) @ a), m, v, step=step, lr=lr)
    return x


def adam_step(
    x: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """One step of ``torch.optim.Adam`` (its single-tensor CPU path, operation for operation),
    in place on x, m, v. Hand-written because the optimizer object costs ~1 ms per step."""
    b1, b2 = betas
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (v.sqrt() / (1 - b2**step) ** 0.5).add_(eps)
    x.addcdiv_(m, denom, value=-lr / (1 - b1**step))


@dataclass(frozen=True)
class Spectrum:
    """Eigen-decomposition of A for the spectral solvers."""

    values: Tensor
    """(D2,) eigenvalues, descending; numerically-null ones (≤ λ_max·D2·eps, the
    ``matrix_rank`` tolerance) are set to exactly 0."""
    vectors: Tensor
    """(D2, r) eigenvectors of the first r values; r ≥ the number of non-zero values, the
    remaining directions span A's null space."""
    rows: int
    """Rows m of the factor F (A = FᵀF), for rank rules that need the aspect ratio."""


def spectrum(q: Quadratic, *, small_gram: bool | None = None) -> Spectrum:
    """Eigenpairs of A: ``eigh(A)`` (D2³), or — ``small_gram``, default when the factor F
    (m, D2) has m < D2 — ``eigh(F Fᵀ)`` (m³): F Fᵀ = U diag(μ) Uᵀ gives A's non-zero
    eigenvalues μ and eigenvectors V = Fᵀ U diag(μ^{-1/2}). Exact: A's other eigenvalues are 0
    and every filter is 0 there (the gradient flow never moves along A's null space)."""
    f = q.factor
    rows = f.shape[0] if f is not None else q.residual.shape[0]
    if small_gram is None:
        small_gram = f is not None and f.shape[0] < f.shape[1]
    if small_gram:
        assert f is not None, "the small-Gram path needs the factor"
        mu, u = torch.linalg.eigh(f @ f.T)
        mu, u = mu.flip(0), u.flip(1)
        mu = _null_to_zero(mu, f.shape[1])
        r = int((mu > 0).sum())
        vectors = (f.T @ u[:, :r]) / mu[:r].sqrt()
        values = torch.cat([mu, mu.new_zeros(max(f.shape[1] - mu.numel(), 0))])[: f.shape[1]]
        return Spectrum(values=values, vectors=vectors, rows=rows)
    lam, v = torch.linalg.eigh(q.full_gram())
    lam, v = lam.flip(0), v.flip(1)
    return Spectrum(values=_null_to_zero(lam, lam.numel()), vectors=v, rows=rows)


def _null_to_zero(values: Tensor, n: int) -> Tensor:
    """Eigenvalues at rounding level of the largest become exactly 0 (and negatives too)."""
    tol = float(values.max().clamp(min=0)) * n * torch.finfo(values.dtype).eps
    return torch.where(values > tol, values, torch.zeros_like(values))


def solve_spectral(q: Quadratic, spec: Spectrum, gain: Tensor) -> Tensor:
    """X = X₀ − R₀ V diag(f/λ̃) Vᵀ for a filter ``gain`` f (D2,) on the eigenvalues of A
    (λ̃ = max(λ, 1e-8)). f = 1 − e^{−λt} is the gradient flow Ẋ = −(XA − B) at time t; f = 1
    everywhere is the exact B A⁻¹; f = 0 keeps X₀. Equals the SWUDI authors'
    X₀(I − V f Vᵀ) + B V (f/λ̃) Vᵀ (2606.07289) on A's range, where R₀ V = X₀ V λ − B V."""
    keep = torch.nonzero(gain[: spec.vectors.shape[1]] > 0).flatten()
    if keep.numel() == 0:
        return q.init.clone()
    v = spec.vectors[:, keep]  # (D2, k)
    scale = gain[keep] / spec.values[keep].clamp(min=EIGEN_FLOOR)  # (k,)
    return q.init - ((q.residual @ v) * scale) @ v.T
