"""Task pools: score one model on several tasks, and the metrics merging papers report.

A *task* is a dataset split, a classification head and a metric (accuracy here); a *task pool* is
several tasks scored with one shared model body (a merged encoder) and each task's own head.
Suites (text, vision) provide the pool; this module owns the arithmetic every suite shares:

- ``average``: the unweighted mean accuracy over the pool's tasks;
- ``normalized``: per task, merged accuracy / that task's own expert's accuracy (as in
  FusionBench and "Editing models with task arithmetic", 2212.04089, Table 1), and its mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol


class TaskPool(Protocol):
    """What a benchmark suite hands to :func:`evaluate_pool`."""

    tasks: tuple[str, ...]

    def evaluate(self, model_dir: Path, *, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Accuracy per task of the model in ``model_dir`` with each task's own head."""
        ...


def average(scores: Mapping[str, float], tasks: Sequence[str]) -> float:
    """Unweighted mean of ``scores`` over ``tasks`` (every task must be scored)."""
    missing = [t for t in tasks if t not in scores]
    if missing or not tasks:
        raise ValueError(f"no score for task(s) {missing or '(none given)'}")
    return sum(scores[t] for t in tasks) / len(tasks)


def normalized_accuracy(
    accuracy: Mapping[str, float], expert_accuracy: Mapping[str, float]
) -> dict[str, float]:
    """Per task: ``accuracy[t] / expert_accuracy[t]`` (1.0 = as good as the task's own expert)."""
    out = {}
    for task, acc in accuracy.items():
        ref = expert_accuracy.get(task)
        if ref is None:
            raise ValueError(f"task {task!r} has no expert accuracy to normalize by")
        if ref <= 0:
            raise ValueError(f"task {task!r}: expert accuracy {ref} must be > 0 to normalize by")
        out[task] = acc / ref
    return out


@dataclass(frozen=True)
class RunResult:
    """One row of a benchmark: a merge (or a reference model) scored on the task pool."""

    name: str  # row label, e.g. "ties density=0.5 lambda=1.0"
    method: str  # registry name, or "pretrained" / "experts" for the reference rows
    params: Mapping[str, object]  # the run's parameters (sweep values included)
    accuracy: Mapping[str, float]
    expert_accuracy: Mapping[str, float]
    merge_seconds: float | None = None
    peak_rss_bytes: int | None = None
    eval_seconds: float | None = None
    family: str = ""  # methods-file entry it came from (one line per family in sweep plots)
    swept: tuple[str, ...] = field(default=())  # names of the parameters this entry sweeps
    exclude: tuple[str, ...] = field(default=())  # regexes of tensors kept at the base

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.accuracy)

    @property
    def average(self) -> float:
        return average(self.accuracy, self.tasks)

    @property
    def normalized(self) -> dict[str, float]:
        return normalized_accuracy(self.accuracy, self.expert_accuracy)

    @property
    def normalized_average(self) -> float:
        return average(self.normalized, self.tasks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            params=dict(self.params),
            accuracy=dict(self.accuracy),
            expert_accuracy=dict(self.expert_accuracy),
            swept=list(self.swept),
            exclude=list(self.exclude),
            average=self.average,
            normalized=self.normalized,
            normalized_average=self.normalized_average,
        )
        return d


def evaluate_pool(
    pool: TaskPool,
    model_dir: Path,
    *,
    name: str,
    method: str,
    expert_accuracy: Mapping[str, float],
    params: Mapping[str, object] | None = None,
    merge_seconds: float | None = None,
    peak_rss_bytes: int | None = None,
    family: str = "",
    swept: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> RunResult:
    """Score ``model_dir`` on every task of ``pool`` and wrap it with its metrics."""
    import time

    t0 = time.perf_counter()
    accuracy = pool.evaluate(model_dir)
    return RunResult(
        name=name,
        method=method,
        params=dict(params or {}),
        accuracy=accuracy,
        expert_accuracy=dict(expert_accuracy),
        merge_seconds=merge_seconds,
        peak_rss_bytes=peak_rss_bytes,
        eval_seconds=time.perf_counter() - t0,
        family=family or method,
        swept=tuple(swept),
        exclude=tuple(exclude),
    )


@dataclass(frozen=True)
class MergeRecipe:
    """One merge of the quick start: mergekit YAML fields besides the model paths."""

    method: str
    model_parameters: Mapping[str, float] = field(default_factory=dict)
    parameters: Mapping[str, object] = field(default_factory=dict)
    with_base: bool = True
    exclude: Sequence[str] = ()

    def config(self, base_dir: Path, expert_dirs: Sequence[Path]) -> dict:
        """The merge of ``expert_dirs`` (on ``base_dir`` when ``with_base``), fp32, as
        ``config.merge_document`` spells it."""
        from mergeforge.config import merge_document

        return merge_document(
            self.method, list(expert_dirs), base_model=base_dir if self.with_base else None,
            parameters=self.parameters, model_parameters=self.model_parameters,
            exclude=self.exclude, dtype="float32",
        )  # fmt: skip
