"""`mergeforge bench vision`: parents as model folders, base-free merges, reference rows.

A tiny recipe (30 Adam steps per MLP parent) on UCI digits, which scikit-learn bundles; the
tests skip with the install command when scikit-learn is absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mergeforge.errors import ConfigError, MergeforgeError
from mergeforge.evaluate import bench
from mergeforge.evaluate.data import DataPackageMissing
from mergeforge.evaluate.metrics import accuracy
from mergeforge.evaluate.vision import suite as vs
from mergeforge.evaluate.vision import train as vt
from mergeforge.evaluate.vision.data import SKLEARN_INSTALL, load_dataset

FAMILY = "digits/mlp/seeds2"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vision-cache")


@pytest.fixture(scope="module")
def suite(cache) -> vs.VisionSuite:
    torch.set_num_threads(1)
    s = vs.VisionSuite(quick=True, cache_dir=cache, tasks=[FAMILY])
    try:
        s.prepare()
    except DataPackageMissing:
        pytest.skip(f"UCI digits need scikit-learn: {SKLEARN_INSTALL}")
    return s


def _run(method: str, **params) -> bench.BenchRun:
    return bench.BenchRun(name=method, family=method, method=method, parameters=params)


def test_family_parsing_and_quick_recipe():
    assert vs.parse_family(None) == ("fashion_mnist", "mlp", "seeds2")
    assert vs.parse_family(None, quick=True) == ("digits", "mlp", "seeds2")
    assert vs.parse_family(["mnist/vgg/dirichlet4"]) == ("mnist", "vgg", "dirichlet4")
    bad_families = (["digits/mlp"], ["digits/mlp/seeds2", "mnist/mlp/seeds2"],
                    ["cifar/mlp/seeds2"], ["digits/lenet/seeds2"], ["digits/mlp/seeds1"],
                    ["digits/mlp/halves11"])  # fmt: skip
    for bad in bad_families:
        with pytest.raises(ConfigError, match="fashion_mnist.*mlp.*seeds<P>"):
            vs.parse_family(bad)
    # the default recipe is that of benchmarks/vision/results/vision.json (the cached parents)
    default = vs.recipe_for("fashion_mnist", "mlp", "seeds2")
    sizes = (default.n_train, default.n_test, default.steps, default.batch_size)
    assert sizes == (6000, 2000, 200, 64)
    results = Path(__file__).parents[2] / "benchmarks" / "vision" / "results" / "vision.json"
    if results.is_file():
        rows = json.loads(results.read_text())["rows"]
        keys = {(r["dataset"], r["arch"], r["regime"]): r["recipe_key"] for r in rows}
        assert keys[("fashion_mnist", "mlp", "seeds2")] == default.key()
        assert keys[("digits", "vgg", "halves2")] == vs.recipe_for("digits", "vgg", "halves2").key()


def test_parent_round_trips_through_its_model_folder(suite, tmp_path):
    from mergeforge.engine import run_merge

    parent0 = suite.expert_dirs["parent0"]
    assert json.loads((parent0 / "config.json").read_text())["arch"] == "mlp"
    loaded = vs.read_state_dict(parent0, "mlp")
    for key, tensor in suite.parents[0].state_dict.items():
        assert torch.equal(loaded[key], tensor)
    # oracle: the plain average of a parent with a copy of itself is that parent (a copy: the
    # same folder listed twice is refused as a config mistake)
    twin = tmp_path / "parent0-copy"
    shutil.copytree(parent0, twin)
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(parent0)}, {"model": str(twin)}]}  # fmt: skip
    run_merge(config, tmp_path / "self", overwrite=True, progress=False)
    merged = suite.pool.evaluate(tmp_path / "self")
    assert merged == {"digits": suite.references["parent0"]}
    assert suite.references["parent0"] > 0.5  # 30 steps already learn digits


def test_merge_inputs_base_free_and_slerp_endpoints(suite):
    base, experts = suite.merge_inputs(_run("linear"))
    config = bench.merge_config(_run("linear"), base, experts)
    assert "base_model" not in config
    assert [m["model"] for m in config["models"]] == [str(d) for d in suite.expert_dirs.values()]
    run = _run("slerp", t=0.5)
    config = bench.merge_config(run, *suite.merge_inputs(run))
    assert config["base_model"] == str(suite.expert_dirs["parent0"])
    assert [m["model"] for m in config["models"]] == [str(suite.expert_dirs["parent1"])]
    four = vs.VisionSuite(tasks=["digits/mlp/dirichlet4"], cache_dir=suite.cache_dir)
    four.check_run(run)  # not a bad methods file: the row fails, the rest of the file runs
    with pytest.raises(MergeforgeError, match="2 models.*4 parents"):
        four.merge_inputs(run)


def test_a_method_that_needs_a_base_fails_before_training(tmp_path, monkeypatch):
    def no_merge(config, out):
        raise AssertionError("merged")

    monkeypatch.setattr(bench, "merge_isolated", no_merge)
    cache = tmp_path / "cache"
    methods = {"methods": [{"method": "linear"}, {"method": "ties", "parameters": {"lambda": 1}}]}
    with pytest.raises(ConfigError, match="ties needs a base.*share no base.*'linear'"):
        bench.run_bench("vision", methods, tmp_path / "out", quick=True, cache_dir=cache,
                        plots=False)  # fmt: skip
    assert not cache.exists()  # nothing trained
    with pytest.raises(ConfigError, match="regmean reads per-model statistics"):
        bench.run_bench("vision", {"methods": [{"method": "regmean"}]}, tmp_path / "out",
                        quick=True, cache_dir=cache, plots=False)  # fmt: skip
    with pytest.raises(ConfigError, match="unknown method 'pretrained'.*'ensemble'"):
        bench.run_bench("vision", {"methods": [{"method": "pretrained"}]}, tmp_path / "out",
                        quick=True, cache_dir=cache, plots=False)  # fmt: skip


def test_run_bench_vision_writes_ensemble_and_weight_average_rows(suite, cache, tmp_path):
    methods = {"methods": [{"name": "ensemble", "method": "ensemble"},
                           {"name": "p1", "method": "parent1"},
                           {"name": "avg", "method": "linear"}]}  # fmt: skip
    out = tmp_path / "out"
    payload = bench.run_bench("vision", methods, out, quick=True, cache_dir=cache, plots=False,
                              tasks=[FAMILY])  # fmt: skip
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] and data["failed"] == {} and data["tasks"] == ["digits"]
    assert data["settings"]["recipe_key"] == suite.recipe.key()  # the fixture's parents, reused
    rows = {r["name"]: r for r in payload["runs"]}
    assert list(rows) == [bench.EXPERTS_ROW, "ensemble", "p1", "avg"]
    ens = suite.references["ensemble"]
    assert rows[bench.EXPERTS_ROW]["accuracy"] == {"digits": ens}
    assert rows["ensemble"]["accuracy"] == {"digits": ens}
    assert rows["ensemble"]["normalized_average"] == pytest.approx(1.0)
    assert rows["p1"]["accuracy"] == {"digits": suite.references["parent1"]}

    # the linear row is plain weight averaging, evaluated directly
    parents, _, _ = vt.get_parents(suite.recipe, cache_dir=cache)
    data_split = load_dataset("digits", n_train=None, n_test=360, seed=0)
    averaged = vt.load_into("mlp", vt.average_state_dicts([p.state_dict for p in parents]))
    expected = accuracy(vt.predict_logits(averaged, data_split.test_x), data_split.test_y)
    assert rows["avg"]["accuracy"]["digits"] == pytest.approx(expected, abs=1e-6)
    assert rows["avg"]["normalized_average"] == pytest.approx(expected / ens)
    assert rows["avg"]["merge_seconds"] is not None
    assert "| avg |" in (out / "results.md").read_text()


# ---------------------------------------------------------------- fusion rows and plateau parents

FUSION_FILE = Path(__file__).parents[3] / "benchmarks" / "vision" / "methods-fusion.yaml"


def _in_process(fn, *args, **kwargs):  # bench.call_isolated without the fresh process
    return fn(*args, **kwargs), None


def test_a_fusion_row_is_fused_written_and_scored(suite, cache, tmp_path, monkeypatch):
    import yaml

    monkeypatch.setattr(bench, "call_isolated", _in_process)
    methods = {"methods": [{"name": "fused", "method": "average"}]}
    out = tmp_path / "out"
    payload = bench.run_bench("vision", methods, out, quick=True, cache_dir=cache, plots=False,
                              tasks=[FAMILY], keep_merged=True)  # fmt: skip
    (row,) = [r for r in payload["runs"] if r["name"] == "fused"]
    assert payload["failed"] == {} and row["merge_seconds"] is not None
    # oracle: fusion's plain average is the parents' mean, scored by the suite's pool
    mean = vt.average_state_dicts([p.state_dict for p in suite.parents])
    fused = vs.read_state_dict(out / "merged" / "fused", "mlp")
    assert all(torch.allclose(fused[k], mean[k], atol=1e-6) for k in mean)
    assert row["accuracy"] == suite.pool.evaluate(out / "merged" / "fused")
    folder = out / "merged" / "fused"
    doc = yaml.safe_load((folder / "mergeforge_fusion.yml").read_text())
    assert doc["method"] == "average" and doc["architecture"] == "mlp"
    assert doc["data"]["n"] == vs.FUSION_N and doc["data"]["dataset"] == "digits"
    assert doc["class_fractions"] == suite.split.class_share.tolist()
    assert doc["parents"] == [str(d) for d in suite.expert_dirs.values()]
    assert payload["settings"]["fusion"] == {"n": vs.FUSION_N, "seed": 0}


def test_call_isolated_runs_in_a_fresh_process_and_reports_failures():
    import os

    pid, peak = bench.call_isolated(os.getpid)
    assert pid != os.getpid() and peak > 0
    with pytest.raises(MergeforgeError, match="failed: ValueError"):
        bench.call_isolated(int, "not a number")


def test_unknown_and_bad_fusion_rows_fail_before_training(tmp_path):
    cache = tmp_path / "cache"
    cases = [
        ({"method": "nope"}, r"unknown method 'nope'; fusion methods: \[.*'average'.*merge "
                             r"methods: \[.*'linear'"),
        ({"method": "average", "parameters": {"alpha": 1}}, r"average has no parameters \['alpha'"),
        ({"method": "average", "model_parameters": {"weight": 1}}, "takes no model_parameters"),
        ({"method": "average", "parameters": {"weights": [[-1, 1]]}}, "non-negative"),
        ({"method": "average", "exclude": "head"}, "takes no exclude"),
    ]  # fmt: skip
    for entry, match in cases:
        with pytest.raises(ConfigError, match=match):
            bench.run_bench("vision", {"methods": [entry]}, tmp_path / "out", quick=True,
                            cache_dir=cache, plots=False)  # fmt: skip
    assert not cache.exists()  # nothing trained
    with pytest.raises(ConfigError, match="unknown method 'average'"):  # text: no fusion rows
        bench.load_methods({"methods": [{"method": "average"}]})


def test_the_fusion_methods_file_parses_for_every_registered_method():
    from mergeforge.fusion import FUSION_METHODS

    entries = __import__("yaml").safe_load(FUSION_FILE.read_text())["methods"]
    refs = (*bench.REFERENCE_METHODS, "ensemble", "ensemble_weighted", "parent0", "parent1")
    waiting = []
    for entry in entries:
        if entry["method"] in (*refs, *FUSION_METHODS):
            (run,) = bench.expand_entry(entry, references=refs, fusion=True)
            assert run.kind == ("fusion" if entry["method"] in FUSION_METHODS else "merge")
        else:
            waiting.append(entry["method"])
    if waiting:
        pytest.skip(f"fusion methods not registered yet: {sorted(set(waiting))}")


def test_the_plateau_recipe():
    plateau = vs.recipe_for("fashion_mnist", "vgg", "seeds2", plateau=True)
    assert (plateau.n_train, plateau.epochs, plateau.steps) == (None, 10, None)
    assert (plateau.batch_size, plateau.lr, plateau.schedule) == (128, 1e-3, "cosine")
    short = vs.recipe_for("fashion_mnist", "vgg", "seeds2")
    assert plateau.key() != short.key() and short.schedule == "constant"
    assert vs.recipe_for("digits", "mlp", "halves2", plateau=True).epochs == 100
    with pytest.raises(ConfigError, match="neither --quick nor --full"):
        vs.recipe_for("digits", "mlp", "seeds2", plateau=True, quick=True)
    suite = vs.VisionSuite(tasks=["fashion_mnist/vgg/seeds2"], parents="plateau")
    assert suite.recipe == plateau
    with pytest.raises(ConfigError, match="parents 'long' is not one of"):
        vs.VisionSuite(parents="long")


def _registered() -> list[str]:
    from mergeforge.fusion import FUSION_METHODS

    return sorted({m.name for m in FUSION_METHODS.values()})


@pytest.mark.parametrize("method", _registered())
def test_every_registered_fusion_method_runs_as_a_bench_row(suite, tmp_path, method):
    import yaml

    from mergeforge.fusion import get_method

    run = bench.BenchRun(name=method, family=method, method=method, kind="fusion")
    fn, args, kwargs = suite.fusion_job(run, tmp_path / method)
    result, _ = _in_process(fn, *args, **kwargs)
    doc = yaml.safe_load((tmp_path / method / "mergeforge_fusion.yml").read_text())
    assert doc["method"] == method and doc["result"] == result
    defaults = get_method(method).make_params({})
    assert doc["parameters"].keys() == defaults.__dataclass_fields__.keys()
    acc = suite.pool.evaluate(tmp_path / method)["digits"]
    assert 0.2 < acc <= 1.0  # a working classifier (chance: 0.1), whatever the method


def test_a_stopped_isolated_call_ends_its_process():
    """SIGTERM (Interrupted) while the child works: the child is terminated and joined, not
    left running after the bench unwinds."""
    import multiprocessing
    import os
    import signal
    import threading
    import time

    from mergeforge._signals import Interrupted, handle_signals

    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM))
    t0 = time.perf_counter()
    with pytest.raises(Interrupted), handle_signals():
        timer.start()
        bench.call_isolated(time.sleep, 120)
    timer.cancel()
    assert time.perf_counter() - t0 < 60
    assert multiprocessing.active_children() == []


def test_a_stopped_fusion_row_leaves_no_partial_output(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from mergeforge._signals import Interrupted

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "older").mkdir()  # another row's output: kept

    def stopped(fn, *args, **kwargs):  # the child got as far as a staging folder and the output
        out = args[0]
        (out.parent / f".{out.name}.mergeforge-partial-123").mkdir()
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise Interrupted(15)

    monkeypatch.setattr(bench, "call_isolated", stopped)
    run = SimpleNamespace(name="kf row", method="kf", params={}, family="fusion", swept=None,
                          exclude=(), kind="fusion")  # fmt: skip
    suite = SimpleNamespace(reference_methods=(), fusion_job=lambda run, out: (print, (out,), {}))
    with pytest.raises(Interrupted):
        bench._one_run(run, suite, {}, merged, keep=True)
    assert sorted(p.name for p in merged.iterdir()) == ["older"]
