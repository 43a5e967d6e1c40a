"""Bad input, each refused before anything runs (no Ray started, no model merged) with a
message that names the key or file and the fix; and what goes wrong mid-search."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from mergeforge.errors import CheckpointError, ConfigError, MergeforgeError
from mergeforge.evolve import ClassifierPool, PoolTask, evolve, load_evolve_config

pytest.importorskip("cmaes")


def ray_started() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def genome(**keys) -> dict:
    return {"genome": {"models": ["a", "b"], "base_model": "base", "merge_method": "ties",
                       **keys}, "search": {"workers": 0}}  # fmt: skip


@pytest.mark.parametrize(
    "keys, needle",
    [
        ({"per_model": []}, "the search space is empty"),
        ({"merge_method": "model_stock"}, "the search space is empty"),
        ({"merge_method": "tiess"}, "unknown merge method 'tiess'"),
        ({"merge_method": "regmean"}, "reads per-model statistics files"),
        ({"per_model": ["wieght"]}, "Did you mean 'weight'"),
        ({"shared": {"normalize": [0, 1]}}, "not numeric"),
        ({"shared": {"lambda": [1, 0.5]}}, "low 1.0 must be below high 0.5"),
        ({"layer_grups": 2}, "Did you mean 'layer_groups'"),
        ({"layer_groups": 2, "layer_granularity": 2}, "not both"),
        ({"init": {"density": 2}}, "outside its range"),
        ({"shared": {"lambda": [0, 2]}, "parameters": {"lambda": 1}}, "both searched and fixed"),
        ({"models": []}, "missing 'models:'"),
    ],
)
def test_bad_genome(keys, needle):
    with pytest.raises(ConfigError, match=needle):
        load_evolve_config(genome(**keys))


def test_bad_config_shapes():
    with pytest.raises(ConfigError, match="lm-eval tasks"):
        load_evolve_config({"genome": genome()["genome"], "tasks": ["arc_challenge"]})
    with pytest.raises(ConfigError, match="exactly one of"):
        load_evolve_config({**genome(), "fitness": {"metric": "accuracy"}})
    with pytest.raises(ConfigError, match="search.sigma0"):
        load_evolve_config({**genome(), "search": {"sigma0": 0}})
    with pytest.raises(ConfigError, match="no fitness"):
        evolve(genome(), models={})


def test_suite_fitness_optimizer_is_checked():
    """``fitness.optimizer`` picks the suite's experts (adamw, adamw+recorder, umtam): a name
    the suite does not train with is refused before anything is built."""
    cfg = load_evolve_config({**genome(), "fitness": {"suite": "text", "optimizer": "umtam"}})
    assert cfg is not None
    with pytest.raises(ConfigError, match=r"fitness.optimizer: 'sgd'; .*adamw\+recorder"):
        load_evolve_config({**genome(), "fitness": {"suite": "text", "optimizer": "sgd"}})


def test_suite_fitness_takes_a_task_subset():
    """Beside ``suite: text``, ``tasks:`` is the suite's subset (it was taken for a second
    fitness kind, a pool of one's own, and refused); a name the suite lacks is refused."""
    cfg = load_evolve_config(
        {**genome(), "fitness": {"suite": "text", "tasks": ["polarity", "news_topic"]}}
    )
    assert (cfg.fitness.kind, cfg.fitness.options["tasks"]) == ("suite", ["polarity", "news_topic"])
    with pytest.raises(ConfigError, match=r"fitness.tasks: \['polarty'\]; a non-empty list"):
        load_evolve_config({**genome(), "fitness": {"suite": "text", "tasks": ["polarty"]}})


def test_a_budget_below_one_generation(tiny):
    with pytest.raises(ConfigError, match="search.evaluations: 5 is less than one generation of 8"):
        evolve(tiny.config(evaluations=5), fitness=tiny, models=tiny.models)


