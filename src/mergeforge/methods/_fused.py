"""Fused CPU kernels (numba), used when numba is importable.

The TIES tail — subtract the base, trim at each model's threshold (spending its budget of
threshold-tied entries in index order), weight, elect the sign, disjoint sum, normalise, λ,
add the base — is element-wise after the thresholds are known. As torch ops it is ~35 passes
over (cache-sized) chunks; here it is one pass over the inputs with every intermediate in
L1-sized blocks. Each scalar operation is the one :func:`.ties_chunked._tail` performs, in the same
order and the same dtype, so the result is bit-for-bit the torch path
(``tests/methods/test_ties_chunked.py`` checks it). No fast-math: IEEE semantics, no
reassociation or contraction.

``MERGEFORGE_NO_NUMBA=1`` turns the kernels off (the torch path runs instead). The first call
per (dtype, number of models) compiles the kernel (~1–3 s); numba caches it on disk, so later
processes load it in well under a second.
"""

from __future__ import annotations

import logging
import os
import threading
import types
from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("mergeforge")

DENSE, ZEROED, TRIMMED = 0, 1, 2


_LOCK = threading.Lock()
_READY: set[tuple[torch.dtype, int]] = set()  # (dtype, number of models) loaded or compiled
_PENDING: set[tuple[torch.dtype, int]] = set()  # being loaded by warm_up_async


def _kernel():
    with _LOCK:  # one definition even when a warm-up thread and a caller race
        return _make_kernel()


@cache
def _make_kernel():
    """The compiled kernels (``ties_tail``, ``bracket``), or None when numba is unavailable or
    switched off."""
    if os.environ.get("MERGEFORGE_NO_NUMBA", "") not in ("", "0"):
        return None
    try:
        import numba
    except ImportError:  # optional accelerator: the torch path is exact too
        log.debug("numba not importable: TIES runs its tail with torch ops")
        return None
    try:
        return _define(numba, cache=True)
    except Exception as exc:  # noqa: BLE001 - e.g. no writable cache location
        log.debug("numba on-disk cache unavailable (%s): compiling per process", exc)
    try:
        return _define(numba, cache=False)
    except Exception as exc:  # noqa: BLE001 - a broken numba must not break merging
        log.warning("numba kernels unavailable (%s): TIES runs with torch ops", exc)
        return None


