"""Shared plumbing of the matrix-aware methods (SVD family, covariance family).

These methods look at each 2-D weight as a linear map ``(out, in)`` and merge its task vectors
as matrices; everything else (biases, norms, and by default embeddings and output heads) gets
a simple rule. One wrapper, :func:`merge_matrices`, does what they all share:

1. task vectors τ_i = θ_i − θ₀ in the solve dtype (fp32 by default, fp64 on request);
2. decide whether the tensor is a *matrix* for the method: 2-D, not matched by ``skip``
   (default: token/position embeddings and ``lm_head``, whose "input" is a one-hot over the
   vocabulary rather than the stored second dimension);
3. orientation: GPT-2's ``Conv1D`` modules (``c_attn``, ``c_proj``, ``c_fc``) store the weight
   as ``(in, out)``; with ``orientation: auto`` they are transposed to ``(out, in)`` for the
   solve and back after (``out_in`` / ``in_out`` force one reading for every matrix). The
   proxy-covariance methods (WUDI, SWUDI, SWUDI-A, ACE) also take ``side``: ``output`` solves
   on τᵀ, so their task Grams are over the output features (:class:`ProxyGramParams`);
4. matrices go to the method's solver, other tensors get ``non_matrix``: ``mean`` (the mean
   task vector) or ``base`` (stay at θ₀);
5. θ = θ₀ + ``scaling`` · τ_merged (the merged delta cast to the base's dtype, so zero task
   vectors return the base bit for bit).

Tensors listed by the config's ``exclude:`` never reach a method (they are copied from the
base), as for every other method.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from mergeforge.methods.base import TensorContext
from mergeforge.methods.checks import check_choice, check_real, fail

DEFAULT_SKIP = (
    r"(embed_tokens|embeddings?\.|(^|\.)wte\.|(^|\.)wpe\.|lm_head|embed_out|shared\.weight)"
)
"""2-D tensors that are not linear maps of their second dimension: token, position and type
embeddings, and output heads tied to them."""

CONV1D = re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)\.weight$")
"""GPT-2-family ``Conv1D`` weights, stored ``(in, out)``."""

ORIENTATIONS = ("auto", "out_in", "in_out")
NON_MATRIX = ("mean", "base")
SOLVE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class MatrixParams:
    """Options every matrix-aware method shares (subclass and add the method's own)."""

    scaling: float = 1.0
    """θ = θ₀ + scaling · τ_merged (applied to matrices and non-matrices alike)."""
    non_matrix: str = "mean"
    """What tensors that are not matrices get: ``mean`` of the task vectors, or ``base``."""
    orientation: str = "auto"
    """``auto``: GPT-2 ``Conv1D`` weights are (in, out), all others (out, in)."""
    skip: str = "embeddings"
    """Regex (searched in the tensor name) of 2-D tensors treated as non-matrices. The default
    ``embeddings`` names the preset :data:`DEFAULT_SKIP` (token/position embeddings, output
    heads); ``''`` treats every 2-D tensor as a matrix (FusionBench's behaviour)."""
    solve_dtype: str = "float32"
    """Precision of the decompositions and solves: ``float32`` or ``float64``."""

    def __post_init__(self) -> None:
        check_real("scaling", self.scaling)
        check_choice("non_matrix", self.non_matrix, NON_MATRIX)
        check_choice("orientation", self.orientation, ORIENTATIONS)
        check_choice("solve_dtype", self.solve_dtype, tuple(SOLVE_DTYPES))
        if not isinstance(self.skip, str):
            fail("skip", self.skip, "a regular expression (a string; '' for none)")
        try:
            _compiled(self.skip)
        except re.error as e:
            fail("skip", self.skip, f"a valid regular expression ({e})")


@lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern | None:
    if pattern == "embeddings":
        pattern = DEFAULT_SKIP
    return re.compile(pattern) if pattern else None


def is_matrix(key: str, shape: Sequence[int], params: MatrixParams) -> bool:
    skip = _compiled(params.skip)
    return len(shape) == 2 and min(shape) > 1 and not (skip is not None and skip.search(key))


def stored_in_out(key: str, params: MatrixParams) -> bool:
    """Whether the stored weight is (in, out) and must be transposed for the solve."""
    if params.orientation == "auto":
        return CONV1D.search(key) is not None
    return params.orientation == "in_out"


@dataclass(frozen=True)
class ProxyGramParams(MatrixParams):
    """Options of the methods whose Grams are built from the task vectors themselves."""

    side: str = "input"
    """Which features the task-vector Grams are over: ``input`` (τᵀτ, (in, in): the papers'
    formulas, where the Gram stands in for the layer's input covariance) or ``output`` (ττᵀ,
    (out, out): the solve runs on τᵀ and is transposed back). ``output`` is what the ACE
    authors' code computes on GPT-2, whose ``Conv1D`` weights it takes as stored, (in, out);
    measured higher for ACE and SWUDI on every text suite here (BENCHMARKS.md §3d). Keep
    embeddings and output heads skipped (the default ``skip``) with ``output``: their output
    side is the vocabulary, a Gram of vocabulary² entries."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("side", self.side, ("input", "output"))


def solve_transposed(key: str, params: MatrixParams) -> bool:
    """Whether the solver gets τᵀ: the weight is stored (in, out), or (exclusive) a proxy-Gram
    method wants its Grams over the output features."""
    flip = stored_in_out(key, params)
    return not flip if isinstance(params, ProxyGramParams) and params.side == "output" else flip


MatrixSolver = Callable[[list[Tensor]], Tensor]
"""``solve(deltas) -> merged delta``: each delta (out, in) in the solve dtype."""


def merge_matrices(
    base: Tensor,
    tensors: Sequence[Tensor],
    params: MatrixParams,
    ctx: TensorContext,
    solve: MatrixSolver,
    *,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """The shared frame of a matrix method (see the module docstring). ``weights`` (optional)
    multiply each task vector before the solve and weight the non-matrix mean."""
    # solve in at least the inputs' precision; the base itself is never rounded
    dt = torch.promote_types(SOLVE_DTYPES[params.solve_dtype], base.dtype)
    base_s = base.to(dt)
    deltas = [x.to(dt) - base_s for x in tensors]
    if weights is not None:
        deltas = [d * float(w) for d, w in zip(deltas, weights, strict=True)]
    if is_matrix(ctx.key, base.shape, params):
        flip = solve_transposed(ctx.key, params)
        merged = solve([d.T for d in deltas] if flip else deltas)
        if flip:
            merged = merged.T
    elif params.non_matrix == "mean":
        merged = torch.stack(deltas).mean(dim=0)
    else:
        return base
    return base + (float(params.scaling) * merged).to(base.dtype)
