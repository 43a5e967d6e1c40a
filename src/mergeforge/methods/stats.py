"""Whole-model statistics passes (the ``Statistic`` protocol of :mod:`.base`).

:class:`ModelTopK` finds, for each task vector τ_i over the *whole model*, the magnitude of its
m-th largest entry, m = max(1, ⌊density·n⌋) with n the number of merged entries — the TIES
paper's global top-k — without ever holding the model: an exact radix select over the float32
bit patterns of |τ|. Non-negative IEEE floats order like their bit patterns read as integers,
so pass 1 histograms the high 16 bits (65536 bins) to find the bin holding the m-th largest,
and pass 2 histograms the low 16 bits of the entries in that bin. Memory: 65536 int64 counts
per model (512 KiB), whatever the model size. The result equals
``torch.kthvalue(cat(|τ_i|), n − m + 1)``.

The score need not be |τ|: any non-negative per-entry score works the same way (``score``, e.g.
saliency pruning's τ² ⊙ √(R ⊗ C) from the curvature statistics); a score may leave a tensor out
(pruning scores 2-D weights only), and n counts the entries scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mergeforge.errors import ConfigError

_BINS = 1 << 16

Score = Callable[[Tensor, Tensor, Any, Any], Tensor | None]
"""``(base, expert, the expert's statistics for this tensor or None, params) ->`` a
non-negative score per entry (any float dtype, compared in float32), or ``None``: the tensor
takes no part in the whole-model top-k."""


def magnitude_score(base: Tensor, x: Tensor, stat: Any, params: Any) -> Tensor:
    """|τ| = |x − θ₀|: TIES' trim score."""
    return (x - base).abs()


class NoStatistic:
    """For a method whose statistics pass is off for these parameters: zero passes."""

    passes = 0

    def observe(self, pass_index, key, base, tensors, params, model_params, sidecars=()):
        raise AssertionError("a statistic with zero passes observes nothing")

    def end_pass(self, pass_index: int) -> None:
        pass

    def result(self) -> None:
        return None


class ModelTopK:
    """Per-model global top-k thresholds of ``score`` (default |τ|); ``result()`` is a tuple
    with one float per model (None where the density is 0 or 1 and nothing needs selecting).
    Every model needs one density for the whole model (a per-tensor density has no whole-model
    meaning)."""

    passes = 2

    def __init__(self, score: Score = magnitude_score) -> None:
        self.score = score
        self.numel: list[int] = []
        self.density: list[float] = []
        self.first_key = ""
        self.hist: list[Tensor] = []
        self.bin: list[int] = []
        self.rank: list[int] = []
        self.thresholds: list[float | None] = []

    def observe(
        self,
        pass_index: int,
        key: str,
        base: Tensor | None,
        tensors: Sequence[Tensor],
        params: Any,
        model_params: Sequence[Any],
        sidecars: Sequence[Any] = (),
    ) -> None:
        assert base is not None, "task vectors need a base"
        if pass_index == 0:
            self._check_density(key, [mp.density for mp in model_params])
        for i, x in enumerate(tensors):
            if not 0 < self.density[i] < 1:
                continue
            score = self.score(base, x, sidecars[i] if sidecars else None, params)
            if score is None:
                continue
            if pass_index == 0:
                self.numel[i] += score.numel()
            # the score as float32 (the merge compares in float32 too), read as int32
            bits = score.to(torch.float32).contiguous().view(torch.int32).reshape(-1)
            high = bits >> 16
            values = high if pass_index == 0 else bits[high == self.bin[i]] & (_BINS - 1)
            # bincount takes the int32 values as they are: no int64 copy of a large tensor
            self.hist[i] += torch.bincount(values, minlength=_BINS).cpu()

    def end_pass(self, pass_index: int) -> None:
        for i, density in enumerate(self.density):
            if not 0 < density < 1:
                continue
            if pass_index == 0:
                if not self.numel[i]:
                    continue  # nothing scored: no threshold
                m = max(1, int(density * self.numel[i]))
                # the m-th largest is the (n − m + 1)-th smallest (1-based, as kthvalue)
                self.bin[i], self.rank[i] = _locate(self.hist[i], self.numel[i] - m + 1)
            elif self.numel[i]:
                low, _ = _locate(self.hist[i], self.rank[i])
                bits = torch.tensor([(self.bin[i] << 16) | low], dtype=torch.int32)
                self.thresholds[i] = bits.view(torch.float32).item()
            self.hist[i].zero_()

    def result(self) -> tuple[float | None, ...]:
        return tuple(self.thresholds)

    def _check_density(self, key: str, density: list[float]) -> None:
        if not self.density:
            n = len(density)
            self.density, self.first_key = density, key
            self.hist = [torch.zeros(_BINS, dtype=torch.int64) for _ in range(n)]
            self.bin, self.rank, self.thresholds = [0] * n, [0] * n, [None] * n
            self.numel = [0] * n
            return
        for i, (a, b) in enumerate(zip(self.density, density, strict=True)):
            if a != b:
                raise ConfigError(
                    f"topk_scope: model needs one density per model for the whole model, but "
                    f"model {i} has density {a} for {self.first_key!r} and {b} for {key!r}. "
                    "Give a single value, or use topk_scope: tensor."
                )


def _locate(hist: Tensor, rank: int) -> tuple[int, int]:
    """Bin holding the ``rank``-th smallest count (1-based), and the rank inside that bin."""
    cum = hist.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor([rank]))[0])
    return b, rank - (int(cum[b - 1]) if b else 0)


def keep_at_least(threshold: float):
    """A sparsifier (see :mod:`.sparsify`) keeping the entries with |τ| ≥ ``threshold``: the
    tensor's share of a model-wide top-k. Ties at the threshold are all kept."""

    def sparsifier(delta: Tensor, mp: Any, generator: torch.Generator | None = None):
        return (delta.abs().to(torch.float32) >= threshold).to(delta.dtype), mp.density

    return sparsifier
