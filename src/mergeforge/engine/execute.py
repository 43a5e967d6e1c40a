"""The streaming executor: each output tensor is one self-contained job (read, merge, write).

Memory: at most ``workers + 1`` jobs are alive at once, each holding its inputs and its output,
so peak memory is O(workers x number of inputs x largest tensor), independent of the model's
size. The writer puts each tensor at its precomputed offset, so jobs may finish in any order.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from mergeforge.engine.plan import Job, MergePlan, Ref
from mergeforge.engine.sidecars import load_sidecars, sidecar_meta
from mergeforge.errors import ValidationError
from mergeforge.methods.base import TensorContext

log = logging.getLogger("mergeforge")


def tensor_seed(seed: int, name: str) -> int:
    h = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def realigned(plan: MergePlan, job: Job) -> bool:
    """Whether ``job``'s inputs are rebuilt on the output vocabulary before merging."""
    return plan.vocab is not None and job.out_name in plan.vocab.tensors


class Loader:
    """Reads a job's inputs, checks them and puts them on the compute device/dtype."""

    def __init__(self, plan: MergePlan, device: torch.device):
        self.plan, self.device = plan, device

    def raw(self, ref: Ref) -> Tensor:
        """The stored tensor, unconverted (may be a read-only view of the file)."""
        return self.plan.checkpoints[ref.model].get(ref.name)

    def check(self, t: Tensor, ref: Ref) -> None:
        """Refuse NaN/Inf, naming the model, file and tensor. The sum is finite iff no entry is
        NaN/Inf (barring overflow, which the exact check then clears): one cheap reduction
        instead of an ``isfinite`` pass (~30x slower here)."""
        if not (self.plan.config.check_finite and t.is_floating_point() and t.numel()):
            return
        if bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()):
            return
        ck = self.plan.checkpoints[ref.model]
        bad = int((~torch.isfinite(t)).sum())
        raise ValidationError(
            f"non-finite values: tensor {ref.name!r} in {self.plan.models[ref.model]} "
            f"({ck.info(ref.name).file}) has {bad} NaN/Inf entries. The checkpoint is "
            "corrupt or diverged; fix it, or set 'check_finite: false' to merge anyway."
        )

    def prepare(self, t: Tensor, ref: Ref, dtype: torch.dtype | None) -> Tensor:
        self.check(t, ref)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        if t.device != self.device:
            t = t.to(self.device, non_blocking=True)
        return t

    def tensor(self, ref: Ref, dtype: torch.dtype | None) -> Tensor:
        return self.prepare(self.raw(ref), ref, dtype)

    def job(self, job: Job) -> tuple[Tensor | None, list[Tensor]]:
        dt = self.plan.compute_dtype if job.call is not None else None
        if realigned(self.plan, job):  # embeddings / heads on the output vocabulary
            refs = ([job.base] if job.base is not None else []) + list(job.inputs)
            out = self.plan.vocab.realign(
                job.out_name, [r.model for r in refs], [self.tensor(r, dt) for r in refs]
            )
            if job.call is None:  # copied: the source's rows (base, else the first input)
                return out[0], []
            return (out[0], out[1:]) if job.base is not None else (None, out)
        base = self.tensor(job.base, dt) if job.base is not None and job.call is not None else None
        if job.call is None:  # copied unchanged
            src = job.base or job.inputs[0]
            return self.tensor(src, None), []
        return base, [self.tensor(r, dt) for r in job.inputs]


def run_statistics(plan: MergePlan, loader: Loader, progress: Callable[[str], None]):
    """Two-phase methods: feed every merged tensor (and its inputs' statistics, for a method
    that reads sidecars) to the method's statistic, pass by pass."""
    if plan.method.statistic is None:
        return None
    jobs = [j for j in plan.jobs if j.call is not None]
    if not jobs:
        return None
    stat = plan.method.statistic(jobs[0].call.params)
    for p in range(stat.passes):
        progress(f"statistics pass {p + 1}/{stat.passes} for {plan.method.name}")
        for job in jobs:
            base, tensors = loader.job(job)
            side = load_sidecars(plan, job, loader.device)
            stat.observe(p, job.out_name, base, tensors, job.call.params, job.call.model_params,
                         sidecars=side)  # fmt: skip
        stat.end_pass(p)
    return stat.result()


def _stream_name(plan: MergePlan, model: int) -> str:
    return plan.stream_names[model] if plan.stream_names else plan.models[model]


def merge_one(job: Job, base, tensors, plan: MergePlan, fitted, device) -> Tensor:
    call = job.call
    assert call is not None
    gen = None
    if call.method.stochastic:
        gen = torch.Generator(device=device)
        gen.manual_seed(tensor_seed(plan.config.seed, job.out_name))
    ctx = TensorContext(
        key=job.out_name,
        generator=gen,
        fitted=fitted,
        model_names=tuple(_stream_name(plan, r.model) for r in job.inputs),
        sidecars=load_sidecars(plan, job, device),
        sidecar_meta=sidecar_meta(plan, job),
    )
    out = call.method.fn(base, tensors, call.params, call.model_params, ctx)
    if tuple(out.shape) != job.shape:
        raise RuntimeError(
            f"method {call.method.name!r} returned shape {list(out.shape)} for {job.out_name!r}, "
            f"expected {list(job.shape)} (a bug in the method)"
        )
    return out


CHUNK = 1 << 18
"""Elements per chunk for element-wise methods: 1 MB of fp32 per input, so the method's chain
of element-wise ops runs in cache instead of streaming every intermediate through memory."""


