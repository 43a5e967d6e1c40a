"""Sidecars: per-model statistics (RegMean Grams, Fisher) for methods that declare them.

Planning (:func:`plan_sidecars`, before any tensor is read): for every non-base model of
every merged job, take its statistics given in memory (``stats={model: {kind: tensors}}``) or
else open its sidecar ``<model>/mergeforge-stats/<kind>.safetensors`` (headers only), refuse a
missing/stale one with the command that makes it (``mergeforge stats ...``, or for training's
curvature how to record it), and check that each tensor's statistics are present and shaped as
the method says (one statistic named by the tensor, or several named ``<tensor><suffix>``).
Executing (:func:`load_sidecars`): each job reads its inputs' statistics lazily, fp32 on the
compute device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mergeforge.checkpoint.memory import MemorySource
from mergeforge.errors import ConfigError, ValidationError


@dataclass(frozen=True)
class SidecarRef:
    """One tensor's statistics: the sidecar (by model index and kind) and the name in it; for a
    sidecar of several statistics per tensor, the suffixes present (read as ``name + suffix``)."""

    model: int
    kind: str
    name: str
    parts: tuple[str, ...] = ()


def _command(template: str, model: str) -> str:
    return template.format(model=model)


def _fix(plan, index: int, req) -> str:
    """How to replace model ``index``'s statistics: the command that writes its sidecar, or,
    for statistics given in memory, recompute what was given."""
    if isinstance(plan.sidecars.get((index, req.kind)), MemorySource):
        return f"Recompute the {req.kind} statistics given in memory for {plan.models[index]}."
    return f"Recompute them with: {_command(req.command, model_path(plan, index))}"


def model_path(plan, index: int) -> str:
    """Where model ``index`` lives on disk (its folder, else its weights file); for a model in
    memory, its label ``NAME (in memory)``, for messages."""
    ck = plan.checkpoints[index]
    return str(ck.folder if ck.folder is not None else ck.path)


def _open(plan, index: int, req, stats: Mapping[str, Mapping[str, Any]]):
    """Model ``index``'s ``req.kind`` statistics: given in memory (a mapping of tensors, or a
    :class:`MemorySource` carrying a sidecar's metadata), else its sidecar."""
    from mergeforge.checkpoint.sidecar import open_sidecar

    name = plan.models[index]
    given = stats.get(name, {}).get(req.kind)
    if given is not None:
        src = (
            given
            if isinstance(given, MemorySource)
            else MemorySource(given, path=f"{req.kind} statistics of {name} (in memory)")
        )
        n = src.metadata.get("num_examples")
        if req.num_examples is not None and n is not None and n != str(req.num_examples):
            raise ValidationError(
                f"unusable statistics: {src.path} were computed on num_examples={n}, but the "
                f"config asks for num_examples={req.num_examples}. Recompute them, or change "
                "num_examples."
            )
        return src
    if isinstance(plan.checkpoints[index].source, MemorySource):
        raise ValidationError(
            f"missing statistics: the in-memory model {name!r} has no {req.kind} statistics "
            f"({plan.method.name} reads them). Give them as stats={{{name!r}: {{{req.kind!r}: "
            "{tensor name: statistic}}}."
        )
    model = model_path(plan, index)
    return open_sidecar(
        model, req.kind, command=_command(req.command, model), num_examples=req.num_examples
    )