def _define(numba, *, cache: bool) -> types.SimpleNamespace:
    """Define (lazily compiled) the kernels; ``cache``: keep compiled code on disk."""

    @numba.njit(nogil=True, cache=cache, fastmath=False, boundscheck=False)
    def ties_tail(b, xs, mode, thr, left, w, scale_w, count_vote, normalize, consts, out):
        # consts = [0, 1, λ] in the data dtype; scale_w[i]: weight i differs from 1.
        # Blocks of blk entries; each step is a simple loop over the block (vectorised by
        # LLVM) with the block's intermediates in L1, the runtime flags tested outside them.
        zero, one, lam = consts[0], consts[1], consts[2]
        use_lam = lam != one
        m = len(xs)
        n = b.shape[0]
        blk = 2048
        d = np.empty((m, blk), b.dtype)
        vote = np.empty(blk, b.dtype)
        merged = np.empty(blk, b.dtype)
        div = np.empty(blk, b.dtype)
        for s in range(0, n, blk):
            ln = min(blk, n - s)
            bb = b[s : s + ln]
            for i in range(m):
                xi = xs[i][s : s + ln]
                di = d[i]
                t = thr[i]
                md = mode[i]
                if md == 2 and left[i] < 0:  # trim, every entry tied at t kept
                    for j in range(ln):
                        v = xi[j] - bb[j]
                        di[j] = v if abs(v) >= t else v * zero
                elif md == 2:  # trim, ties at t kept in index order while the budget lasts
                    tied = 0
                    for j in range(ln):  # as above, counting the ties (vectorised)
                        v = xi[j] - bb[j]
                        a = abs(v)
                        di[j] = v if a >= t else v * zero
                        tied += a == t
                    if tied:  # rare: spend the budget on this block's ties, in index order
                        for j in range(ln):
                            v = xi[j] - bb[j]
                            if abs(v) == t:
                                if left[i] > 0:
                                    left[i] -= 1
                                else:
                                    di[j] = v * zero
                elif md == 1:  # density 0
                    for j in range(ln):
                        di[j] = (xi[j] - bb[j]) * zero
                else:
                    for j in range(ln):
                        di[j] = xi[j] - bb[j]
                if scale_w[i]:
                    wi = w[i]
                    for j in range(ln):
                        di[j] = di[j] * wi
            # elect the sign: (d0 + d1) + d2 …, or the sum of signs
            if count_vote:
                for j in range(ln):
                    vote[j] = np.sign(d[0, j])
                for i in range(1, m):
                    for j in range(ln):
                        vote[j] = vote[j] + np.sign(d[i, j])
            else:
                for j in range(ln):
                    vote[j] = d[0, j]
                for i in range(1, m):
                    for j in range(ln):
                        vote[j] = vote[j] + d[i, j]
            for j in range(ln):
                vote[j] = one if vote[j] >= zero else -one
            # disjoint sum: entries agreeing with the elected sign (zeros never agree)
            for i in range(m):
                di = d[i]
                wi = w[i]
                sw = scale_w[i]
                for j in range(ln):
                    a = one if di[j] * vote[j] > zero else zero
                    v = di[j] * a
                    if sw:
                        a = a * wi
                    if i == 0:
                        merged[j] = v
                        div[j] = a
                    else:
                        merged[j] = merged[j] + v
                        div[j] = div[j] + a
            for j in range(ln):
                r = merged[j]
                if normalize:
                    q = div[j]
                    r = r / (one if q == zero else q)
                if use_lam:
                    r = r * lam
                out[s + j] = r + bb[j]

    @numba.njit(nogil=True, cache=cache, fastmath=False, boundscheck=False)
    def bracket(x, b, lo, hi, cand):
        # One pass over |x − b|: how many entries lie above hi and below lo, and the ones in
        # [lo, hi] copied to cand (up to its length − 1; the count says if it overflowed).
        # Branch-free: an unconditional store, then a conditional advance of the cursor.
        cap = cand.shape[0] - 1
        above = 0
        below = 0
        c = 0
        for j in range(b.shape[0]):
            a = abs(x[j] - b[j])
            above += a > hi
            below += a < lo
            cand[min(c, cap)] = a
            c += (a >= lo) & (a <= hi)
        return above, c, below

    return types.SimpleNamespace(ties_tail=ties_tail, bracket=bracket)


def available() -> bool:
    return _kernel() is not None


def warm_up_async(dtype: torch.dtype, n_models: int) -> None:
    """Load (or, the first time ever, compile) the kernel for ``dtype`` and ``n_models`` in a
    background thread: importing numba and loading a cached kernel take ~1 s, which then
    overlaps the planning and the first tensors (they take the torch path until it is ready,
    with the same result). The engine calls this for TIES merges."""
    key = (dtype, n_models)
    if dtype not in (torch.float32, torch.float64) or n_models < 1:
        return
    with _LOCK:
        if key in _READY or key in _PENDING:
            return
        _PENDING.add(key)
    threading.Thread(target=_warm, args=key, daemon=True, name="mergeforge-numba").start()


def _warm(dtype: torch.dtype, n_models: int) -> None:
    try:
        if _kernel() is not None:
            b = torch.zeros(4, dtype=dtype)
            ties_tail(b, [b] * n_models, [1.0] * n_models, [0.5] * n_models,
                      [0.0] * n_models, [None] * n_models, consensus="sum", normalize=True,
                      lambda_=1.0, out=torch.empty_like(b))  # fmt: skip
            kth_largest_abs_delta(b, b, 1)
    except Exception as exc:  # noqa: BLE001 - the torch path stays available
        log.debug("numba warm-up failed (%s): TIES uses torch ops", exc)
    finally:
        with _LOCK:
            _PENDING.discard((dtype, n_models))
            _READY.add((dtype, n_models))


