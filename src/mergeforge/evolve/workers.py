"""Where candidates are merged and scored: one :class:`CandidateEvaluator` per worker, run as a
Ray actor (:class:`RayPool`) or, with ``workers: 0``, in this process (:class:`LocalPool`).

Ray only schedules: each actor loads the models once (memory-mapped safetensors, so actors on
one machine share the page cache), sets the fitness up once, then for each candidate merges in
memory through ``mergeforge.engine.merge_state_dicts`` (the engine of ``mergeforge merge``) and
scores the state dict. mergekit-evolve's actor pool is the same idea (mergekit 0.1.5,
``mergekit/evo/actors.py``); its default strategies write every merge to disk, which
``in_memory=False`` reproduces here for comparison. A candidate whose merge or fitness raises
(or a worker that dies) comes back as a failed :class:`Outcome`; the search goes on.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeforge._signals import own_handlers
from mergeforge.errors import ConfigError, MergeforgeError
from mergeforge.evolve.config import DOCS
from mergeforge.evolve.fitness import as_score

log = logging.getLogger("mergeforge")


@dataclass(frozen=True)
class Outcome:
    index: int
    fitness: float | None
    """``None``: the candidate failed (``error`` says why)."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None
    merge_s: float = 0.0
    eval_s: float = 0.0