def plan_sidecars(plan, stats: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Open and check the statistics every merged job needs; fill ``plan.sidecars`` and each
    job's ``side`` (one :class:`SidecarRef` or ``None`` per non-base input). ``stats``: statistics
    given in memory, ``{model name: {kind: {tensor name: statistic}}}``, used instead of that
    model's file; one the merge does not read is a :class:`ConfigError` (a misspelt name)."""
    stats = stats or {}
    method = plan.method
    if method.sidecar_inputs is None:
        if stats:
            raise ConfigError(
                f"statistics were given for {', '.join(map(repr, stats))}, but "
                f"{method.name!r} reads none; leave out stats="
            )
        return
    names: dict[tuple[int, str], set[str]] = {}  # each sidecar's tensor names, looked up once
    for i, job in enumerate(plan.jobs):
        if job.call is None:
            continue
        req = method.sidecar_inputs(job.call.params)
        if req is None:  # these parameters read no statistics
            continue
        want = req.shape(job.out_name, job.shape)
        refs: list[SidecarRef | None] = []
        for r in job.inputs:
            key = (r.model, req.kind)
            if key not in plan.sidecars:
                plan.sidecars[key] = _open(plan, r.model, req, stats)
                names[key] = set(plan.sidecars[key].keys())
            refs.append(None if want is None else _ref(plan, r, req, want, job, names[key]))
        if (
            want is not None
            and any(x is None for x in refs)
            and (req.required or any(x is not None for x in refs))
        ):
            r = job.inputs[refs.index(None)]
            f = plan.sidecars[(r.model, req.kind)]
            raise ValidationError(
                f"missing statistic: {f.path} has no entry for tensor {r.name!r} of "
                f"{plan.models[r.model]}"
                + (" (other models have one)" if not req.required else "")
                + f". {_fix(plan, r.model, req)}"
            )
        if any(x is not None for x in refs):
            plan.jobs[i] = dataclasses.replace(job, sidecars=tuple(refs))
    used = {(plan.models[m], kind) for m, kind in plan.sidecars}
    unused = [(m, k) for m, kinds in stats.items() for k in kinds if (m, k) not in used]
    if unused:
        m, k = unused[0]
        read = ", ".join(f"{k2} of {m2}" for m2, k2 in sorted(used)) or "none"
        raise ConfigError(
            f"statistics {k!r} of {m!r} were given but this merge does not read them (it reads "
            f"{read}); check the model name and the kind."
        )


def _ref(plan, r, req, want, job, names: set[str]) -> SidecarRef | None:
    """Input ``r``'s statistics for ``job``, checked against the shape(s) the method wants
    (``want``: one shape, or ``{suffix: shape}``); ``None`` where the file has none."""
    f = plan.sidecars[(r.model, req.kind)]
    several = isinstance(want, Mapping)
    shapes = dict(want) if several else {"": want}
    present = [s for s in shapes if r.name + s in names]
    needed = [s for s in shapes if s not in req.optional]
    if not any(s in present for s in needed):
        return None
    absent = [s for s in needed if s not in present]
    if absent:
        raise ValidationError(
            f"incomplete statistics: {f.path} has {r.name + present[0]!r} but no "
            f"{r.name + absent[0]!r} for tensor {r.name!r} of {model_path(plan, r.model)}. "
            f"{_fix(plan, r.model, req)}"
        )
    for s in present:
        got = tuple(f.info(r.name + s).shape)
        if got != tuple(shapes[s]):
            raise ValidationError(
                f"statistics shape mismatch: {f.path} has {list(got)} for {r.name + s!r} "
                f"of {model_path(plan, r.model)}, but {plan.method.name} needs "
                f"{list(shapes[s])} for a tensor of shape {list(job.shape)}. "
                f"{_fix(plan, r.model, req)}"
            )
    return SidecarRef(r.model, req.kind, r.name, tuple(present) if several else ())


def load_sidecars(plan, job, device: torch.device) -> tuple[Any, ...]:
    """The job's statistics, fp32 on ``device`` (``()`` when it has none): per input a tensor,
    or ``{suffix: tensor}`` for a sidecar of several statistics per tensor, or ``None``."""
    if not job.sidecars:
        return ()

    def load(s: SidecarRef, name: str) -> Tensor:
        t = plan.sidecars[(s.model, s.kind)].get(name)
        return t.to(device=device, dtype=torch.float32, non_blocking=True)

    out: list[Any] = []
    for s in job.sidecars:
        if s is None:
            out.append(None)
        elif s.parts:
            out.append({p: load(s, s.name + p) for p in s.parts})
        else:
            out.append(load(s, s.name))
    return tuple(out)


def sidecar_meta(plan, job) -> tuple[dict[str, str], ...]:
    """Metadata of each input's statistics file (``()`` when the job has none)."""
    if not job.sidecars:
        return ()
    kinds = {s.kind for s in job.sidecars if s is not None}
    kind = next(iter(kinds))
    return tuple(plan.sidecars[(r.model, kind)].metadata for r in job.inputs)


def close_sidecars(plan) -> None:
    for f in plan.sidecars.values():
        f.close()