def ties_tail(
    b: Tensor,
    xs: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    thresholds: Sequence[float | None],
    budgets: Sequence[int | None],
    *,
    consensus: str,
    normalize: bool,
    lambda_: float,
    out: Tensor,
) -> None:
    """Run the fused tail over flat contiguous CPU tensors ``b``, ``xs`` into ``out``."""
    kernels = _kernel()
    assert kernels is not None
    kernel = kernels.ties_tail
    if consensus not in ("sum", "count"):
        raise ValueError(f"unknown consensus method {consensus!r}: expected 'sum' or 'count'")
    npdt = b.numpy().dtype
    mode = np.array(
        [TRIMMED if t is not None else (ZEROED if d <= 0 else DENSE)
         for t, d in zip(thresholds, densities, strict=True)], dtype=np.int8,
    )  # fmt: skip
    thr = np.array([0.0 if t is None else t for t in thresholds], dtype=npdt)
    left = np.array([-1 if k is None else k for k in budgets], dtype=np.int64)
    w = np.array(weights, dtype=npdt)
    scale_w = np.array([x != 1 for x in weights], dtype=np.bool_)
    consts = np.array([0.0, 1.0, lambda_], dtype=npdt)
    kernel(
        b.numpy(), tuple(x.numpy() for x in xs), mode, thr, left, w, scale_w,
        consensus == "count", bool(normalize), consts, out.numpy(),
    )  # fmt: skip


SAMPLES = 1 << 16
"""Entries sampled (at a fixed stride) to bracket the k-th largest |τ|."""


def kth_largest_abs_delta(x: Tensor, b: Tensor, k: int) -> tuple[float, int, int] | None:
    """``(t, greater, tied)`` for the k-th largest t of |x − b| over flat CPU tensors, with
    ``greater`` = #{|τ| > t} and ``tied`` = #{|τ| = t}; None when it cannot say (then use a
    full selection).

    A strided sample of |τ| brackets t between two sample quantiles around rank k (±1 % of
    the entries); one branch-free pass then counts the entries above the bracket and copies
    the ones inside it (~2 % of n), and a selection over those finds t. Exact: the bracket is
    verified by the counts (t must fall inside it), and anything else — a bracket that
    missed, too many entries inside it, NaN — returns None. ~1 pass over x and b instead of
    a subtraction into a buffer and an introselect over all of it.
    """
    kernels = _kernel()
    n = b.numel()
    if kernels is None or not 1 <= k <= n:
        return None
    xn, bn = x.numpy(), b.numpy()
    stride = max(1, n // SAMPLES)
    sample = np.abs(xn[::stride] - bn[::stride])
    m = sample.size
    pos = int(m - k * m / n)  # t's expected position in the ascending sample
    margin = max(64, m // 100)
    lo_i, hi_i = pos - margin, pos + margin
    picks = [i for i in (lo_i, hi_i) if 0 <= i < m]
    if picks:
        sample.partition(picks)  # two order statistics, O(m): no full sort
    lo = sample[lo_i] if lo_i >= 0 else sample.dtype.type(0)
    hi = sample[hi_i] if hi_i < m else np.inf
    cand = np.empty(max(1024, n // 25) + 1, dtype=bn.dtype)
    above, inside, below = kernels.bracket(xn, bn, bn.dtype.type(lo), bn.dtype.type(hi), cand)
    if above + inside + below != n or not above < k <= above + inside:
        return None  # NaN, or the bracket missed t
    if lo == hi:  # one value (heavy ties): that is t
        return float(lo), above, inside
    if inside >= cand.size:
        return None  # too many inside the bracket to have kept them all
    cand = cand[:inside]
    r = inside - (k - above)  # ascending position of t among the candidates
    cand.partition(r)
    t = cand[r]
    greater = above + int(np.count_nonzero(cand[r + 1 :] > t))
    tied = int(np.count_nonzero(cand == t))
    return float(t), greater, tied


def usable(b: Tensor, xs: Sequence[Tensor]) -> bool:
    """The fused tail applies to these tensors now. While a warm-up for them is still loading
    this says no (the caller takes the torch path) rather than wait for it; without one, the
    kernel is loaded here."""
    if not (
        b.device.type == "cpu"
        and b.dtype in (torch.float32, torch.float64)
        and all(x.dtype == b.dtype and x.is_contiguous() for x in xs)
        and b.is_contiguous()
    ):
        return False
    if (b.dtype, len(xs)) in _PENDING:
        return False
    return available()