def merge_chunked(job: Job, loader: Loader, plan: MergePlan) -> Tensor:
    """An element-wise method (output[i] depends on inputs[i] only) applied chunk by chunk of
    the flattened tensors, converting, checking and casting per chunk: the inputs are read
    once and the output written once, instead of once per intermediate."""
    call = job.call
    assert call is not None and call.method.elementwise and not call.method.stochastic
    refs = ([job.base] if job.base is not None else []) + list(job.inputs)
    if realigned(plan, job):
        return _merge_realigned_chunked(job, refs, loader, plan)
    raws = [loader.raw(r).reshape(-1) for r in refs]
    dt = plan.compute_dtype
    out = torch.empty(raws[0].numel(), dtype=job.out_dtype)
    _merge_in_chunks(job, plan, out, CHUNK, lambda s, e: [
        loader.prepare(x[s:e], r, dt) for x, r in zip(raws, refs, strict=True)])  # fmt: skip
    return out.view(job.shape)


def _merge_realigned_chunked(job: Job, refs: list, loader: Loader, plan: MergePlan) -> Tensor:
    """:func:`merge_chunked` for a vocabulary tensor on the output vocabulary: blocks of rows
    gathered from the stored inputs (``VocabPlan.realign_rows``) instead of a re-laid copy of
    each whole input (a fresh 131 MB matrix per input of a 32k x 1024 embedding). The stored
    inputs are checked whole, as :meth:`Loader.job` checks them."""
    assert plan.vocab is not None
    raws = [loader.raw(r) for r in refs]
    for x, r in zip(raws, refs, strict=True):
        loader.check(x, r)
    rows = plan.vocab.realign_rows(job.out_name, [r.model for r in refs], raws,
                                   plan.compute_dtype)  # fmt: skip
    out = torch.empty(job.shape, dtype=job.out_dtype)
    _merge_in_chunks(job, plan, out, max(1, CHUNK // max(1, math.prod(job.shape[1:]))), rows)
    return out


def _merge_in_chunks(job: Job, plan: MergePlan, out: Tensor, step: int,
                     parts: Callable[[int, int], list[Tensor]]) -> None:  # fmt: skip
    """``out[s:e]`` = the method on ``parts(s, e)`` (base first when the job has one), for
    blocks of ``step`` along ``out``'s first dimension."""
    call = job.call
    assert call is not None
    names = tuple(_stream_name(plan, r.model) for r in job.inputs)
    ctx = TensorContext(key=job.out_name, model_names=names)
    n = out.shape[0]
    for s in range(0, n, step):
        got = parts(s, min(n, s + step))
        base, tensors = (got[0], got[1:]) if job.base is not None else (None, got)
        out[s : s + step].copy_(call.method.fn(base, tensors, call.params, call.model_params, ctx))


def process(job: Job, loader: Loader, plan: MergePlan, fitted, device, writer) -> Job:
    """Everything for one output tensor: read its inputs, merge, cast, write at its offset."""
    call = job.call
    if (
        call is not None
        and call.method.elementwise
        and device.type == "cpu"
        and fitted is None
        and not job.sidecars
        and len(job.inputs) > 0
        and (not realigned(plan, job) or plan.vocab.size == plan.vocab.n_tokens)
    ):
        writer.write(job.out_name, merge_chunked(job, loader, plan))
        return job
    base, tensors = loader.job(job)
    result = base if call is None else merge_one(job, base, tensors, plan, fitted, device)
    del base, tensors
    writer.write(job.out_name, result.to("cpu", job.out_dtype).contiguous())
    return job


def run_jobs(plan: MergePlan, loader: Loader, fitted, device, writer, workers: int,
             on_done: Callable[[Job], None]) -> None:  # fmt: skip
    """Run every job on ``workers`` threads with at most ``workers + 1`` in flight (so at most
    that many tensors' inputs and outputs are alive: bounded memory). Reads (``preadv``),
    writes (``pwrite``) and torch kernels release the GIL, so the threads overlap I/O with
    arithmetic and keep single-threaded kernels (quickselect in TIES' trim) on both cores."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergeforge") as pool:
        pending: deque[Future] = deque()
        try:
            for job in plan.jobs:
                pending.append(pool.submit(process, job, loader, plan, fitted, device, writer))
                while len(pending) > workers:
                    on_done(pending.popleft().result())
            while pending:
                on_done(pending.popleft().result())
        except BaseException:
            for f in pending:
                f.cancel()
            raise


class Progress:
    """A rich progress bar on a terminal (tensors, bytes, ETA); plain log lines otherwise."""

    def __init__(self, total_bytes: int, n: int, enabled: bool | None):
        self.total, self.n = total_bytes, n
        self.done_bytes, self.done = 0, 0
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._next_log = 0.1
        if self.tty:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )  # fmt: skip
            from rich.progress import (
                Progress as RichProgress,
            )

            self._bar = RichProgress(
                TextColumn("[bold]merging"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"),
                transient=False,
            )  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task("", total=total_bytes)
            self._mofn = MofNCompleteColumn

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            log.info(text)

    def advance(self, job: Job) -> None:
        self.done += 1
        self.done_bytes += job.nbytes
        if self._bar is not None:
            self._bar.update(
                self._task, completed=self.done_bytes, description=f"{self.done}/{self.n} tensors"
            )
        elif self.total and self.done_bytes / self.total >= self._next_log:
            el = time.perf_counter() - self.t0
            frac = self.done_bytes / self.total
            log.info(
                "merged %d/%d tensors, %.1f/%.1f GB, %.0f%%, eta %.0fs", self.done, self.n,
                self.done_bytes / 1e9, self.total / 1e9, 100 * frac, el * (1 - frac) / frac,
            )  # fmt: skip
            self._next_log = min(1.0, (int(frac * 10) + 1) / 10)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