def test_a_pool_without_examples(tmp_path):
    with pytest.raises(ConfigError, match=r"fitness.tasks\[0\] \(polarity\): no examples"):
        load_evolve_config({**genome(), "fitness": {"tasks": [
            {"name": "polarity", "examples": [], "head": "h"}]}})  # fmt: skip
    with pytest.raises(ConfigError, match="no tasks"):
        load_evolve_config({**genome(), "fitness": {"tasks": []}})
    with pytest.raises(ConfigError, match="'polarity': no examples"):
        ClassifierPool(str(tmp_path), [PoolTask("polarity", (), str(tmp_path))])
    with pytest.raises(ConfigError, match="no texts"):
        load_evolve_config({**genome(), "fitness": {"texts": []}})


def test_an_empty_examples_file_fails_before_ray(tiny, tmp_path):
    """The pool's files are read when the search starts, before any worker."""
    import json

    from safetensors.torch import save_file

    for name, sd in tiny.models.items():
        (tmp_path / name).mkdir()
        save_file(sd, tmp_path / name / "model.safetensors")
    (tmp_path / "base" / "config.json").write_text("{}")
    head = tmp_path / "head"
    head.mkdir()
    (head / "labels.json").write_text(json.dumps(["neg", "pos"]))
    (tmp_path / "val.jsonl").write_text("\n")
    cfg = tiny.config(workers=None)  # would start Ray
    cfg["genome"].update(models=[str(tmp_path / "a"), str(tmp_path / "b")],
                         base_model=str(tmp_path / "base"))  # fmt: skip
    cfg["fitness"] = {"tasks": [{"name": "polarity", "examples": str(tmp_path / "val.jsonl"),
                                 "head": str(head)}]}  # fmt: skip
    with pytest.raises(ConfigError, match=r"val.jsonl\): no examples"):
        evolve(cfg, progress=False)
    assert not ray_started()


def test_unknown_models_fail_before_ray(tiny, tmp_path):
    cfg = tiny.config(workers=None)
    cfg["genome"]["models"] = ["a", str(tmp_path / "nowhere")]
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="nowhere"):
        evolve(cfg, fitness=tiny, models=tiny.models, progress=False)
    assert not ray_started() and time.perf_counter() - t0 < 5


def test_an_unreachable_ray_address_is_a_clear_error_within_seconds(tiny):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"--address 127.0.0.1:{port}: no Ray cluster answers"):
        evolve(tiny.config(workers=None), fitness=tiny, models=tiny.models, progress=False,
               address=f"127.0.0.1:{port}")  # fmt: skip
    assert time.perf_counter() - t0 < 5 and not ray_started()
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        evolve(tiny.config(workers=None), fitness=tiny, models=tiny.models, progress=False,
               address="my-cluster")  # fmt: skip
    with pytest.raises(ConfigError, match="workers: 0 runs in this process"):
        evolve(tiny.config(), fitness=tiny, models=tiny.models, address="127.0.0.1:6379")


def test_every_candidate_failing_stops_the_search(tiny):
    def broken(_sd):
        raise KeyError("accuracy")

    with pytest.raises(MergeforgeError, match="generation 0: every candidate failed; the first: "
                       "fitness failed: KeyError"):  # fmt: skip
        evolve(tiny.config(), fitness=broken, models=tiny.models, progress=False)


def test_another_search_in_the_same_folder_is_refused(tiny, tmp_path):
    evolve(tiny.config(evaluations=8), fitness=tiny, models=tiny.models, out=tmp_path,
           progress=False)  # fmt: skip
    other = tiny.config(evaluations=8, seed=1)
    with pytest.raises(ConfigError, match="holds a different search.*--restart"):
        evolve(other, fitness=tiny, models=tiny.models, out=tmp_path, progress=False)
    res = evolve(other, fitness=tiny, models=tiny.models, out=tmp_path, progress=False,
                 restart=True)  # fmt: skip
    assert res.resumed_from == 0
    (tmp_path.parent / "busy").mkdir()
    (tmp_path.parent / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files"):
        evolve(other, fitness=tiny, models=tiny.models, out=tmp_path.parent / "busy",
               progress=False)  # fmt: skip


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}  # fmt: skip