def load_model(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a model (lazily mapped from safetensors; see ``checkpoint/``)."""
    from mergeforge.checkpoint import open_checkpoint

    ck = open_checkpoint(path)
    try:  # the tensors keep their own maps: valid after the checkpoint is closed
        return {k: ck.get(k) for k in ck.keys()}
    finally:
        ck.close()


class CandidateEvaluator:
    """One worker's state: the models and the fitness, set up once. ``sources``: model name
    (as the candidates' configs spell it) -> a path to load, or a state dict."""

    def __init__(self, sources: Mapping[str, Any], fitness, *, threads: int | None = None,
                 in_memory: bool = True) -> None:  # fmt: skip
        self.error: str | None = None
        self.in_memory = in_memory
        try:
            if threads:
                torch.set_num_threads(threads)
            self.models = {n: load_model(s) if isinstance(s, str) else s
                           for n, s in sources.items()}  # fmt: skip
            fitness.setup()
            self.fitness = fitness
        except Exception as e:  # reported by ready(): a clear error, not a dead actor
            self.error = f"{type(e).__name__}: {e}"

    def ready(self) -> str | None:
        return self.error

    def _merge(self, doc: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        from mergeforge.engine import merge_state_dicts, run_merge

        if self.in_memory:
            return merge_state_dicts(doc, self.models, workers=1)
        with tempfile.TemporaryDirectory(prefix="mergeforge-evolve-") as tmp:
            out = Path(tmp) / "candidate"
            run_merge(doc, out, progress=False, workers=1, write_model_card=False)
            return {k: v.clone() for k, v in load_model(str(out)).items()}

    def evaluate(self, index: int, doc: Mapping[str, Any]) -> Outcome:
        t0 = time.perf_counter()
        try:
            merged = self._merge(doc)
        except Exception as e:
            return Outcome(index, None, error=f"merge failed: {type(e).__name__}: {e}",
                           merge_s=time.perf_counter() - t0)  # fmt: skip
        t1 = time.perf_counter()
        try:
            score = as_score(self.fitness(merged))
        except Exception as e:
            return Outcome(index, None, error=f"fitness failed: {type(e).__name__}: {e}",
                           merge_s=t1 - t0, eval_s=time.perf_counter() - t1)  # fmt: skip
        return Outcome(index, score.value, dict(score.metrics), None, t1 - t0,
                       time.perf_counter() - t1)  # fmt: skip


OnDone = Callable[[Outcome], None]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class LocalPool:
    """``workers: 0``: one evaluator in this process, candidates in turn (no Ray)."""

    workers = 0

    def __init__(self, sources, fitness, *, in_memory: bool = True, **_ignored) -> None:
        self.ev = CandidateEvaluator(sources, fitness, in_memory=in_memory)
        if self.ev.error:
            raise MergeforgeError(f"the fitness or the models could not be set up: {self.ev.error}")

    def run(self, docs: Sequence[Mapping], on_done: OnDone) -> list[Outcome]:
        out = []
        for i, doc in enumerate(docs):
            out.append(self.ev.evaluate(i, doc))
            on_done(out[-1])
        return out

    def close(self) -> None:
        pass


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """A TCP connection to ``HOST:PORT`` (or ``ray://HOST:PORT``) within ``timeout`` seconds:
    ``ray.init`` on an address nobody answers retries for minutes, so fail first, clearly."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r}: expected HOST:PORT of a Ray head (e.g. "
                          "10.0.0.5:6379, what `ray start --head` prints), or 'auto'")  # fmt: skip
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(
            f"--address {address}: no Ray cluster answers there ({e}). Start one on that "
            "machine with `ray start --head --port 6379` and pass --address HOST:6379, or leave "
            "--address out to run on a local Ray instance."
        ) from None


def connect(address: str | None, *, num_cpus: int | None) -> bool:
    """Join ``address`` (checked first) or start a local instance, unless Ray is already
    initialised in this process (then that instance is used). Returns whether it was started
    or joined here (and so is shut down by the caller)."""
    import ray

    if address not in (None, "auto"):
        check_reachable(address)  # even when Ray is up here: a wrong address is an error
    if ray.is_initialized():
        return False
    with own_handlers():
        if address is None:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)  # fmt: skip
            return True
        _join(ray, address)
    return True


def _join(ray, address: str) -> None:
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        hint = ""
        if "auth" in f"{e} {e.__cause__}".lower():  # `ray start` turns token auth on
            hint = (" The cluster asks for a token: export RAY_AUTH_MODE=token here and give "
                    "it the head's token (~/.ray/auth_token copied from the head, or "
                    f"RAY_AUTH_TOKEN); see {DOCS}.")  # fmt: skip
        raise ConfigError(f"--address {address}: cannot join the Ray cluster: "
                          f"{str(e).splitlines()[0]}.{hint}") from None  # fmt: skip


class RayPool:
    """One :class:`CandidateEvaluator` actor per worker, each asking for ``cpus_per_worker``
    CPUs (and using that many torch threads); candidates go to whichever actor is free."""

    def __init__(self, sources, fitness, *, workers: int | None, population: int,
                 cpus_per_worker: int = 1, address: str | None = None, in_memory: bool = True,
                 start_timeout: float = 300.0) -> None:  # fmt: skip
        import os

        import ray

        local_cpus = os.cpu_count() or 1
        self.started = connect(address, num_cpus=None if workers is None else max(
            local_cpus, workers * cpus_per_worker))  # fmt: skip
        try:
            free = int(ray.available_resources().get("CPU", 1))
            self.workers = workers or max(1, min(population, free // cpus_per_worker))
            # no restarts: a worker that dies fails its candidate and leaves the pool
            actor = ray.remote(CandidateEvaluator).options(num_cpus=cpus_per_worker)
            src, fit = ray.put(dict(sources)), ray.put(fitness)
            self.actors = [actor.remote(src, fit, threads=cpus_per_worker, in_memory=in_memory)
                           for _ in range(self.workers)]  # fmt: skip
            try:
                errors = ray.get([a.ready.remote() for a in self.actors], timeout=start_timeout)
            except ray.exceptions.GetTimeoutError:
                raise MergeforgeError(
                    f"{self.workers} Ray worker(s) of {cpus_per_worker} CPU(s) did not start "
                    f"within {start_timeout:.0f} s; the cluster has {free} free CPU(s) (`ray "
                    "status`). Lower --workers, or raise search.start_timeout for big models."
                ) from None
            if any(errors):
                raise MergeforgeError("a Ray worker could not set the fitness or models up: "
                                      + next(e for e in errors if e))  # fmt: skip
        except BaseException:
            self.close()
            raise

    def run(self, docs: Sequence[Mapping], on_done: OnDone) -> list[Outcome]:
        import ray

        results: dict[int, Outcome] = {}
        todo = list(enumerate(docs))
        idle = list(self.actors)
        busy: dict[Any, tuple[Any, int]] = {}
        while todo or busy:
            while idle and todo:
                a = idle.pop(0)
                i, doc = todo.pop(0)
                busy[a.evaluate.remote(i, doc)] = (a, i)
            done, _ = ray.wait(list(busy), num_returns=1)
            for ref in done:
                a, i = busy.pop(ref)
                try:
                    results[i] = ray.get(ref)
                    idle.append(a)
                except ray.exceptions.RayActorError as e:  # died (out of memory?): not reused
                    results[i] = Outcome(i, None, error=f"worker died: {_first_line(e)}")
                    self.actors.remove(a)
                except ray.exceptions.RayTaskError as e:
                    results[i] = Outcome(i, None, error=f"worker failed: {_first_line(e)}")
                    idle.append(a)
                on_done(results[i])
            if todo and not self.actors:
                raise MergeforgeError(f"every Ray worker died; the last: {results[i].error}")
        return [results[i] for i in range(len(docs))]

    def close(self) -> None:
        """Kill every worker (one that cannot be killed, dead already or its cluster gone, does
        not stop the others) and, when Ray was started or joined here, shut it down whatever
        happened: its processes never outlive the search."""
        import ray

        try:
            for a in getattr(self, "actors", []):
                try:
                    ray.kill(a)
                except Exception as e:  # noqa: BLE001 - the next kill and the shutdown matter more
                    log.debug("ray.kill of a worker failed: %s", _first_line(e))
        finally:
            self.actors = []
            if getattr(self, "started", False) and ray.is_initialized():
                ray.shutdown()
