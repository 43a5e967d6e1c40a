"""The SVD family (data-free): TSV-M, Iso-C and Iso-CTS.

Each merges the task vectors Δ_t = θ_t − θ₀ (t = 1..T) of a weight matrix (out, in), with
r = min(out, in), through singular value decompositions; every other tensor gets the mean task
vector (``non_matrix: mean``, as the reference), and θ = θ₀ + ``scaling``·Δ (:mod:`.matrix`).

* ``tsv`` (TSV-M; Gargiulo et al., CVPR 2025, arXiv 2412.00081): keep the top k = ⌊r/T⌋
  singular triplets of every Δ_t, stack them (Û (out, Tk), σ̂ (Tk,), V̂ᵀ (Tk, in)), replace Û
  and V̂ᵀ by their polar factors (Û = P S Qᵀ ↦ P Qᵀ) and return Û⊥ diag(σ̂) V̂⊥ᵀ.
* ``iso_c`` (Iso-C; Marczak et al., arXiv 2502.04959): Σ_t Δ_t = U diag(σ) Vᵀ ↦ mean(σ)·U Vᵀ.
* ``iso_cts`` (Iso-CTS, same paper): the top c singular vectors of Σ_t Δ_t (common subspace)
  plus, per task, the top s of Δ_t − U_c U_cᵀ Δ_t, with c + T·s = r and c ≈ f·r; the stacked
  U (out, r) and Vᵀ (r, in) are orthogonalised as in TSV-M and scaled by the mean of the r
  singular values kept.

We match FusionBench 0.2.33 (``TSVM_utils.compute_and_sum_svd_mem_reduction``,
``iso_utils.iso_c``/``iso_cts``) to float precision where the inputs have full rank. Where they
do not, singular vectors of σ = 0 are an arbitrary basis chosen by LAPACK, which the reference
lets into U Vᵀ and into the polar factors; we drop them (σ ≤ max(out, in)·eps·scale, the rule
of ``torch.linalg.matrix_rank``), so the result is well defined: T identical experts give the
rank-k truncation of Δ under TSV-M, and all-zero task vectors give θ₀ exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mergeforge.methods.base import Method, NoParams, register
from mergeforge.methods.checks import check_real
from mergeforge.methods.matrix import MatrixParams, merge_matrices


@dataclass(frozen=True)
class TSVParams(MatrixParams):
    """TSV-M's options: those of every matrix method (``scaling`` = the paper's α, 1.0)."""


@dataclass(frozen=True)
class IsoCParams(MatrixParams):
    """Iso-C's options. ``scaling`` 1.0 is FusionBench's default; the paper tunes α on
    validation data (about 1.0–1.5)."""


@dataclass(frozen=True)
class IsoCTSParams(MatrixParams):
    common_fraction: float = 0.8
    """f: share of the r directions given to the common subspace (the paper's 0.8)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("common_fraction", self.common_fraction, 0.0, 1.0)


def _rank(s: Tensor, shape: Sequence[int], scale: Tensor | None = None) -> int:
    """Number of singular values s (descending) above max(shape)·eps·scale (default s₁)."""
    if s.numel() == 0:
        return 0
    ref = s[0] if scale is None else scale
    return int((s > ref * max(shape) * torch.finfo(s.dtype).eps).sum())


def _polar(a: Tensor) -> Tensor:
    """Orthogonal polar factor P Qᵀ of a (m, n) = P S Qᵀ, on a's numerical range: (m, n)."""
    p, s, qh = torch.linalg.svd(a, full_matrices=False)
    j = _rank(s, a.shape)
    return p[:, :j] @ qh[:j]


def _orthogonal_merge(us: list[Tensor], weights: Tensor, vhs: list[Tensor], like: Tensor):
    """polar([U_1 …]) diag(weights) polar([Vh_1; …]): (out, in); zeros if nothing is kept."""
    if weights.numel() == 0:
        return torch.zeros_like(like)
    return (_polar(torch.cat(us, dim=1)) * weights) @ _polar(torch.cat(vhs, dim=0))


def tsv_solve(deltas: list[Tensor]) -> Tensor:
    """TSV-M on task vectors (out, in) → merged delta (out, in). k = ⌊r/T⌋ in integers (the
    reference's ``int(r * (1 / T))`` is one less for a few pairs, e.g. r = T = 49); matrices
    with r < T get k = 0 and stay at θ₀, as in the reference."""
    k = min(deltas[0].shape) // len(deltas)
    us, sigmas, vhs = [], [], []
    for d in deltas if k else ():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        j = min(k, _rank(s, d.shape))
        # copies, so that the full factors (out, r) and (r, in) are freed task by task
        us.append(u[:, :j].clone())
        sigmas.append(s[:j])
        vhs.append(vh[:j].clone())
    weights = torch.cat(sigmas) if sigmas else deltas[0].new_zeros(0)
    return _orthogonal_merge(us, weights, vhs, deltas[0])


def iso_c_solve(deltas: list[Tensor]) -> Tensor:
    """Iso-C: mean(σ) U Vᵀ of the sum Σ_t Δ_t (out, in), σ all r singular values."""
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    j = _rank(s, deltas[0].shape)
    return s.mean() * (u[:, :j] @ vh[:j])


def task_dims(r: int, tasks: int, fraction: float) -> int:
    """Directions per task s, so that c = r − T·s: the reference's c₀ = ⌊f·r⌋ and
    s = round((r − c₀)/T) (Python's half-to-even), capped at ⌊r/T⌋ so c ≥ 0 for small f."""
    return min(round((r - int(r * fraction)) / tasks), r // tasks)


def iso_cts_solve(deltas: list[Tensor], fraction: float) -> Tensor:
    """Iso-CTS on task vectors (out, in) → merged delta (out, in)."""
    shape, r = deltas[0].shape, min(deltas[0].shape)
    per_task = task_dims(r, len(deltas), fraction)
    common = r - per_task * len(deltas)
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    j = min(common, _rank(s, shape))
    uc = u[:, :j].clone()  # (out, j): the common subspace
    us, vhs, total = [uc], [vh[:j].clone()], s[:common].sum()
    del u, vh
    for d in deltas if per_task else ():
        # task-specific part: project off the common subspace (on the output side, as the paper)
        u_t, s_t, vh_t = torch.linalg.svd(d - uc @ (uc.T @ d), full_matrices=False)
        j_t = min(per_task, _rank(s_t, shape, torch.linalg.matrix_norm(d)))
        us.append(u_t[:, :j_t].clone())
        vhs.append(vh_t[:j_t].clone())
        total = total + s_t[:per_task].sum()
    kept = sum(x.shape[1] for x in us)
    weights = (total / r).expand(kept)  # isotropic: every direction gets the mean σ
    return _orthogonal_merge(us, weights, vhs, deltas[0])


def tsv(base, tensors, params, model_params, ctx):
    return merge_matrices(base, tensors, params, ctx, tsv_solve)


def iso_c(base, tensors, params, model_params, ctx):
    return merge_matrices(base, tensors, params, ctx, iso_c_solve)


def iso_cts(base, tensors, params, model_params, ctx):
    def solve(deltas):
        return iso_cts_solve(deltas, params.common_fraction)

    return merge_matrices(base, tensors, params, ctx, solve)


_NOTES = (
    "Matrices are the 2-D tensors not matched by `skip` (embeddings and heads by default; "
    "skip: '' treats every 2-D tensor as a matrix, as FusionBench). Other tensors get the mean "
    "task vector. Directions of zero singular value are dropped (see the module docstring)."
)
for _method in (
    Method(
        name="tsv",
        fn=tsv,
        summary="TSV-M: top-k task singular vectors of each task, decorrelated by polar factors.",
        reference="https://arxiv.org/abs/2412.00081",
        params=TSVParams,
        model_params=NoParams,
        aliases=("tsv_m",),
        notes=_NOTES + " k = floor(min(out, in) / T); matrices with rank < T stay at the base.",
    ),
    Method(
        name="iso_c",
        fn=iso_c,
        summary="Iso-C: flatten the spectrum of the summed task vectors to its mean.",
        reference="https://arxiv.org/abs/2502.04959",
        params=IsoCParams,
        model_params=NoParams,
        notes=_NOTES + " The paper tunes scaling on validation data (about 1.0-1.5).",
    ),
    Method(
        name="iso_cts",
        fn=iso_cts,
        summary="Iso-CTS: isotropic merge of a common subspace plus task-specific subspaces.",
        reference="https://arxiv.org/abs/2502.04959",
        params=IsoCTSParams,
        model_params=NoParams,
        notes=_NOTES + " Task-specific parts are projected off the common subspace on the "
        "output side: transposing a matrix changes the result (Conv1D is read as (out, in)).",
    ),
):
    register(_method)
