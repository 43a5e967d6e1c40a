"""Side inputs: per-model statistics (RegMean Grams, Fisher) for methods that declare them.

Planning (:func:`plan_side_inputs`, before any tensor is read): for every non-base model of
every merged job, open ``<model>/mergeforge-stats/<kind>.safetensors`` (headers only), refuse a
missing/stale one with the ``mergeforge stats`` command that makes it, and check that each
tensor's statistic is present and shaped as the method says. Executing
(:func:`load_side`): each job reads its inputs' statistics lazily, fp32 on the compute device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from mergeforge.errors import ValidationError


@dataclass(frozen=True)
class SideRef:
    """One statistic: the stats file (by model index and kind) and the tensor name in it."""

    model: int
    kind: str
    name: str


def _command(template: str, model: str) -> str:
    return template.format(model=model)


def model_path(plan, index: int) -> str:
    """Where model ``index`` lives on disk (its folder, else its weights file)."""
    ck = plan.checkpoints[index]
    return str(ck.folder if ck.folder is not None else ck.path)


def plan_side_inputs(plan) -> None:
    """Open and check the statistics every merged job needs; fill ``plan.side_files`` and each
    job's ``side`` (one :class:`SideRef` or ``None`` per non-base input)."""
    from mergeforge.stats.store import open_stats

    method = plan.method
    if method.side_inputs is None:
        return
    for i, job in enumerate(plan.jobs):
        if job.call is None:
            continue
        req = method.side_inputs(job.call.params)
        want = req.shape(job.out_name, job.shape)
        refs: list[SideRef | None] = []
        for r in job.inputs:
            key = (r.model, req.kind)
            model = model_path(plan, r.model)
            if key not in plan.side_files:
                plan.side_files[key] = open_stats(
                    model, req.kind, command=_command(req.command, model),
                    num_examples=req.num_examples,
                )  # fmt: skip
            f = plan.side_files[key]
            if want is None or r.name not in f.keys():
                refs.append(None)
                continue
            got = tuple(f.info(r.name).shape)
            if got != tuple(want):
                raise ValidationError(
                    f"statistics shape mismatch: {f.path} has {list(got)} for tensor {r.name!r} "
                    f"of {model}, but {method.name} needs {list(want)} for a tensor of shape "
                    f"{list(job.shape)}. Recompute them with: {_command(req.command, model)}"
                )
            refs.append(SideRef(r.model, req.kind, r.name))
        if (
            want is not None
            and any(x is None for x in refs)
            and (req.required or any(x is not None for x in refs))
        ):
            r = job.inputs[refs.index(None)]
            f = plan.side_files[(r.model, req.kind)]
            raise ValidationError(
                f"missing statistic: {f.path} has no entry for tensor {r.name!r} of "
                f"{plan.models[r.model]}"
                + (" (other models have one)" if not req.required else "")
                + f". Recompute them with: {_command(req.command, model_path(plan, r.model))}"
            )
        if any(x is not None for x in refs):
            plan.jobs[i] = dataclasses.replace(job, side=tuple(refs))


def load_side(plan, job, device: torch.device) -> tuple[Tensor | None, ...]:
    """The job's statistics, fp32 on ``device`` (``()`` when it has none)."""
    if not job.side:
        return ()
    out: list[Tensor | None] = []
    for s in job.side:
        if s is None:
            out.append(None)
            continue
        t = plan.side_files[(s.model, s.kind)].get(s.name)
        out.append(t.to(device=device, dtype=torch.float32, non_blocking=True))
    return tuple(out)


def side_meta(plan, job) -> tuple[dict[str, str], ...]:
    """Metadata of each input's statistics file (``()`` when the job has none)."""
    if not job.side:
        return ()
    kinds = {s.kind for s in job.side if s is not None}
    kind = next(iter(kinds))
    return tuple(plan.side_files[(r.model, kind)].metadata for r in job.inputs)


def close_side_files(plan) -> None:
    for f in plan.side_files.values():
        f.close()
