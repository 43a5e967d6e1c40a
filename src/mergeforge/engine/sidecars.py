"""Sidecars: per-model statistics (RegMean Grams, Fisher) for methods that declare them.

Planning (:func:`plan_sidecars`, before any tensor is read): for every non-base model of
every merged job, take its statistics given in memory (``stats={model: {kind: tensors}}``) or
else open its sidecar ``<model>/mergeforge-stats/<kind>.safetensors`` (headers only), refuse a
missing/stale one with the ``mergeforge stats`` command that makes it, and check that each
tensor's statistic is present and shaped as the method says. Executing
(:func:`load_sidecars`): each job reads its inputs' statistics lazily, fp32 on the compute device.
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
    """One statistic: the sidecar (by model index and kind) and the tensor name in it."""

    model: int
    kind: str
    name: str


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
    for i, job in enumerate(plan.jobs):
        if job.call is None:
            continue
        req = method.sidecar_inputs(job.call.params)
        want = req.shape(job.out_name, job.shape)
        refs: list[SidecarRef | None] = []
        for r in job.inputs:
            key = (r.model, req.kind)
            if key not in plan.sidecars:
                plan.sidecars[key] = _open(plan, r.model, req, stats)
            f = plan.sidecars[key]
            if want is None or r.name not in f.keys():
                refs.append(None)
                continue
            got = tuple(f.info(r.name).shape)
            if got != tuple(want):
                raise ValidationError(
                    f"statistics shape mismatch: {f.path} has {list(got)} for tensor {r.name!r} "
                    f"of {model_path(plan, r.model)}, but {method.name} needs {list(want)} for a "
                    f"tensor of shape {list(job.shape)}. {_fix(plan, r.model, req)}"
                )
            refs.append(SidecarRef(r.model, req.kind, r.name))
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


def load_sidecars(plan, job, device: torch.device) -> tuple[Tensor | None, ...]:
    """The job's statistics, fp32 on ``device`` (``()`` when it has none)."""
    if not job.sidecars:
        return ()
    out: list[Tensor | None] = []
    for s in job.sidecars:
        if s is None:
            out.append(None)
            continue
        t = plan.sidecars[(s.model, s.kind)].get(s.name)
        out.append(t.to(device=device, dtype=torch.float32, non_blocking=True))
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
