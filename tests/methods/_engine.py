"""Thin helpers that run the method tests through the engine (``mergeforge.merge_state_dicts``).

A "model" here is ``{key: (base, [expert tensors])}``: per tensor key the base's tensor (``None``
for a method without a base) and each expert's. :func:`merge_model` turns it into state dicts
``base``, ``expert0``, ``expert1``, ... and a config, and merges them with the engine that
``mergeforge merge`` runs: its planner (parameter names and values), statistics passes, seeding
(per tensor from the seed, per model from a fingerprint of its weights) and executor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import mergeforge
from mergeforge.checkpoint.memory import MemorySource
from mergeforge.config import yaml_name
from mergeforge.methods import Method, TensorContext, get_method

Model = Mapping[str, tuple[Tensor | None, Sequence[Tensor]]]
DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
          torch.bfloat16: "bfloat16"}  # fmt: skip


def build(method: Method, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]):
    """The method's parameter dataclasses, for tests that drive a statistic by hand."""
    return method.params(**params), tuple(method.model_params(**mp) for mp in model_params)


def expert_names(n: int) -> list[str]:
    return [f"expert{i}" for i in range(n)]


def config_of(
    method: str,
    model: Model,
    params: Mapping[str, Any] | None = None,
    model_params: Sequence[Mapping[str, Any]] | None = None,
    *,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The config that merges ``model``'s state dicts (see :func:`state_dicts`) with ``method``:
    parameters under their YAML names (``lambda_`` -> ``lambda``), computed in the inputs'
    dtype (the engine's default is fp32)."""
    base, xs = next(iter(model.values()))
    names = list(names or expert_names(len(xs)))
    mps = model_params or [{}] * len(xs)
    config: dict[str, Any] = {
        "merge_method": method,
        "models": [
            {"model": n, "parameters": {yaml_name(k): v for k, v in mp.items()}}
            for n, mp in zip(names, mps, strict=True)
        ],
        "parameters": {yaml_name(k): v for k, v in (params or {}).items()},
        "dtype": DTYPES[xs[0].dtype],
        "seed": seed,
    }
    if base is not None:
        config["base_model"] = "base"
    return config


def state_dicts(model: Model, names: Sequence[str] | None = None) -> dict[str, dict[str, Tensor]]:
    """``{"base": {key: base}, "expert0": {key: x0}, ...}`` (no ``base`` when it is None)."""
    base, xs = next(iter(model.values()))
    names = list(names or expert_names(len(xs)))
    out = {n: {k: v[1][i] for k, v in model.items()} for i, n in enumerate(names)}
    if base is not None:
        out["base"] = {k: b for k, (b, _) in model.items()}
    return out


def merge_model(
    method: Method | str,
    model: Model,
    params: Mapping[str, Any] | None = None,
    model_params: Sequence[Mapping[str, Any]] | None = None,
    *,
    seed: int = 0,
    sidecars: Mapping[str, Sequence[Any]] | None = None,
    sidecar_meta: Sequence[Mapping[str, str]] = (),
) -> dict[str, Tensor]:
    """Merge ``model`` through the engine. ``sidecars``: per key, each expert's statistic (``None``
    where it has none; ``{suffix: tensor}`` for a sidecar of several statistics per tensor), and
    ``sidecar_meta`` their files' metadata, given to the engine as each expert's in-memory
    statistics of the kind the method reads."""
    name = method if isinstance(method, str) else method.name
    config = config_of(name, model, params, model_params, seed=seed)
    stats = None
    if sidecars is not None:
        m = get_method(name)
        p = m.params(**(params or {}))
        kind = m.sidecar_inputs(p).kind
        n = len(next(iter(model.values()))[1])
        stats = {
            e: {kind: MemorySource(
                flat_stats({k: v[i] for k, v in sidecars.items()}),
                metadata=sidecar_meta[i] if sidecar_meta else None,
            )}
            for i, e in enumerate(expert_names(n))
        }  # fmt: skip
    return mergeforge.merge_state_dicts(config, state_dicts(model), stats=stats)


def flat_stats(per_key: Mapping[str, Any]) -> dict[str, Tensor]:
    """One model's statistics as a sidecar names them: ``{key: statistic}``, and for a sidecar
    of several statistics per tensor ``{key: {":R": R, ...}}`` -> ``{"key:R": R, ...}``; ``None``
    entries (no statistic) left out."""
    out: dict[str, Tensor] = {}
    for key, stat in per_key.items():
        if isinstance(stat, Mapping):
            out |= {key + suffix: t for suffix, t in stat.items()}
        elif stat is not None:
            out[key] = stat
    return out


def merge_tensor(method, base, tensors, params=None, model_params=None, **kw) -> Tensor:
    """One tensor (key ``t``) merged through the engine."""
    return merge_model(method, {"t": (base, tensors)}, params, model_params, **kw)["t"]


def call_method(method: str, base, tensors, params=None, model_params=None) -> Tensor:
    """The method's function called directly, outside the engine, with no generator (torch's
    global RNG, as mergekit draws) and no statistics: for comparisons of bare numerics."""
    m = get_method(method)
    mps = model_params or [{}] * len(tensors)
    p, mp = build(m, params or {}, mps)
    return m.fn(base, list(tensors), p, mp, TensorContext(key="t"))


def random_stats(method: str, params: Mapping[str, Any], model: Model, seed: int = 0):
    """Statistics of the kind ``method`` reads (``None`` for a method that reads none), as
    ``merge_model(sidecars=..., sidecar_meta=...)`` takes them: per key one statistic per expert of
    the shape the method asks for (a Gram: symmetric positive definite; a Fisher: positive),
    and each expert's metadata with its Fisher norm. A sidecar of several statistics per tensor
    (curvature) gets ``{suffix: positive tensor}`` of the suffixes it requires."""
    m = get_method(method)
    req = None if m.sidecar_inputs is None else m.sidecar_inputs(m.params(**params))
    if req is None:
        return None, ()
    g = torch.Generator().manual_seed(seed)
    n = len(next(iter(model.values()))[1])
    sidecars: dict[str, tuple[Any, ...]] = {}
    for key, (_, xs) in model.items():
        shape = req.shape(key, tuple(xs[0].shape))
        if shape is None:
            sidecars[key] = (None,) * n
        elif isinstance(shape, Mapping):  # several statistics per tensor: the required ones
            sidecars[key] = tuple(
                {s: torch.rand(sh, generator=g) ** 2 + 0.01 for s, sh in shape.items()
                 if s not in req.optional}
                for _ in range(n)
            )  # fmt: skip
        elif req.kind == "regmean":
            a = [torch.randn(shape[0], 2 * shape[0], generator=g) for _ in range(n)]
            sidecars[key] = tuple(x @ x.T / x.shape[1] for x in a)
        else:
            sidecars[key] = tuple(torch.rand(shape, generator=g) ** 2 + 0.01 for _ in range(n))
    norms = [
        float(sum((v[i].double() ** 2).sum() for v in sidecars.values()
                  if isinstance(v[i], Tensor)) ** 0.5)
        for i in range(n)
    ]  # fmt: skip
    return sidecars, tuple({"fisher_norm": repr(x)} for x in norms)


CURVATURE_SHAPES = {"w": (6, 5), "conv": (4, 2, 3), "b": (5,)}
"""A matrix, a >2-D weight (viewed as (4, 6)) and a vector: the curvature methods' test model."""


def random_family(n: int = 3, seed: int = 0, shapes=CURVATURE_SHAPES) -> dict:
    """``{key: (base, [n experts])}``: a seeded base and experts 0.1·N(0, 1) away from it."""
    g = torch.Generator().manual_seed(seed)
    model = {}
    for key, shape in shapes.items():
        base = torch.randn(shape, generator=g)
        model[key] = (base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)])
    return model
