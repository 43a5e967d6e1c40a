"""The text suite as a fitness: its experts are the models searched, its base the base, each
task's expert head scores the merged encoder (``evaluate/text/suite.py``).

The fitness reads a *validation* split carved from each task's training texts — those the
experts did not train on when the task has enough (the suite trains on a seeded subsample),
else training texts (said in ``notes``) — never the test split. The test split is scored only
once, on the best merge, for the report (:attr:`SuiteFitness.test`): the numbers the issue's
acceptance compares are never seen by the search. A second held-out split, the *selection*
split (``fitness.selection`` texts per task, drawn from the unseen training texts left after the
validation draw), re-scores the search's top candidates when ``search.reselect`` asks for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mergeforge.evolve.fitness import ClassifierPool, PoolTask

SPLITS = "stratified"
"""How the validation and selection splits are drawn (in a search's fingerprint: a saved search
made with another draw is not resumed)."""


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
    selection: ClassifierPool | None = None
    """Selection split (unseen by the experts and disjoint from the validation split): scores
    the top candidates again when ``search.reselect`` > 0; ``None``: no unseen text left."""


def validation_split(suite, task: str, n: int, seed: int) -> tuple[list, str | None]:
    """``n`` seeded examples of ``task`` with its test split's class proportions, from its
    training texts the expert did not see (the full training pool minus the suite's
    subsample), topped up per class with seen ones when too few; never a test example
    (:func:`~mergeforge.evaluate.text.tasks.held_out_split`). Returns ``(examples, note or
    None)``. Until session 15 the draw ignored the classes: a split of 128 could hold 32/96 of
    a balanced binary task, and the search then tuned for a class mix the test split lacks."""
    from mergeforge.evaluate.text.tasks import held_out_split

    return held_out_split(suite, task, n, seed)


def selection_split(suite, task: str, n: int, seed: int, validation) -> tuple[list, str | None]:
    """``n`` seeded examples of ``task`` as :func:`validation_split` draws them, but none of
    ``validation``'s texts and never a text the expert trained on (a selection split must be
    as unbiased as the test split: fewer when fewer are left, said in the note)."""
    from mergeforge.evaluate.text.tasks import held_out_split

    return held_out_split(suite, task, n, seed, exclude={t for t, _ in validation},
                          top_up=False, stream=18, what="selection")  # fmt: skip


def text_suite_fitness(
    options: Mapping[str, Any], *, console=None, with_selection: bool = False
) -> SuiteFitness:
    """Build (or reuse from the cache) the text suite's base and experts, then the validation
    and test pools. ``options``: the YAML ``fitness:`` keys (``tasks``, ``validation`` per
    task, default 64, ``quick``, ``backbone``, ``n_train``, ``n_test``, ``cache``, ``metric``,
    ``seed`` of the validation draw, ``selection`` texts per task of the selection split
    (default 256; read only when ``search.reselect`` > 0), ``batch_size``, ``optimizer``: how
    the experts train,
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
    n_sel = int(options.get("selection", 256))
    val, test, sel, notes = [], [], [], []
    for t in suite.tasks:
        examples, note = validation_split(suite, t, n, seed)
        notes += [note] if note else []
        head = str(suite.expert_root[t])
        val.append(PoolTask(t, tuple(examples), head))
        test.append(PoolTask(t, tuple(suite.data[t].test), head))
        if with_selection:
            chosen, note = selection_split(suite, t, n_sel, seed, examples)
            notes += [note] if note else []
            if chosen:
                sel.append(PoolTask(t, tuple(chosen), head))
    base, length = str(suite.base_dir), suite.recipe.max_length
    metric = options.get("metric", "accuracy")
    return SuiteFitness(
        fitness=ClassifierPool(base, val, max_length=length, batch_size=batch, metric=metric),
        test=ClassifierPool(base, test, max_length=length, batch_size=batch),
        # tasks without unseen texts left are scored on the others; the metric as the search's
        selection=ClassifierPool(base, sel, max_length=length, batch_size=batch,
                                 metric=metric) if sel else None,
        base_model=base, models=tuple(str(suite.expert_dirs[t]) for t in suite.tasks),
        notes=tuple(notes),
        settings={"suite": "text", "backbone": suite.backbone.name, "tasks": list(suite.tasks),
                  "validation": {t: len(p.examples) for t, p in zip(suite.tasks, val,
                                                                    strict=True)},
                  "selection": {p.name: len(p.examples) for p in sel},
                  "n_test": suite.n_test, "n_train": suite.n_train},
    )  # fmt: skip