def test_restart_deletes_nothing_in_a_folder_without_evolve_state(tiny, tmp_path):
    """--restart discards a saved search only: a folder holding our file names but no
    evolve-state.pkl (someone else's model/, history.json) and a foreign file is refused whole."""
    out = tmp_path / "busy"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_bytes(b"precious")
    (out / "history.json").write_text("[1, 2]")
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    with pytest.raises(ConfigError, match="holds other files"):
        evolve(tiny.config(evaluations=8), fitness=tiny, models=tiny.models, out=out,
               progress=False, restart=True)  # fmt: skip
    assert _tree(out) == before
    (out / "notes.txt").unlink()  # only our names, but model/ is no mergeforge output
    before = _tree(out)
    with pytest.raises(ConfigError, match="model"):
        evolve(tiny.config(evaluations=8), fitness=tiny, models=tiny.models, out=out,
               progress=False, restart=True)  # fmt: skip
    assert _tree(out) == before


def test_restart_keeps_a_saved_search_folder_with_foreign_files(tiny, tmp_path):
    evolve(tiny.config(evaluations=8), fitness=tiny, models=tiny.models, out=tmp_path,
           progress=False)  # fmt: skip
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"precious")  # not a mergeforge output
    before = _tree(tmp_path)
    with pytest.raises(ConfigError, match="model"):
        evolve(tiny.config(evaluations=8, seed=1), fitness=tiny, models=tiny.models,
               out=tmp_path, progress=False, restart=True)  # fmt: skip
    assert _tree(tmp_path) == before
    (tmp_path / "model" / "weights.bin").unlink()
    (tmp_path / "model").rmdir()
    (tmp_path / "todo.txt").write_text("mine")
    before = _tree(tmp_path)
    with pytest.raises(ConfigError, match="todo.txt"):
        evolve(tiny.config(evaluations=8, seed=1), fitness=tiny, models=tiny.models,
               out=tmp_path, progress=False, restart=True)  # fmt: skip
    assert _tree(tmp_path) == before


def test_closing_the_pool_shuts_ray_down_even_when_a_kill_fails(monkeypatch):
    """A worker whose kill raises (dead already, the cluster gone) neither stops the other
    kills nor skips ray.shutdown(): Ray's processes never outlive the search."""
    ray = pytest.importorskip("ray")
    from mergeforge.evolve.workers import RayPool

    killed, shut = [], []

    def kill(actor):
        killed.append(actor)
        if actor == "dead":
            raise ValueError("actor handle is dead")

    monkeypatch.setattr(ray, "kill", kill)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: shut.append(True))
    pool = object.__new__(RayPool)  # as __init__ leaves it once its workers started
    pool.started, pool.actors = True, ["dead", "alive"]
    pool.close()
    assert killed == ["dead", "alive"] and shut == [True] and pool.actors == []
    pool.started, pool.actors = False, ["dead"]  # Ray was already up here: left running
    pool.close()
    assert shut == [True]


@pytest.mark.parametrize(
    "weights, needle",
    [
        (["heavy", 1], r"fitness.tasks\[0\] \(a\).weight: 'heavy' is not a number"),
        ([True, 1], r"fitness.tasks\[0\] \(a\).weight: True is not a number"),
        ([-1, 2], r"fitness.tasks\[0\] \(a\).weight: -1; .*finite number >= 0"),
        ([float("nan"), 1], r"fitness.tasks\[0\] \(a\).weight: nan"),
        ([1, float("inf")], r"fitness.tasks\[1\] \(b\).weight: inf"),
        ([0, 0.0], "the task weights sum to 0"),
    ],
)
def test_bad_task_weights_fail_when_the_config_is_read(weights, needle):
    tasks = [{"name": n, "examples": [{"text": "x", "label": 0}], "head": "h", "weight": w}
             for n, w in zip("ab", weights, strict=True)]  # fmt: skip
    with pytest.raises(ConfigError, match=needle):
        load_evolve_config({**genome(), "fitness": {"tasks": tasks}})
    pool = [PoolTask(n, (("x", 0),), "h", w) for n, w in zip("ab", weights, strict=True)]
    with pytest.raises(ConfigError):
        ClassifierPool("m", pool)
    ok = [{**t, "weight": w} for t, w in zip(tasks, (0, 2.5), strict=True)]  # one may be 0
    assert load_evolve_config({**genome(), "fitness": {"tasks": ok}}).fitness.kind == "tasks"
