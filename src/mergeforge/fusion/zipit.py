"""ZipIt! (Stoica et al., "ZipIt! Merging Models from Different Tasks without Training",
2305.03053): merge the features of N parents by greedy correlation matching, allowing features
of one parent to merge with each other as well as across parents.

Per group of the permutation spec (a merge point; a residual stream is one): every parent's
features on the fusion set (each on its own forward pass, as in the paper) are concatenated,
their correlation matrix C (Σw × Σw) is zipped by :func:`~mergeforge.fusion.match.zip_greedy`
into a merge M (w × Σw, averages each merged set) and an unmerge U (Σw × w, copies), and
:func:`~mergeforge.fusion.permspec.apply_transforms` writes every layer as Σ_k M_k W_k U_kᵀ.

Left out: partial zipping (stop at a layer and keep separate heads after it) — the fused model
here must keep parent 0's architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergeforge.fusion.base import FusionData, FusionMethod, register
from mergeforge.fusion.match import cross_correlation, zip_greedy
from mergeforge.fusion.permspec import apply_transforms, features, spec_for


@dataclass(frozen=True, kw_only=True)
class ZipItParams:
    """``alpha``: a merged feature's similarity = alpha × the smaller of its parts' (paper 0.3);
    ``beta``: within-parent merge budget per parent, β · (features to remove / N) (paper
    0.125; 0 = only across parents); ``batch_size``: inputs per forward pass."""

    alpha: float = 0.3
    beta: float = 0.125
    batch_size: int = 256

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.beta < 0:
            raise ValueError(f"beta must be ≥ 0, got {self.beta}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")


def zipit(
    parents: Sequence[nn.Module], data: FusionData, params: ZipItParams
) -> dict[str, torch.Tensor]:
    spec = spec_for(parents[0])
    feats = [features(p, spec, data.inputs, batch_size=params.batch_size) for p in parents]
    merge: dict[str, list[torch.Tensor]] = {}
    unmerge: dict[str, list[torch.Tensor]] = {}
    for g in spec.groups:
        blocks = [f[g] for f in feats]
        joined = torch.cat(blocks, 1)  # rows × Σw: the same inputs, every parent's features
        sizes = [b.shape[1] for b in blocks]
        m, u = zip_greedy(
            cross_correlation(joined, joined), sizes, alpha=params.alpha, beta=params.beta
        )
        edges = torch.tensor([0, *sizes]).cumsum(0).tolist()
        merge[g] = [m[:, lo:hi] for lo, hi in zip(edges, edges[1:], strict=False)]
        unmerge[g] = [u[lo:hi] for lo, hi in zip(edges, edges[1:], strict=False)]
    return apply_transforms([p.state_dict() for p in parents], spec, merge, unmerge)


register(
    FusionMethod(
        name="zipit",
        fn=zipit,
        params=ZipItParams,
        reference="ZipIt! (Stoica et al., 2305.03053), greedy feature zipping without partial "
        "zipping",
        summary="merge correlated features within and across parents (merge/unmerge matrices "
        "per group)",
    )
)
