"""mergekit's tensor functions called directly, for tensor-level oracles of the methods of issue
18 (tests that use it carry ``@pytest.mark.mergekit``; mergekit is imported when they run)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def mergekit_tensor(
    name: str,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    shared: Mapping[str, Any] | None = None,
    per_model: Sequence[Mapping[str, Any]] | None = None,
) -> torch.Tensor:
    """mergekit's ``name`` on one tensor: ``base`` (input 0 when given) and ``tensors``, with
    shared parameters and per-model ones (one mapping per tensor, YAML names)."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    inputs = list(tensors) if base is None else [base, *tensors]
    first = 0 if base is None else 1
    group = TensorGroup.from_tensors(inputs, base_index=None if base is None else 0)
    params: dict[str, Any] = dict(shared or {})
    for key in {k for mp in per_model or () for k in mp}:
        params[key] = {i + first: mp[key] for i, mp in enumerate(per_model or ())}
    return registry.get(name)([group], parameters=params)[0]


def experts(shape, n: int = 3, seed: int = 0, scale: float = 0.1):
    """A seeded base and ``n`` experts ``scale``·(i + 1)·N(0, 1) away from it."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * (i + 1) * torch.randn(shape, generator=g) for i in range(n)]


SHAPES = [(16, 24), (50,), (3, 4, 5)]
