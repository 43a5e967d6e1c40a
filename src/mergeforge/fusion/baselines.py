"""The reference point every fusion method must beat: plain weight averaging.

Parents trained from different inits are not aligned neuron for neuron, so their average
usually collapses (OT-Fusion paper, 1910.05653, Table 1: VGG11 parents ≈ 90 %, average ≈ 17 %).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergeforge.fusion.base import FusionData, FusionMethod, register


@dataclass(frozen=True, kw_only=True)
class AverageParams:
    """``weights``: one per parent (normalised to sum 1); None = uniform."""

    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.weights is not None:
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(
                    f"weights must be non-negative with a positive sum, got {self.weights}"
                )


def average(
    parents: Sequence[nn.Module], data: FusionData, params: AverageParams
) -> dict[str, torch.Tensor]:
    k = len(parents)
    w = params.weights or (1.0,) * k
    if len(w) != k:
        raise ValueError(f"average: {len(w)} weights for {k} parents")
    total = float(sum(w))
    states = [p.state_dict() for p in parents]
    out: dict[str, torch.Tensor] = {}
    for key, ref in states[0].items():
        if not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        # float32 at least (half-precision parents), float64 parents in float64
        dtype = torch.promote_types(ref.dtype, torch.float32)
        acc = torch.zeros_like(ref, dtype=dtype)
        for wi, sd in zip(w, states, strict=True):
            acc += (wi / total) * sd[key].to(dtype)
        out[key] = acc.to(ref.dtype)
    return out


register(
    FusionMethod(
        name="average",
        fn=average,
        params=AverageParams,
        reference="vanilla weight averaging (1910.05653 Table 1's baseline)",
        summary="element-wise (weighted) mean of the parents' parameters; no alignment",
        min_parents=1,
    )
)
