"""A tiny stand-in for the engine: run a method's statistics passes, then its function per tensor.

A "model" here is ``{key: (base, [expert tensors])}``; the engine streams the same thing from
checkpoints. Per-tensor generators are seeded from the seed and the key, as the engine does.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mergeforge.methods import Method, TensorContext, get_method

Model = Mapping[str, tuple[Tensor | None, Sequence[Tensor]]]


def build(method: Method, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]):
    return method.params(**params), tuple(method.model_params(**mp) for mp in model_params)


def merge_model(
    method: Method | str,
    model: Model,
    params: Mapping[str, Any] | None = None,
    model_params: Sequence[Mapping[str, Any]] | None = None,
    *,
    seed: int | None = 0,
    names: Sequence[str] = (),
    side: Mapping[str, Sequence[Tensor | None]] | None = None,
    side_meta: Sequence[Mapping[str, str]] = (),
) -> dict[str, Tensor]:
    """Merge ``model``; ``side`` gives per-key statistics (one per expert) and ``side_meta``
    their files' metadata, as the engine passes them to methods with ``side_inputs``."""
    m = get_method(method) if isinstance(method, str) else method
    n = len(next(iter(model.values()))[1])
    p, mps = build(m, params or {}, model_params or [{}] * n)
    plan = None
    if m.statistic is not None:
        stat = m.statistic(p)
        for pass_index in range(stat.passes):
            for key, (base, tensors) in model.items():
                stat.observe(pass_index, key, base, tensors, p, mps)
            stat.end_pass(pass_index)
        plan = stat.result()
    out = {}
    for key, (base, tensors) in model.items():
        gen = None
        if m.stochastic and seed is not None:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        ctx = TensorContext(
            key=key, generator=gen, plan=plan, model_names=tuple(names),
            side=tuple(side[key]) if side is not None and key in side else (),
            side_meta=tuple(side_meta),
        )  # fmt: skip
        out[key] = m.fn(base, list(tensors), p, mps, ctx)
    return out


def merge_tensor(method, base, tensors, params=None, model_params=None, **kw) -> Tensor:
    return merge_model(method, {"t": (base, tensors)}, params, model_params, **kw)["t"]
