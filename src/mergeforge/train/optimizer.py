"""UMTAM, the merge-ready optimizer (arXiv 2512.17109; reference code ``gantayatss/UMTAM``).

Per matrix W (m×n; a weight with more dimensions is viewed as (shape[0], rest)) it keeps a rank-r
momentum U Σ Vᵀ with a dense error-feedback buffer E, Adafactor-style row / column second
moments R (m), C (n), and preconditions element-wise (../shared/ALGORITHMS.md §4). One step, with
G the gradient clipped to norm ``grad_clip`` and ‖G‖ its norm before clipping::

    W ← W (1 − η λ)                                   decoupled weight decay
    M̃ = β₁ U Σ Vᵀ + (1 − β₁) G + γ E                  on refresh steps (below)
    U Σ Vᵀ = SVD_r(M̃);  E = M̃ − U Σ Vᵀ
    R = β₂ R + (1 − β₂) rowsum(G²);  C = β₂ C + (1 − β₂) colsum(G²)     (stable: ≥ stat_min)
    Ŝ = R Cᵀ / (sum(R) + ε);  ε_t = ε max(1, ‖G‖ / ‖W‖);  P = (Ŝ + ε_t)^(−1/2)   (stable: ≤ 10)
    W ← W − η P ⊙ U Σ Vᵀ                               (stable: ‖η P ⊙ U Σ Vᵀ‖ ≤ 1)
    S = α S + (1 − α) (W − W₀)² ⊙ √(R Cᵀ)              only with track_saliency=True

Vectors (biases, norms), scalars and the parameters of a group with ``factored=False`` take
exactly ``torch.optim.AdamW`` (bias-corrected moments ``exp_avg``, ``exp_avg_sq``), on the
gradient clipped per tensor like the matrices (``grad_clip=None``: no clipping, bit-identical to
AdamW). The paper's defaults are the keyword defaults (lr 1e-3, rank 32, β (0.9, 0.999), γ 0.9,
ε 1e-8, α 0.99, clipping at norm 1, SVD every step, no weight decay); :meth:`UMTAM.stable` gives
the authors' stabilised variant (``src/umtam_optimizer_stable.py``: lr 1e-4, SVD every 10 steps,
R, C ≥ 1e-4, P ≤ 10, ‖update‖ ≤ 1). As in the paper and their code, the factored path has no
bias correction (the momentum and R, C start small), Ŝ's denominator carries + ε (their code; the
paper writes sum(R)), and R, C start at ε (stable: 1e-4).

Between refreshes (``svd_every`` k > 1; the authors' stable variant uses k = 10) the authors' code
forms M̃ and throws it away: U Σ Vᵀ and E stay fixed, the update uses the held momentum, and the
gradients of those steps reach only R and C. That is ``between_refreshes="hold"``, the default.
``"feedback"`` (ours) instead keeps the error-feedback identity E = M̃ − U Σ Vᵀ on every step,
E ← γ E + β₁ U Σ Vᵀ + (1 − β₁) G − U Σ Vᵀ with the held factors, so no gradient is lost: the next
refresh sees it. With k = 1 the two are the same. (Under "hold" the stable variant's momentum
sees one gradient in ten; with its P ≤ 10 clamp it trains far more slowly than AdamW at the same
learning rate: BENCHMARKS.md §6.)

State per m×n matrix, in floats (r = min(rank, m, n); the parameter's dtype):

======================  =======================  ===========================================
buffer                  floats                   when
======================  =======================  ===========================================
E (error feedback)      m n                      always
U, Σ, V (momentum)      r (m + n + 1)            always (Σ kept as a vector, not r × r)
R, C (second moments)   m + n                    always
step                    1                        always
S (EMA saliency)        m n                      ``track_saliency=True``
W₀ (initial weights)    m n                      ``track_saliency=True``
======================  =======================  ===========================================

So m n + r (m + n + 1) + m + n against AdamW's 2 m n: for a 384 × 384 matrix at r = 32, 0.59 of
AdamW's state (1536 × 384: 0.55). The authors' implementation keeps E, S and W₀ dense and Σ as an
r × r matrix: 3 m n + r (m + n + r) + m + n, their "+30 %". Saliency need not be held: the
artifact's S = (W_T − W₀)² ⊙ √(R ⊗ C) is computed at merge / prune time from the trained weights,
the base checkpoint on disk and the exported R, C (issue 14). ``track_saliency=True`` keeps the
paper's EMA variant, at 2 m n more. Transient, per matrix and freed after it: U Σ Vᵀ and P
(2 m n), G² (m n), and the SVD's workspace (exact: up to 2 m n; randomized: (m + n)(r + p)).
Time: an exact SVD of every matrix on every step doubles a MiniLM fine-tuning step on CPU; the
randomized SVD (1.19×) or ``svd_every=10`` (1.08×) stay within 1.25× of AdamW (BENCHMARKS.md §6);
on SmolLM2-135M the randomized SVD is 1.34–1.40× and the warm-started ``svd="subspace"`` 1.22×.

Deviations from the authors' code (``archive/src/umtam_optimizer.py`` and the stable file):

* Momentum starts at zero (U, Σ, V = 0), not at random factors, and the first step refreshes
  (steps 1, 1 + k, 1 + 2k, …; theirs: k, 2k, …, moving the weights along random factors before
  the first SVD). Deterministic, uses no random numbers, and with full rank, γ = 0 and k = 1 the
  momentum is the exact EMA of the clipped gradients.
* Σ is stored as a vector (r floats, not r × r); W₀ and S are held only with ``track_saliency``.
* ``svd="randomized"`` (optional; default ``"exact"``, theirs): a Halko-Martinsson-Tropp range
  finder with ``oversample`` extra columns and ``power_iters`` subspace iterations, drawn from a
  private generator seeded by (``seed``, step, parameter index), so the user's RNG stream
  (dropout) is untouched and runs are reproducible.
* ``svd="subspace"`` (ours, optional): the momentum moves little between refreshes, so each
  refresh after the first runs *one* subspace iteration from the previous right factor V plus
  ``oversample`` Gaussian columns, then a Rayleigh-Ritz step (QR of M̃ [V, Ω], SVD of the small
  Qᵀ M̃): two products with M̃ instead of the range finder's 2 + 2 ``power_iters``. Over the
  refreshes this is block power iteration on a slowly changing matrix; what a refresh misses
  stays in E (error feedback), as with any truncation. The first refresh is ``randomized``'s.
* A non-finite gradient raises :class:`~mergeforge.errors.ValidationError` naming the parameter,
  before any parameter is changed (theirs: the NaN propagates into the weights).
* The 1-D path is torch's AdamW step (``lerp_`` first moment): the authors' ``mul_/add_`` is the
  same formula, different rounding.
* Half-precision parameters keep their state in their dtype (as AdamW does); the SVD runs in fp32.
* (from the paper, not their code) ε_t = ε max(1, ‖G‖ / ‖W‖) takes ‖G‖ before clipping, as the
  authors' code does (confirmed by its author); the paper and ALGORITHMS.md §4 write it after
  "clip G to norm 1", where ‖G‖ ≤ 1 would make ε_t = ε for every ‖W‖ ≥ 1.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergeforge.errors import ConfigError, ValidationError

__all__ = ["UMTAM", "STABLE", "umtam", "adamw"]

SOURCE = "umtam-optimizer"
REFRESH_MODES = ("hold", "feedback")
SVD_MODES = ("exact", "randomized", "subspace")
_FACTORED_KEYS = ("gamma", "alpha", "svd_every", "between_refreshes", "svd", "oversample",
                  "power_iters", "stat_min", "max_precond", "max_update_norm")  # fmt: skip
# The authors' stabilised variant (gantayatss/UMTAM: src/umtam_optimizer_stable.py).
STABLE: Mapping[str, Any] = {
    "lr": 1e-4,
    "svd_every": 10,
    "stat_min": 1e-4,
    "max_precond": 10.0,
    "max_update_norm": 1.0,
}


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"UMTAM: {name} must be {rule}, got {value!r}")


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _validate(h: Mapping[str, Any]) -> None:
    """Every hyper-parameter of a group (defaults merged in), with the offending name."""
    _check(_is_num(h["lr"]) and h["lr"] >= 0, "lr", "a finite number >= 0", h["lr"])
    betas = h["betas"]
    _check(isinstance(betas, (tuple, list)) and len(betas) == 2, "betas", "a pair", betas)
    for name, b in zip(("betas[0]", "betas[1]"), betas, strict=True):
        _check(_is_num(b) and 0 <= b < 1, name, "in [0, 1)", b)
    for name in ("gamma", "alpha"):
        _check(_is_num(h[name]) and 0 <= h[name] < 1, name, "in [0, 1)", h[name])
    _check(_is_num(h["eps"]) and h["eps"] > 0, "eps", "a finite number > 0", h["eps"])
    for name in ("weight_decay", "stat_min"):
        _check(_is_num(h[name]) and h[name] >= 0, name, "a finite number >= 0", h[name])
    for name in ("rank", "svd_every", "power_iters", "oversample"):
        low = 0 if name in ("power_iters", "oversample") else 1
        v = h[name]
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= low, name,
               f"an integer >= {low}", v)  # fmt: skip
    for name in ("grad_clip", "max_precond", "max_update_norm"):
        v = h[name]
        _check(v is None or (_is_num(v) and v > 0), name, "None (off) or a number > 0", v)
    for name, modes in (("between_refreshes", REFRESH_MODES), ("svd", SVD_MODES)):
        _check(h[name] in modes, name, f"one of {modes}", h[name])
    for name in ("factored", "track_saliency"):
        _check(isinstance(h[name], bool), name, "True or False", h[name])
    _check(isinstance(h["seed"], int) and not isinstance(h["seed"], bool), "seed", "an integer",
           h["seed"])  # fmt: skip


# --- the functional kernels -----------------------------------------------------------------


def _as_matrix(t: Tensor) -> Tensor:
    """(shape[0], rest) view of a weight with two or more dimensions (a copy if not viewable)."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def _clipped(g: Tensor, norm: float, grad_clip: float | None) -> Tensor:
    """The gradient scaled to norm ``grad_clip`` when it is above (a new tensor; never in place)."""
    if grad_clip is not None and norm > grad_clip:
        return g * (grad_clip / norm)
    return g


