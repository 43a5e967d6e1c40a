"""TIES on large CPU tensors in two sweeps instead of ~20 passes over memory.

The per-tensor trim needs each task vector's k-th largest |τ_i| (a selection over the whole
tensor); everything after it — the mask, the weights, the sign vote, the disjoint sum, the
normalisation, λ and the base — is element-wise. So:

1. per model, the threshold t_i (k-th largest |x_i − θ₀|) and the number of entries tied at
   t_i that the trim may keep (index order, as :func:`.sparsify.magnitude`): with numba, a
   sampled bracket and one counting pass (:func:`._fused.kth_largest_abs_delta`); otherwise
   |x_i − θ₀| goes into *one reused buffer*, partitioned in place (NumPy's introselect);
2. one sweep recomputes τ_i = x_i − θ₀ and runs the whole tail: a fused numba kernel
   (:mod:`._fused`, one pass, intermediates in L1-sized blocks) when numba is importable,
   otherwise torch ops over cache-sized chunks.

Same element-wise operations in the same order as :func:`generalized_task_arithmetic`, so the
result is bit-for-bit the unchunked one; only memory traffic changes (measured in
BENCHMARKS.md §1). Used by ``ties`` on CPU for float tensors without ``rescale``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mergeforge.methods import _fused
from mergeforge.methods.consensus import disjoint_sum, elect_sign_list

CHUNK = 1 << 18
"""Entries per chunk (1 MB of fp32 per operand): the inputs and temporaries of a chunk stay in
L2/L3 cache. Measured on the 271M-parameter benchmark merge (two engine workers, 2 cores):
12.6 s at 2^18 against 12.9 s at 2^17, 15.2 s at 2^20 and 15.6 s at 2^15 (Python overhead
per op dominates small chunks)."""
MIN_NUMEL = 1 << 20
"""Below this size the unchunked path is as fast (everything is already in cache)."""


def usable(base: Tensor, tensors: Sequence[Tensor], params) -> bool:
    return (
        params.topk_scope == "tensor"
        and not params.rescale
        and base.device.type == "cpu"
        and base.dtype in (torch.float32, torch.float64)
        and base.numel() >= MIN_NUMEL
        and all(t.dtype == base.dtype and t.is_contiguous() for t in tensors)
        and base.is_contiguous()
    )


_SCRATCH = threading.local()


def _scratch(n: int, dtype: torch.dtype) -> Tensor:
    """A per-thread buffer of n entries, reused across tensors: the selection's working copy
    would otherwise fault in fresh pages (up to 131 MB) for every model of every tensor."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n or buf.dtype != dtype:
        buf = None  # free the old one first
        _SCRATCH.buf = buf = torch.empty(n, dtype=dtype)
    return buf[:n]


def _threshold(x: Tensor, base: Tensor, density: float, buf: Tensor) -> tuple[float, int | None]:
    """(t, ties) of one task vector: t is its k-th largest |τ| (k = max(1, ⌊density·n⌋)); of
    the entries equal to t the first ``ties`` in index order are kept, or all of them when
    ``ties`` is None (no tied entry falls outside the top k: the common case)."""
    n = buf.numel()
    k = max(1, int(density * n))
    torch.sub(x.reshape(-1), base.reshape(-1), out=buf).abs_()
    a = buf.numpy()
    a.partition(n - k)  # in place: a[n-k] is the threshold, a[n-k:] the top k
    thr = a[n - k]
    greater = int(np.count_nonzero(a[n - k :] > thr))
    left_out = int(np.count_nonzero(a[: n - k] == thr))  # ties at t outside the top k
    return float(thr), (k - greater) if left_out else None


def ties_chunked(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    consensus: str,
    normalize: bool,
    lambda_: float,
) -> Tensor:
    n = base.numel()
    b = base.reshape(-1)
    xs = [t.reshape(-1) for t in tensors]
    thresholds: list[float | None] = []
    budgets: list[int | None] = []
    fused = _fused.usable(b, xs)
    buf = None
    for x, density in zip(xs, densities, strict=True):
        if density >= 1 or density <= 0:  # dense, or zeroed: no selection
            thresholds.append(None)
            budgets.append(None)
            continue
        k = max(1, int(density * n))
        found = _fused.kth_largest_abs_delta(x, b, k) if fused else None
        if found is not None:  # bracketed selection, one pass (numba)
            thr, greater, tied = found
            ties = (k - greater) if tied > k - greater else None
        else:
            buf = buf if buf is not None else _scratch(n, base.dtype)
            thr, ties = _threshold(x, b, density, buf)
        thresholds.append(thr)
        budgets.append(ties)
    del buf
    out = torch.empty(n, dtype=base.dtype)
    if fused:  # one fused pass (numba), same operations bit for bit
        _fused.ties_tail(
            b, xs, weights, densities, thresholds, budgets, consensus=consensus,
            normalize=normalize, lambda_=lambda_, out=out,
        )  # fmt: skip
        return out.view(base.shape)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        out[s:e] = _tail(
            b[s:e], [x[s:e] for x in xs], weights, densities, thresholds, budgets,
            consensus=consensus, normalize=normalize, lambda_=lambda_,
        )  # fmt: skip
    return out.view(base.shape)


def _trim(delta: Tensor, thr: float, budgets: list[int | None], i: int) -> Tensor:
    """Trim mask of one chunk, spending model i's budget of threshold-tied entries."""
    absd = delta.abs()
    mask = absd >= thr
    if budgets[i] is None:  # every tied entry is kept
        return mask
    eq = absd == thr
    if bool(eq.any()):
        tied = eq.nonzero().squeeze(1)
        if tied.numel() > budgets[i]:
            mask[tied[budgets[i] :]] = False
            budgets[i] = 0
        else:
            budgets[i] -= tied.numel()
    return mask


def _tail(b, xs, weights, densities, thresholds, budgets, *, consensus, normalize, lambda_):
    deltas = []
    for i, (x, w, density, thr) in enumerate(zip(xs, weights, densities, thresholds, strict=True)):
        delta = torch.sub(x, b)
        if thr is not None:
            delta.mul_(_trim(delta, thr, budgets, i))
        elif density <= 0:
            delta.zero_()
        deltas.append(delta.mul_(w) if w != 1 else delta)  # x·1 = x: skipping it is exact
    # the shared TIES steps (:mod:`.consensus`), on this chunk
    merged, divisor = disjoint_sum(deltas, list(weights), elect_sign_list(deltas, consensus))
    if normalize:
        merged.div_(divisor)
    if lambda_ != 1:
        merged.mul_(lambda_)
    return merged.add_(b)
