"""The text suite as a fitness: its experts are the models searched, its base the base, each
task's expert head scores the merged encoder (``evaluate/text/suite.py``).

The fitness reads a *validation* split carved from each task's training texts — those the
experts did not train on when the task has enough (the suite trains on a seeded subsample),
else training texts (said in ``notes``) — never the test split. The test split is scored only
once, on the best merge, for the report (:attr:`SuiteFitness.test`): the numbers the issue's
acceptance compares are never seen by the search.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mergeforge.evolve.fitness import ClassifierPool, PoolTask


@dataclass
class SuiteFitness:
    fitness: ClassifierPool
    """Validation split: what the search maximises."""
    test: ClassifierPool
    """Test split: scored on the best merge only, for the report."""
    base_model: str
    models: tuple[str, ...]
    notes: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)


def validation_split(suite, task: str, n: int, seed: int) -> tuple[list, str | None]:
    """``n`` seeded examples of ``task`` from its training texts the expert did not see (the
    full training pool minus the suite's subsample), topped up with seen ones when too few;
    never a test example. Returns ``(examples, note or None)``."""
    from mergeforge.evaluate.text.tasks import TEXT_TASKS

    data = suite.data[task]
    test, seen = set(data.test), set(data.train)
    full = TEXT_TASKS[task](n_train=None, n_test=suite.n_test, seed=0)
    unseen = [ex for ex in full.train if ex not in seen and ex not in test]
    rng = np.random.default_rng(seed)
    note = None
    pool = unseen
    if len(unseen) < n:
        pool = unseen + [ex for ex in data.train if ex not in test]
        note = (f"{task}: {len(unseen)} training texts unseen by the expert; the validation "
                f"split adds {min(n, len(pool)) - len(unseen)} it trained on")  # fmt: skip
    pick = sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False).tolist())
    return [pool[i] for i in pick], note


def text_suite_fitness(options: Mapping[str, Any], *, console=None) -> SuiteFitness:
    """Build (or reuse from the cache) the text suite's base and experts, then the validation
    and test pools. ``options``: the YAML ``fitness:`` keys (``tasks``, ``validation`` per
    task, default 64, ``quick``, ``backbone``, ``n_train``, ``n_test``, ``cache``, ``metric``,
    ``seed`` of the validation draw, ``batch_size``, ``optimizer``: how the experts train,
    ``adamw`` (default), ``adamw+recorder`` (the same weights, plus curvature sidecars) or
    ``umtam``)."""
    from mergeforge.evaluate.text.suite import TextSuite

    suite = TextSuite(quick=bool(options.get("quick", False)), tasks=options.get("tasks"),
                      backbone=options.get("backbone", "minilm"), n_train=options.get("n_train"),
                      n_test=options.get("n_test"), cache_dir=options.get("cache"),
                      optimizer=options.get("optimizer"), console=console)  # fmt: skip
    suite.prepare()
    n, seed = int(options.get("validation", 64)), int(options.get("seed", 0))
    batch = int(options.get("batch_size", 64))
    val, test, notes = [], [], []
    for t in suite.tasks:
        examples, note = validation_split(suite, t, n, seed)
        notes += [note] if note else []
        head = str(suite.expert_root[t])
        val.append(PoolTask(t, tuple(examples), head))
        test.append(PoolTask(t, tuple(suite.data[t].test), head))
    base, length = str(suite.base_dir), suite.recipe.max_length
    return SuiteFitness(
        fitness=ClassifierPool(base, val, max_length=length, batch_size=batch,
                               metric=options.get("metric", "accuracy")),
        test=ClassifierPool(base, test, max_length=length, batch_size=batch),
        base_model=base, models=tuple(str(suite.expert_dirs[t]) for t in suite.tasks),
        notes=tuple(notes),
        settings={"suite": "text", "backbone": suite.backbone.name, "tasks": list(suite.tasks),
                  "validation": {t: len(p.examples) for t, p in zip(suite.tasks, val,
                                                                    strict=True)},
                  "n_test": suite.n_test, "n_train": suite.n_train},
    )  # fmt: skip
