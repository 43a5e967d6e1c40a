"""The CMA-ES loop (in this process, ``workers: 0``): it finds a known optimum, resumes after a
kill with the same result as an uninterrupted run, scores failed merges as failed and goes on,
and leaves its files (history, best.yaml that merges to the best, fitness plot)."""

from __future__ import annotations

import json

import pytest
import yaml

from mergeforge.config import load_config
from mergeforge.engine import merge_state_dicts
from mergeforge.evolve import default_population, evolve

pytest.importorskip("cmaes")


def weights(doc: dict) -> list[tuple[float, float]]:
    """Per slice, the weights of a and b in a decoded slices config."""
    return [tuple(s["parameters"]["weight"] for s in sl["sources"][:2]) for sl in doc["slices"]]


def test_default_population_is_cmaes():
    assert [default_population(n) for n in (1, 4, 10, 100)] == [4, 8, 10, 17]


def test_converges_to_the_known_optimum(tiny):
    res = evolve(tiny.config(evaluations=240), fitness=tiny, models=tiny.models, progress=False)
    assert res.evaluations == 240 and res.generations == 30 and res.failed == 0
    assert res.best_fitness > -1e-2  # from about -40 at the start (weights 1/2)
    for got, want in zip(weights(res.best_config), tiny.weights, strict=True):
        assert got == pytest.approx(want, abs=0.02)
    start = res.history[0]["fitness"]
    assert res.best_fitness > 100 * start  # fitness <= 0: far better than where it started


def test_resume_after_a_kill_gives_the_same_result(tiny, tmp_path):
    cfg = tiny.config(evaluations=48)  # 6 generations of 8
    whole = evolve(cfg, fitness=tiny, models=tiny.models, out=tmp_path / "a", progress=False)

    def kill(g, _row):
        if g == 2:
            raise KeyboardInterrupt  # as SIGTERM reaches the CLI (see mergeforge._signals)

    with pytest.raises(KeyboardInterrupt):
        evolve(cfg, fitness=tiny, models=tiny.models, out=tmp_path / "b", progress=False,
               on_generation=kill)  # fmt: skip
    done = json.loads((tmp_path / "b" / "history.json").read_text())["candidates"]
    assert {r["generation"] for r in done} == {0, 1, 2}  # saved after each generation
    again = evolve(cfg, fitness=tiny, models=tiny.models, out=tmp_path / "b", progress=False)
    assert again.resumed_from == 3 and again.generations == 6
    key = [(r["generation"], r["candidate"], r["fitness"], r["genes"]) for r in whole.history]
    assert [(r["generation"], r["candidate"], r["fitness"], r["genes"])
            for r in again.history] == key  # fmt: skip
    assert again.best_config == whole.best_config
    assert (tmp_path / "b" / "best.yaml").read_text() == (tmp_path / "a" / "best.yaml").read_text()
    # a finished search asked again: nothing re-run, the same result
    third = evolve(cfg, fitness=tiny, models=tiny.models, out=tmp_path / "b", progress=False)
    assert third.resumed_from == 6 and third.best_config == whole.best_config


def test_a_larger_budget_continues_a_finished_search(tiny, tmp_path):
    short = evolve(tiny.config(evaluations=16), fitness=tiny, models=tiny.models,
                   out=tmp_path, progress=False)  # fmt: skip
    more = evolve(tiny.config(evaluations=32), fitness=tiny, models=tiny.models,
                  out=tmp_path, progress=False)  # fmt: skip
    assert short.generations == 2 and more.resumed_from == 2 and more.generations == 4
    assert more.history[:16] == short.history


def test_outputs(tiny, tmp_path):
    res = evolve(tiny.config(evaluations=16), fitness=tiny, models=tiny.models, out=tmp_path,
                 progress=False)  # fmt: skip
    names = {p.name for p in tmp_path.iterdir()}
    assert {"evolve-state.pkl", "history.json", "best.yaml", "fitness.png"} <= names
    assert "model" not in names  # models given in memory: the recipe only
    assert (tmp_path / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best == res.best_config
    # the recipe written merges to the best candidate's fitness
    assert tiny(merge_state_dicts(load_config(best), tiny.models)) == res.best_fitness
    hist = json.loads((tmp_path / "history.json").read_text())
    assert len(hist["candidates"]) == 16 and len(hist["generations"]) == 2
    assert hist["settings"]["genes"][0] == "g0/a/weight"


def test_a_failed_merge_is_scored_failed_and_the_search_goes_on(tiny):
    """della with epsilon 0.3: a density outside [0.3, 0.7] is refused by the planner (density
    ± epsilon must lie inside (0, 1)), so some candidates' merges fail."""
    cfg = tiny.config(evaluations=40)
    cfg["genome"].update(merge_method="della", layer_groups=1, model_parameters={"epsilon": 0.3},
                         init={"density": 0.5}, ranges={"density": [0.0, 1.0]})  # fmt: skip
    res = evolve(cfg, fitness=tiny, models=tiny.models, progress=False)
    failed = [r for r in res.history if r["fitness"] is None]
    assert 0 < len(failed) < res.evaluations and res.failed == len(failed)
    assert all(r["error"].startswith("merge failed: ConfigError") for r in failed)
    assert "epsilon" in failed[0]["error"]
    ok = [r["fitness"] for r in res.history if r["fitness"] is not None]
    assert res.best_fitness == max(ok)


def test_a_failing_fitness_is_scored_failed(tiny):
    calls = []

    def flaky(sd):
        calls.append(1)
        if len(calls) % 3 == 0:
            raise RuntimeError("evaluation server went away")
        return float("nan") if len(calls) % 5 == 0 else tiny(sd)

    res = evolve(tiny.config(evaluations=16), fitness=flaky, models=tiny.models, progress=False)
    errors = [r["error"] for r in res.history if r["error"]]
    assert any("RuntimeError: evaluation server went away" in e for e in errors)
    assert any("not a finite number" in e for e in errors)
    assert res.evaluations == 16
