"""``search.reselect``: the search's K best distinct candidates are scored again on a selection
split it never saw, and the best there is the result. Oracles: the candidates re-scored are the
top K of the history by hand; the one chosen is the argmax of the selection fitness computed
directly; the selection split never meets the validation, training or test texts."""

from __future__ import annotations

import json

import pytest
import yaml

from mergeforge.config import load_config
from mergeforge.engine import merge_state_dicts
from mergeforge.errors import ConfigError
from mergeforge.evaluate.text import tasks as text_tasks
from mergeforge.evaluate.text.tasks import TextTask
from mergeforge.evolve import evolve
from mergeforge.evolve.search import top_candidates

pytest.importorskip("cmaes")


class Noisy:
    """The tiny problem's fitness plus a deterministic 'validation noise' that depends on the
    merged tensors: the search's best is then not the best on the exact (selection) fitness."""

    def __init__(self, tiny, scale: float = 6.0) -> None:
        self.tiny, self.scale = tiny, scale

    def __call__(self, merged) -> float:
        wobble = float(merged["layers.3.w"][0, 0] * 1e3) % 1.0  # in [0, 1), erratic
        return self.tiny(merged) + self.scale * wobble


def test_reselect_scores_the_top_k_again_and_keeps_the_best_there(tiny, tmp_path):
    calls = []

    def exact(merged):
        calls.append(1)
        return tiny(merged)

    res = evolve(tiny.config(evaluations=32, reselect=5), fitness=Noisy(tiny), selection=exact,
                 models=tiny.models, out=tmp_path, progress=False)  # fmt: skip
    # oracle: the 5 best distinct records by the search's fitness, each scored by hand
    top = top_candidates(res.history, 5)
    assert len(top) == 5 and len(calls) == 5
    assert [r["fitness"] for r in top] == sorted((r["fitness"] for r in res.history), reverse=True)[
        :5
    ]
    genome_docs = {}
    for r in res.selection:
        record = next(h for h in res.history if (h["generation"], h["candidate"]) ==
                      (r["generation"], r["candidate"]))  # fmt: skip
        assert r["fitness"] == record["fitness"] and r["genes"] == record["genes"]
        genome_docs[(r["generation"], r["candidate"])] = r
    assert {(r["generation"], r["candidate"]) for r in top} == set(genome_docs)
    scores = [r["selection"] for r in res.selection]
    assert scores == sorted(scores, reverse=True)  # best on the selection split first
    # the result is the best on the selection split, and best.yaml merges to it
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best == res.best_config
    assert tiny(merge_state_dicts(load_config(best), tiny.models)) == scores[0]
    chosen = res.selection[0]
    assert res.best_fitness == chosen["fitness"] and res.best_generation == chosen["generation"]
    assert "selection split" in (tmp_path / "best.yaml").read_text().splitlines()[1]
    saved = json.loads((tmp_path / "selection.json").read_text())
    assert saved["k"] == 5 and saved["chosen"] == json.loads(json.dumps(chosen))
    assert any(n.startswith("reselect:") for n in res.notes)
    # a finished search asked again: the saved scores are reused, nothing re-scored
    again = evolve(tiny.config(evaluations=32, reselect=5), fitness=Noisy(tiny), selection=exact,
                   models=tiny.models, out=tmp_path, progress=False)  # fmt: skip
    assert len(calls) == 5 and again.selection == res.selection
    assert again.best_config == res.best_config


def test_reselect_can_overturn_the_searchs_best(tiny):
    """With validation noise as large as the spread of the top candidates, the search's best is
    not the best on clean data: reselect picks a different, truly better one."""
    plain = evolve(tiny.config(evaluations=32), fitness=Noisy(tiny, 40.0), models=tiny.models,
                   progress=False)  # fmt: skip
    res = evolve(tiny.config(evaluations=32, reselect=8), fitness=Noisy(tiny, 40.0),
                 selection=tiny, models=tiny.models, progress=False)  # fmt: skip

    def key(h):
        return [(r["generation"], r["candidate"], r["fitness"], r["genes"]) for r in h]

    assert key(res.history) == key(plain.history)  # reselect does not change the search
    clean = tiny(merge_state_dicts(load_config(res.best_config), tiny.models))
    searched = tiny(merge_state_dicts(load_config(plain.best_config), tiny.models))
    assert clean == max(r["selection"] for r in res.selection)
    # the search's best is among the K re-scored, so the chosen one is never worse on clean data
    assert clean >= searched
    assert res.best_config != plain.best_config  # this seed: the search's best is overturned
    assert clean > searched


