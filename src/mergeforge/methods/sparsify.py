"""Sparsifiers: which entries of one task vector survive, as interchangeable plug-ins.

Every sparsifier has one signature::

    sparsifier(delta, mp, generator) -> (mask, keep_prob)

``delta`` is a task vector τ_i = θ_i − θ₀ of any shape; ``mp`` is the model's per-model
parameter record (each sparsifier reads ``density`` and documents any other field it reads);
``mask`` (delta's shape, 1 = keep) and ``keep_prob`` (a float, or a tensor of delta's shape)
are turned into the sparse task vector by :func:`sparsify`, which also rescales.

Numerics follow mergekit 0.1.5 (``mergekit/sparsify.py``): same k, same sort, same rescale,
so per-tensor results agree with mergekit to float rounding (and bit for bit for DARE and
DELLA when both draw from the same torch RNG).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mergeforge.methods.base import TensorContext

NAMED_STREAMS = (
    "Seeded (config `seed`): each model's random stream is named by a fingerprint of its "
    "weights, so the merge is the same wherever the model folders are and in any model order."
)
Sparsifier = Callable[[Tensor, Any, torch.Generator | None], tuple[Tensor, Tensor | float]]


def magnitude(delta: Tensor, mp: Any, generator: torch.Generator | None = None):
    """Trim (TIES, 2306.01708): keep the k = max(1, ⌊density·n⌋) largest |τ| of the tensor.

    The threshold is found by selection (O(n)), not mergekit's full sort: NumPy's introselect
    on CPU (measured 10x faster than ``torch.kthvalue`` and ~50x faster than ``argsort`` on a
    2.9M-entry tensor), ``kthvalue`` elsewhere. Entries tied at the threshold are kept in index
    order (what a stable sort does); mergekit's unstable ``argsort`` keeps an arbitrary subset
    of them, so the two differ on those equal-magnitude entries only (fp32/bf16 deltas do tie).
    """
    return keep_top(delta.abs(), mp.density), mp.density  # bool: ``delta * mask``, no copy


def keep_top(score: Tensor, density: float) -> Tensor:
    """The trim step with any score: a boolean mask (``score``'s shape) of its
    k = max(1, ⌊density·n⌋) largest entries; of the entries tied at the threshold, the first in
    index order. TIES' trim is ``keep_top(|τ|, density)``; UMTAM's ``keep_top(S, density)``."""
    return keep_top_k(score, max(1, int(density * score.numel())))


def keep_top_k(score: Tensor, k: int) -> Tensor:
    """A boolean mask (``score``'s shape) of the k ≥ 1 largest entries of ``score``; of the
    entries tied at the threshold, the first in index order. SCE's select step is
    ``keep_top_k(variance, ⌊select_topk·nnz⌋)``."""
    flat = score.reshape(-1)
    thr = kth_largest(flat, k)
    mask = flat >= thr
    extra = int(torch.count_nonzero(mask)) - k
    if extra > 0:  # entries tied at the threshold: drop the last ones in index order
        mask[(flat == thr).nonzero().squeeze(1)[-extra:]] = False
    return mask.view_as(score)


def kth_largest(flat: Tensor, k: int) -> Tensor:
    """The k-th largest entry of a 1-D tensor (a 0-d tensor on its device)."""
    n = flat.numel()
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        value = np.partition(flat.numpy(), n - k)[n - k]
        return torch.tensor(value, dtype=flat.dtype)
    return torch.kthvalue(flat, n - k + 1).values


def magnitude_outliers(delta: Tensor, mp: Any, generator: torch.Generator | None = None):
    """Model Breadcrumbs (2312.06795): drop the ⌊gamma·n⌋ largest |τ| (outliers) and the
    smallest, keeping ⌊density·n⌋. Reads ``mp.gamma``. When gamma + density > 1 fewer outliers
    are dropped, so that the density is kept (as mergekit does)."""
    n = delta.numel()
    target, n_top = int(mp.density * n), int(mp.gamma * n)
    n_bottom = max(0, n - target - n_top)
    order = torch.argsort(delta.abs().reshape(-1))  # ascending magnitude
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[n_bottom : n_bottom + target]] = 1
    return mask.view_as(delta), mp.density


def random(delta: Tensor, mp: Any, generator: torch.Generator | None = None):
    """DARE (2311.03099): keep each entry independently with probability ``density``."""
    probs = torch.full_like(delta, mp.density, dtype=_work_dtype(delta))
    return torch.bernoulli(probs, generator=generator).to(delta.dtype), mp.density


def della_magprune(delta: Tensor, mp: Any, generator: torch.Generator | None = None):
    """DELLA MagPrune (2406.11617): keep probability rises linearly with the magnitude rank
    inside each row (dim 1; 1-D tensors are one row), from density − ε to density + ε, so
    the mean keep probability is the density. Reads ``mp.epsilon``."""
    rows = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    n = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(_work_dtype(delta))
    # mergekit divides by n − 1 and gets NaN for one-entry rows; the window centre is the
    # probability the density asks for
    position = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    # same operation order as mergekit, so both give the same probabilities bit for bit
    probs = (mp.density - mp.epsilon) + position * 2 * mp.epsilon
    mask = torch.bernoulli(probs, generator=generator)
    return mask.to(delta.dtype).view_as(delta), probs.view_as(delta)


def ranked(delta: Tensor, mp: Any, generator: torch.Generator | None = None):
    """``ranked_ties``' sparsifier (mergekit's ``SparsificationMethod.ranked``, defined on a
    2024 branch whose ``examples/ties.yml`` still names it; never in a mergekit release): each
    entry is kept independently with probability r, its magnitude rank laid linearly from 1
    (largest |τ|) to 0 (smallest) over the whole tensor; ties in |τ| are ranked in index order
    (a stable sort; the source's unstable ``argsort`` orders them arbitrarily). The source
    ignores the density below 1 (its early "already sparser than the density" return is never
    taken: ``0 ** 0 == 1`` in torch), so about half the entries survive whatever the density;
    ``mp.density_aware`` raises r to the power 1/density − 1 so that the mean keep probability
    is the density. The returned keep probability is floored at the dtype's smallest normal
    number, so ``rescale_norm: inverse_prob`` never divides by zero (a dropped entry stays 0).
    Probabilities are computed in float32 (the source: in the tensor's dtype)."""
    flat = delta.abs().reshape(-1)
    n = flat.numel()
    dtype = _work_dtype(delta)
    order = torch.argsort(flat, descending=True, stable=True)
    probs = torch.empty(n, dtype=dtype, device=delta.device)
    probs[order] = torch.linspace(1.0, 0.0, n, dtype=dtype, device=delta.device)
    if getattr(mp, "density_aware", False):
        probs.pow_(1.0 / mp.density - 1.0)
    mask = torch.bernoulli(probs, generator=generator)
    keep_prob = probs.clamp_min_(torch.finfo(dtype).tiny).view_as(delta)
    return mask.to(delta.dtype).view_as(delta), keep_prob


def sparsify(
    delta: Tensor,
    sparsifier: Sparsifier,
    mp: Any,
    *,
    rescale_norm: str | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Apply ``sparsifier`` to one task vector and rescale the survivors.

    ``rescale_norm``: None (no rescale), ``l1``/``l2``/``linf`` (multiply by
    ‖τ‖/‖mask⊙τ‖ in that norm; mergekit's ``rescale: true`` is ``l1``; skipped when either
    norm is below 1e-7, as mergekit does) or ``inverse_prob`` (divide by the keep
    probability). Full density returns ``delta`` itself, never rescaled (as mergekit).
    """
    if mp.density >= 1 or delta.numel() == 0:
        return delta
    if mp.density <= 0:
        return torch.zeros_like(delta)
    mask, keep_prob = sparsifier(delta, mp, generator)
    kept = delta * mask
    if rescale_norm is None:
        return kept
    if rescale_norm == "inverse_prob":
        return kept / keep_prob  # keep_prob > 0: density > 0, and DELLA checks density − ε > 0
    before, after = _norm(delta, rescale_norm), _norm(kept, rescale_norm)
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def _norm(x: Tensor, kind: str) -> Tensor:
    if kind == "l1":
        return x.abs().sum()
    if kind == "l2":
        return torch.linalg.vector_norm(x)
    return x.abs().max()


def _work_dtype(x: Tensor) -> torch.dtype:
    # torch.bernoulli has no float16 CPU kernel; float32 (or float64) is exact for 0/1 masks
    return torch.promote_types(x.dtype, torch.float32)


def model_generators(ctx: TensorContext, n: int, device: torch.device) -> list:
    """One RNG per input model, seeded from the engine's per-tensor seed and the model's name
    (the engine passes a fingerprint of the model's weights, ``engine.plan.model_fingerprint``,
    so the result depends neither on where the folders are nor on how the YAML spells them),
    so a model's mask does not depend on its position in the config (permuting the models
    permutes the masks with them; a repeated name is told apart by its occurrence). Without
    names the position is used. Derived from
    ``initial_seed`` so ``ctx.generator`` itself is never advanced. No ``ctx.generator``:
    torch's global RNG (as mergekit), for direct callers."""
    if ctx.generator is None:
        return [None] * n
    names: Sequence[object] = ctx.model_names if len(ctx.model_names) == n else range(n)
    seed = ctx.generator.initial_seed()
    out = []
    for i, name in enumerate(names):
        # a model listed twice gets two streams: its copies must drop independently
        label = f"{name}#{list(names[:i]).count(name)}"
        digest = hashlib.blake2b(f"{seed}/{label}".encode(), digest_size=8).digest()
        g = torch.Generator(device=device)
        g.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        out.append(g)
    return out
