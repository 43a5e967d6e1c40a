"""Byzantine-robust baselines: coordinate-wise median and trimmed mean of the clients' models.

Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018 (arXiv:1803.01498), Alg. 1 (median) and Alg. 2 (β-trimmed
mean). Both are unweighted (a client cannot buy influence with a large example count) and act
entry by entry, as Flower's ``FedMedian`` / ``FedTrimmedAvg``:

* median: ``np.median`` over the clients (the mean of the two middle values for an even
  count; ``torch.median`` would return the lower one);
* trimmed mean: drop the ⌊β·K⌋ smallest and ⌊β·K⌋ largest of the K values, average the rest
  (``scipy.stats.trim_mean(x, β, axis=0)``).

Stacks are taken in float64 and the result cast back to each tensor's dtype; the inputs are
never modified. Integer tensors (buffers) are cast back after the float64 statistic,
truncating toward zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack([t.detach().to(torch.float64) for t in tensors])  # (K, *shape)


def coordinate_median(tensors: Sequence[Tensor]) -> Tensor:
    """Entry-wise median of K same-shaped tensors (numpy's: middle pair averaged)."""
    s, _ = torch.sort(_stack(tensors), dim=0)
    k = s.shape[0]
    mid = s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2
    return mid.to(tensors[0].dtype)


def trimmed_mean(tensors: Sequence[Tensor], beta: float) -> Tensor:
    """Entry-wise mean after dropping the ⌊β·K⌋ lowest and highest values; β in [0, 0.5)."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed mean: beta must be in [0, 0.5), got {beta}")
    s, _ = torch.sort(_stack(tensors), dim=0)
    k = s.shape[0]
    cut = int(beta * k)
    return s[cut : k - cut].mean(dim=0).to(tensors[0].dtype)


def robust_state_dict(
    state_dicts: Sequence[dict[str, Tensor]], *, kind: str, beta: float = 0.2
) -> dict[str, Tensor]:
    """Apply ``median`` or ``trimmed_mean`` key by key (the keys of the first state dict)."""
    fn = coordinate_median if kind == "median" else (lambda ts: trimmed_mean(ts, beta))
    if kind not in ("median", "trimmed_mean"):
        raise ValueError(f"robust aggregator: unknown kind {kind!r}")
    return {k: fn([sd[k] for sd in state_dicts]) for k in state_dicts[0]}