def test_top_candidates_skips_failures_and_repeated_genomes():
    rows = [{"fitness": 0.5, "genes": [0.1]}, {"fitness": None, "genes": [0.9]},
            {"fitness": 0.7, "genes": [0.2]}, {"fitness": 0.7, "genes": [0.2]},
            {"fitness": 0.6, "genes": [0.3]}, {"fitness": 0.7, "genes": [0.4]}]  # fmt: skip
    got = top_candidates(rows, 3)
    assert [r["genes"] for r in got] == [[0.2], [0.4], [0.3]]  # equal fitness: earliest first
    assert top_candidates(rows, 10) == [rows[2], rows[5], rows[4], rows[0]]


def test_reselect_needs_a_selection_split(tiny):
    with pytest.raises(ConfigError, match=r"search.reselect: 3 .*selection=f"):
        evolve(tiny.config(evaluations=16, reselect=3), fitness=tiny, models=tiny.models,
               progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="search.reselect"):
        evolve(tiny.config(evaluations=16, reselect=-1), fitness=tiny, models=tiny.models,
               progress=False)  # fmt: skip


def test_turning_reselect_on_resumes_the_same_search(tiny, tmp_path):
    first = evolve(tiny.config(evaluations=16), fitness=tiny, models=tiny.models, out=tmp_path,
                   progress=False)  # fmt: skip
    res = evolve(tiny.config(evaluations=16, reselect=3), fitness=tiny, selection=tiny,
                 models=tiny.models, out=tmp_path, progress=False)  # fmt: skip
    assert res.resumed_from == first.generations and res.history == first.history
    assert len(res.selection) == 3


# ------------------------------------------------------------------------------ the splits


def _fake_loader(n_total: int, every: int = 2):
    """``every``: one text in ``every`` is of class 1 (2: balanced)."""

    def load(*, n_train=None, n_test=20, seed=0):
        rows = [(f"text {i}", int(i % every == 0)) for i in range(n_total)]
        train, test = text_tasks.balanced_split(rows, 2, n_train=n_train, n_test=n_test,
                                                seed=seed)  # fmt: skip
        return TextTask("fake", ("0", "1"), train, test)

    return load


class FakeSuite:
    def __init__(self, loader, n_train, n_test):
        self.tasks, self.n_test = ("fake",), n_test
        self.data = {"fake": loader(n_train=n_train, n_test=n_test)}


def test_the_selection_split_meets_no_other_split(monkeypatch):
    from mergeforge.evolve.suite import selection_split, validation_split

    loader = _fake_loader(400)
    monkeypatch.setitem(text_tasks.TEXT_TASKS, "fake", loader)
    suite = FakeSuite(loader, n_train=100, n_test=60)
    val, _ = validation_split(suite, "fake", 50, 0)
    sel, note = selection_split(suite, "fake", 120, 0, val)
    texts = {t for t, _ in sel}
    assert len(sel) == 120 and note is None
    assert not texts & {t for t, _ in val}
    assert not texts & {t for t, _ in suite.data["fake"].train}
    assert not texts & {t for t, _ in suite.data["fake"].test}
    assert selection_split(suite, "fake", 120, 0, val) == (sel, None)  # seeded
    # 400 - 60 test - 100 trained - 50 validation = 190 left: never topped up with seen texts
    sel, note = selection_split(suite, "fake", 500, 0, val)
    assert len(sel) == 190 and "190 texts, not 500" in note


def test_the_splits_keep_the_test_splits_class_mix(monkeypatch):
    """The training pool holds 3 of class 0 for 1 of class 1, the test split (and the expert's
    training subsample) both classes equally: the validation and selection splits follow the
    test split, not the pool (a search tuned on the pool's mix favours the majority class)."""
    from collections import Counter

    from mergeforge.evolve.suite import selection_split, validation_split

    loader = _fake_loader(800, every=4)
    monkeypatch.setitem(text_tasks.TEXT_TASKS, "fake", loader)
    suite = FakeSuite(loader, n_train=100, n_test=60)
    assert Counter(y for _, y in suite.data["fake"].test) == {0: 30, 1: 30}
    val, note = validation_split(suite, "fake", 64, 0)
    assert Counter(y for _, y in val) == {0: 32, 1: 32} and note is None
    sel, note = selection_split(suite, "fake", 150, 0, val)
    assert Counter(y for _, y in sel) == {0: 75, 1: 75} and note is None
    # class 1 has 200 - 30 test - 50 trained - 32 validation = 88 unseen texts left
    sel, note = selection_split(suite, "fake", 300, 0, val)
    assert Counter(y for _, y in sel) == {0: 150, 1: 88} and "238 texts, not 300" in note