def truncated_svd(
    a: Tensor,
    rank: int,
    *,
    method: str,
    oversample: int,
    power_iters: int,
    seed: int,
    start: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(U (m, r), σ (r,), V (n, r)) of the best rank-``rank`` approximation of ``a`` (m, n):
    ``torch.linalg.svd`` (``exact``) or a randomized range finder (``randomized``, see the module
    docstring). ``subspace`` with ``start`` (n, r), the right factor of the previous refresh:
    one subspace iteration warm-started from it, the test matrix ``[start, Gaussian (n,
    oversample)]`` and no power iterations (``start=None``, the first refresh: as
    ``randomized``). 16-bit inputs are factored in fp32 and the factors returned in ``a``'s
    dtype."""
    x = a.float() if a.element_size() < 4 else a
    m, n = x.shape
    if method in ("randomized", "subspace") and rank + oversample < min(m, n):
        gen = torch.Generator(device=x.device).manual_seed(seed)
        warm = method == "subspace" and start is not None
        cols = oversample if warm else rank + oversample
        omega = torch.randn(n, cols, generator=gen, device=x.device, dtype=x.dtype)
        if warm:
            omega = torch.cat([start.to(x.dtype), omega], dim=1)
        q = torch.linalg.qr(x @ omega).Q  # (m, k): an orthonormal basis of the range
        for _ in range(0 if warm else power_iters):  # sharpens a slowly decaying spectrum
            q = torch.linalg.qr(x @ torch.linalg.qr(x.mT @ q).Q).Q
        ub, s, vh = torch.linalg.svd(q.mT @ x, full_matrices=False)  # (k, n): small
        u = q @ ub[:, :rank]
    else:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        u = u[:, :rank]
    return u.to(a.dtype), s[:rank].to(a.dtype), vh[:rank].mT.to(a.dtype)


def umtam(
    params: list[Tensor],
    grads: list[Tensor],
    grad_norms: list[float],
    states: list[dict[str, Tensor]],
    seeds: list[int],
    *,
    lr: float,
    betas: tuple[float, float],
    gamma: float,
    eps: float,
    alpha: float,
    weight_decay: float,
    grad_clip: float | None,
    svd_every: int,
    between_refreshes: str,
    svd: str,
    oversample: int,
    power_iters: int,
    stat_min: float,
    max_precond: float | None,
    max_update_norm: float | None,
) -> None:
    """One UMTAM step of every matrix in ``params`` (in place), the formulas of the module
    docstring. ``grad_norms`` are the gradients' norms before clipping (already checked finite);
    ``states`` hold ``step``, ``U``, ``sigma``, ``V``, ``E``, ``R``, ``C`` (and ``S``, ``W0``)."""
    beta1, beta2 = betas
    for p, g, gnorm, st, seed in zip(params, grads, grad_norms, states, seeds, strict=True):
        w = _as_matrix(p)  # (m, n); a view for contiguous parameters
        grad = _clipped(_as_matrix(g), gnorm, grad_clip).to(p.dtype)
        u, sigma, v, e, r, c = (st[k] for k in ("U", "sigma", "V", "E", "R", "C"))
        st["step"] += 1
        t = int(st["step"].item())
        if weight_decay != 0:
            w.mul_(1 - lr * weight_decay)

        momentum = (u * sigma) @ v.mT  # U Σ Vᵀ, (m, n)
        if (t - 1) % svd_every == 0:  # refresh: E := M̃, factor it, keep the residual
            e.mul_(gamma).add_(momentum, alpha=beta1).add_(grad, alpha=1 - beta1)
            u_new, s_new, v_new = truncated_svd(
                e, u.shape[1], method=svd, oversample=oversample, power_iters=power_iters,
                seed=seed * 1_000_003 + t, start=v if t > 1 else None,
            )  # fmt: skip
            u.copy_(u_new)
            sigma.copy_(s_new)
            v.copy_(v_new)
            momentum = (u * sigma) @ v.mT
            e.sub_(momentum)
        elif between_refreshes == "feedback":  # E = M̃ − U Σ Vᵀ with the held factors
            e.mul_(gamma).add_(grad, alpha=1 - beta1).add_(momentum, alpha=beta1 - 1)

        g2 = grad.square()
        r.mul_(beta2).add_(g2.sum(dim=1), alpha=1 - beta2)
        c.mul_(beta2).add_(g2.sum(dim=0), alpha=1 - beta2)
        del g2
        if stat_min > 0:
            r.clamp_(min=stat_min)
            c.clamp_(min=stat_min)

        # ε_t = ε max(1, ‖G‖/‖W‖), ε alone when ‖W‖ ≤ ε (the authors' guard), on the device
        wnorm = torch.linalg.vector_norm(w)
        ratio = torch.clamp(gnorm / torch.clamp(wnorm, min=eps), min=1.0)
        eps_t = torch.where(wnorm > eps, eps * ratio, torch.full_like(ratio, eps))
        update = torch.outer(r, c).div_(r.sum() + eps).add_(eps_t).rsqrt_()  # P, (m, n)
        if max_precond is not None:
            update.clamp_(max=max_precond)
        update.mul_(momentum)  # P ⊙ U Σ Vᵀ
        del momentum
        if max_update_norm is not None:  # ‖η P ⊙ M‖ ≤ max_update_norm
            norm = lr * torch.linalg.vector_norm(update)
            update.mul_(torch.clamp(max_update_norm / norm, max=1.0))
        w.add_(update, alpha=-lr)
        del update

        if "S" in st:  # the paper's EMA saliency, (W − W₀)² ⊙ √(R Cᵀ)
            dev = (w - st["W0"]).square_().mul_(torch.outer(r, c).sqrt_())
            st["S"].mul_(alpha).add_(dev, alpha=1 - alpha)
        if w.data_ptr() != p.data_ptr():  # a non-contiguous parameter: write the copy back
            p.copy_(w.view(p.shape))


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    grad_norms: list[float],
    states: list[dict[str, Tensor]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    grad_clip: float | None,
) -> None:
    """``torch.optim.AdamW``'s single-tensor step (torch/optim/adam.py), operation for operation,
    on the gradient clipped to ``grad_clip`` per tensor: bit-identical with ``grad_clip=None``."""
    beta1, beta2 = betas
    for p, g, gnorm, st in zip(params, grads, grad_norms, states, strict=True):
        grad = _clipped(g, gnorm, grad_clip)
        exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
        st["step"] += 1
        step = st["step"].item()
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)


def _norms(grads: list[Tensor]) -> list[float]:
    """Each gradient's norm as a float, with one host transfer per device."""
    out: list[float] = [0.0] * len(grads)
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        by_device.setdefault(g.device, []).append(i)
    for idx in by_device.values():
        vals = torch.stack([torch.linalg.vector_norm(grads[i]).double() for i in idx]).tolist()
        for i, val in zip(idx, vals, strict=True):
            out[i] = val
    return out


# --- the optimizer ---------------------------------------------------------------------------


class UMTAM(torch.optim.Optimizer):
    """The merge-ready optimizer of the module docstring: low-rank momentum with error feedback
    and a factored (Adafactor-style) preconditioner for every matrix, AdamW for the rest; its
    R, C are the curvature statistics a merge reads (:meth:`curvature_state`, :meth:`export`).

    Pass ``model.named_parameters()`` (or groups with names) so errors and the export name the
    parameters. Every hyper-parameter is keyword-only and can be set per parameter group;
    ``factored=False`` in a group sends its matrices down the AdamW path (an embedding whose SVD
    you do not want to pay for, say). ``grad_clip``, ``max_precond``, ``max_update_norm``:
    ``None`` turns the clamp off. ``seed`` seeds the randomized SVD only (``svd="randomized"``
    or ``"subspace"``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float = 1e-3,
        rank: int = 32,
        betas: tuple[float, float] = (0.9, 0.999),
        gamma: float = 0.9,
        eps: float = 1e-8,
        alpha: float = 0.99,
        weight_decay: float = 0.0,
        grad_clip: float | None = 1.0,
        svd_every: int = 1,
        between_refreshes: str = "hold",
        svd: str = "exact",
        oversample: int = 8,
        power_iters: int = 2,
        stat_min: float = 0.0,
        max_precond: float | None = None,
        max_update_norm: float | None = None,
        track_saliency: bool = False,
        factored: bool = True,
        seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr, rank=rank, betas=tuple(betas) if isinstance(betas, list) else betas,
            gamma=gamma, eps=eps, alpha=alpha, weight_decay=weight_decay, grad_clip=grad_clip,
            svd_every=svd_every, between_refreshes=between_refreshes, svd=svd,
            oversample=oversample, power_iters=power_iters, stat_min=stat_min,
            max_precond=max_precond, max_update_norm=max_update_norm,
            track_saliency=track_saliency, factored=factored, seed=seed,
        )  # fmt: skip
        _validate(defaults)
        super().__init__(params, defaults)

    @classmethod
    def stable(cls, params: Iterable[Any], **overrides: Any) -> UMTAM:
        """The authors' stabilised variant (:data:`STABLE`: lr 1e-4, SVD every 10 steps,
        R, C ≥ 1e-4, P ≤ 10, ‖update‖ ≤ 1); ``overrides`` are any other keyword of ``UMTAM``."""
        return cls(params, **{**STABLE, **overrides})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _validate({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    def _name(self, group: Mapping[str, Any], i: int, p: Tensor) -> str:
        names = group.get("param_names")
        if names:
            return names[i]
        g = next(j for j, pg in enumerate(self.param_groups) if pg is group)
        return f"parameter {i} of group {g} (shape {tuple(p.shape)}; pass named_parameters())"

    def _init_state(self, group: Mapping[str, Any], p: Tensor) -> dict[str, Tensor]:
        st = self.state[p]
        if st:
            return st
        st["step"] = torch.tensor(0.0, dtype=torch.float32)  # as AdamW keeps it
        if group["factored"] and p.dim() >= 2:
            m, n = p.shape[0], p.numel() // p.shape[0]
            r = min(group["rank"], m, n)
            z = dict(device=p.device, dtype=p.dtype)
            st["U"] = torch.zeros(m, r, **z)  # momentum factors: zero, refreshed on step 1
            st["sigma"] = torch.zeros(r, **z)
            st["V"] = torch.zeros(n, r, **z)
            st["E"] = torch.zeros(m, n, **z)
            init = max(group["eps"], group["stat_min"])  # the authors' start: ε (stable: 1e-4)
            st["R"], st["C"] = torch.full((m,), init, **z), torch.full((n,), init, **z)
            if group["track_saliency"]:
                st["W0"] = _as_matrix(p.detach()).clone()
                st["S"] = torch.zeros(m, n, **z)
        else:
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One step over every parameter with a gradient. Raises :class:`ValidationError` naming
        the first parameter whose gradient is not finite, before any parameter changes."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # every parameter with a gradient: (group, index in the group, index over all groups)
        pending: list[tuple[dict[str, Any], int, int, Tensor]] = []
        flat = 0
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise ValidationError(f"UMTAM: {self._name(group, i, p)} has a sparse "
                                              "gradient; UMTAM needs dense gradients")  # fmt: skip
                    pending.append((group, i, flat, p))
                flat += 1
        norms = _norms([p.grad for *_, p in pending])  # before clipping: clip, ε_t, this check
        for (group, i, _, p), norm in zip(pending, norms, strict=True):
            if not math.isfinite(norm):
                step = int(self.state[p]["step"].item()) + 1 if self.state.get(p) else 1
                raise ValidationError(
                    f"UMTAM: the gradient of {self._name(group, i, p)} is not finite "
                    f"(NaN or inf; norm {norm}) at step {step}; no parameter was updated. Lower "
                    "the learning rate, try UMTAM.stable(...), or skip the batch "
                    "(torch.amp.GradScaler skips such steps)."
                )

        for group in self.param_groups:
            mats: dict[str, list] = {k: [] for k in ("params", "grads", "grad_norms", "states")}
            vecs: dict[str, list] = {k: [] for k in ("params", "grads", "grad_norms", "states")}
            seeds: list[int] = []
            for (g, _, index, p), norm in zip(pending, norms, strict=True):
                if g is not group:
                    continue
                st = self._init_state(group, p)
                batch = mats if "E" in st else vecs
                for key, x in zip(batch, (p, p.grad, norm, st), strict=True):
                    batch[key].append(x)
                if batch is mats:
                    seeds.append(group["seed"] * 7919 + index)
            common = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "grad_clip")}
            if mats["params"]:
                umtam(**mats, seeds=seeds, **common,
                      **{k: group[k] for k in _FACTORED_KEYS})  # fmt: skip
            if vecs["params"]:
                adamw(**vecs, **common)
        return loss

    # --- memory and export ----------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes held in the optimizer's state (every state tensor; not the parameters)."""
        return sum(
            t.numel() * t.element_size()
            for st in self.state.values()
            for t in st.values()
            if isinstance(t, Tensor)
        )

    def curvature_state(
        self, *, examples: int | None = None, model: nn.Module | None = None
    ) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The curvature artifact's tensors and metadata (the contract of issue 14):
        ``NAME:R`` (m,) and ``NAME:C`` (n,) per matrix, ``NAME:R`` (the parameter's shape: AdamW's
        ``exp_avg_sq``) per vector, ``NAME:S`` (the parameter's shape) with ``track_saliency``.
        A matrix on the AdamW path (``factored=False``) exports the row / column sums of its
        ``exp_avg_sq``: the same EMA of row / column sums of G² (the EMA is linear). Names come
        from ``model.named_parameters()`` or the names given to the optimizer; parameters that
        never had a gradient are left out. ``examples``: the training examples seen (``None``:
        unknown). The metadata's ``umtam_settings`` (JSON of the defaults) is provenance beyond
        the contract; :meth:`export` passes the contract's fields on.
        """
        names: dict[int, str] = {}
        if model is not None:
            names = {id(p): n for n, p in model.named_parameters()}
        for group in self.param_groups:
            for n, p in zip(group.get("param_names") or (), group["params"], strict=False):
                names.setdefault(id(p), n)
        tensors: dict[str, Tensor] = {}
        steps, beta2s, saliency = 0, set(), False
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                if id(p) not in names:
                    raise ConfigError(
                        "UMTAM.curvature_state: a parameter has no name (shape "
                        f"{tuple(p.shape)}); build UMTAM(model.named_parameters(), ...) or pass "
                        "model=the module being trained"
                    )
                name = names[id(p)]
                steps, beta2s = max(steps, int(st["step"].item())), beta2s | {group["betas"][1]}
                if "E" in st:
                    tensors[f"{name}:R"], tensors[f"{name}:C"] = st["R"].clone(), st["C"].clone()
                    if "S" in st:
                        tensors[f"{name}:S"], saliency = st["S"].reshape(p.shape).clone(), True
                elif p.dim() >= 2:
                    v = _as_matrix(st["exp_avg_sq"])
                    tensors[f"{name}:R"], tensors[f"{name}:C"] = v.sum(dim=1), v.sum(dim=0)
                else:
                    tensors[f"{name}:R"] = st["exp_avg_sq"].clone()
        if len(beta2s) > 1:
            raise ConfigError(f"UMTAM.curvature_state: the groups use different betas[1] "
                              f"{sorted(beta2s)}; one artifact records one β₂")  # fmt: skip
        meta = {
            "kind": "curvature",
            "variant": "ema",
            "beta2": str(next(iter(beta2s), self.defaults["betas"][1])),
            "steps": str(steps),
            "examples": "unknown" if examples is None else str(int(examples)),
            "source": SOURCE,
            "has_saliency": "true" if saliency else "false",
            "has_exp_avg_sq": "false",
            "umtam_settings": json.dumps(self.defaults, sort_keys=True, default=str),
        }
        return tensors, meta

    def export(
        self,
        model_dir: str | os.PathLike[str],
        *,
        examples: int | None = None,
        model: nn.Module | None = None,
    ) -> Path:
        """Write :meth:`curvature_state` as ``model_dir``'s curvature sidecar (through
        ``mergeforge.train.artifact.save_curvature``, which checks every name and shape against
        the saved weights); call it after the model is saved there, so the sidecar's fingerprint
        is that of the saved weights. Returns the sidecar's path."""
        from mergeforge.train.artifact import Curvature, CurvatureMeta, save_curvature

        tensors, meta = self.curvature_state(examples=examples, model=model)
        fields: dict[str, dict[str, Tensor]] = {}
        for key, t in tensors.items():
            name, _, field = key.rpartition(":")
            fields.setdefault(name, {})[field] = t
        stats = {name: Curvature(**f) for name, f in fields.items()}
        return save_curvature(
            model_dir,
            stats,
            CurvatureMeta(variant="ema", steps=int(meta["steps"]), source=SOURCE,
                          beta2=float(meta["beta2"]), examples=examples),
        )  # fmt: skip
