"""Pool metrics, sweep expansion and report writing, against hand-computed values."""

from __future__ import annotations

import json

import pytest

from mergeforge.errors import ConfigError
from mergeforge.evaluate import report
from mergeforge.evaluate.bench import expand_entry, load_methods, results_from_json
from mergeforge.evaluate.pool import RunResult, average, evaluate_pool, normalized_accuracy

EXPERT = {"a": 0.8, "b": 0.5}


def _row(name="ties lambda=0.5", acc=None, **kw) -> RunResult:
    return RunResult(name=name, method="ties", params={"lambda": 0.5},
                     accuracy=acc or {"a": 0.6, "b": 0.5}, expert_accuracy=EXPERT,
                     merge_seconds=1.25, peak_rss_bytes=3 * 2**29, family="ties",
                     swept=("lambda",), **kw)  # fmt: skip


def test_normalized_accuracy_by_hand():
    # a: 0.6 / 0.8 = 0.75; b: 0.5 / 0.5 = 1.0; mean 0.875. Plain average (0.6 + 0.5) / 2 = 0.55.
    r = _row()
    assert r.average == pytest.approx(0.55)
    assert r.normalized == pytest.approx({"a": 0.75, "b": 1.0})
    assert r.normalized_average == pytest.approx(0.875)
    assert normalized_accuracy({"a": 0.9}, EXPERT) == pytest.approx({"a": 1.125})  # above expert
    with pytest.raises(ValueError, match="'c' has no expert"):
        normalized_accuracy({"c": 0.5}, EXPERT)
    with pytest.raises(ValueError, match="must be > 0"):
        normalized_accuracy({"a": 0.5}, {"a": 0.0})
    with pytest.raises(ValueError, match=r"\['b'\]"):
        average({"a": 1.0}, ["a", "b"])


def test_evaluate_pool_scores_every_task(tmp_path):
    class Pool:
        tasks = ("a", "b")

        def evaluate(self, model_dir, *, tasks=None):
            assert model_dir == tmp_path
            return {"a": 0.4, "b": 0.25}

    r = evaluate_pool(Pool(), tmp_path, name="x", method="linear", expert_accuracy=EXPERT)
    assert r.normalized == pytest.approx({"a": 0.5, "b": 0.5}) and r.eval_seconds >= 0
    assert r.family == "linear" and r.merge_seconds is None


def test_sweep_expansion_is_a_cartesian_product():
    entry = {"name": "t", "method": "ties",
             "parameters": {"lambda": [0.3, 1.0], "normalize": True},
             "model_parameters": {"density": [0.1, 0.2, 0.5], "weight": 1.0}}  # fmt: skip
    runs = expand_entry(entry)
    assert len(runs) == 6
    assert [r.name for r in runs[:4]] == [
        "t lambda=0.3 density=0.1", "t lambda=0.3 density=0.2", "t lambda=0.3 density=0.5",
        "t lambda=1 density=0.1",
    ]  # fmt: skip
    assert runs[0].parameters == {"lambda": 0.3, "normalize": True}
    assert runs[0].model_parameters == {"density": 0.1, "weight": 1.0}
    assert all(r.swept == ("lambda", "density") and r.family == "t" for r in runs)
    assert entry["parameters"]["lambda"] == [0.3, 1.0]  # input not mutated
    quick = expand_entry(entry, quick=True)  # middle value of each sweep
    assert [(r.parameters["lambda"], r.model_parameters["density"]) for r in quick] == [(1.0, 0.2)]
    assert [r.name for r in expand_entry({"method": "model_stock"})] == ["model_stock"]


def test_methods_file_validation(tmp_path):
    bad = [
        ({"methods": [{"method": "nope"}]}, "unknown method 'nope'"),
        (
            {"methods": [{"method": "ties", "parameters": {"lamda": 1}}]},
            r"no parameters \['lamda'\]",
        ),
        ({"methods": [{"method": "ties", "params": {}}]}, r"unknown key\(s\) \['params'\]"),
        ({"methods": [{"method": "pretrained", "parameters": {"x": 1}}]}, "takes no parameters"),
        ({"methods": [{"method": "linear"}, {"method": "linear"}]}, "repeat"),
        ({"methods": [{"method": "task_arithmetic", "parameters": {"lambda": []}}]}, "empty sweep"),
        ({"method": "ties"}, "'methods:' list"),
    ]
    for doc, match in bad:
        with pytest.raises(ConfigError, match=match):
            load_methods(doc)


def test_shipped_methods_file_expands():
    from pathlib import Path

    from mergeforge.methods import all_methods

    path = Path(__file__).parents[2] / "benchmarks" / "text" / "methods.yaml"
    runs = load_methods(path)
    names = [r.name for r in runs]
    assert names[:2] == ["pretrained", "simple_average"]
    ta = [r.parameters["lambda"] for r in runs if r.family == "task_arithmetic"]
    assert ta == pytest.approx([0.1 * i for i in range(1, 11)])
    assert sum(r.family == "ties" for r in runs) == 9  # 3 lambda x 3 density
    # Every registered method that merges several experts appears: in methods.yaml, or, for the
    # curvature-aware ones (their experts are trained with --optimizer adamw+recorder / umtam),
    # in methods-curvature.yaml. slerp, nuslerp, nearswap, arcee_fusion and passthrough take two
    # or one model, prune one expert.
    listed = {r.method for r in runs}
    curvature = {r.method for r in load_methods(path.with_name("methods-curvature.yaml"))}
    two_models = {"slerp", "nuslerp", "nearswap", "arcee_fusion", "passthrough", "prune"}
    assert {m.name for m in all_methods()} - listed == two_models | {"umtam", "ota"}
    assert {"umtam", "ota"} <= curvature


def test_markdown_json_round_trip(tmp_path):
    rows = [_row(), _row("linear", {"a": 0.8, "b": 0.25})]
    md = report.markdown_table(rows, ["a", "b"])
    lines = md.splitlines()
    assert lines[0] == "| method | a | b | average | normalized | merge s | peak RSS GiB |"
    assert lines[2] == "| ties lambda=0.5 | 60.0 | 50.0 | 55.0 | 87.5 | 1.2 | 1.50 |"
    assert lines[3].startswith("| linear | 80.0 | 25.0 | 52.5 | 75.0 |")
    report.write_json(tmp_path / "r.json", {"runs": [r.to_dict() for r in rows]})
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["runs"][0]["normalized_average"] == pytest.approx(0.875)
    back = results_from_json(tmp_path / "r.json")
    assert back[0] == rows[0] and back[1].average == pytest.approx(0.525)


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row(f"ties lambda={x}", {"a": x, "b": 0.5}) for x in (0.2, 0.6)]
    rows = [
        RunResult(**{**r.__dict__, "params": {"lambda": x}})
        for r, x in zip(rows, (0.2, 0.6), strict=True)
    ]
    paths = report.plot_results(rows, ["a", "b"], tmp_path)
    assert [p.name for p in paths] == ["accuracy_by_task.png", "sweep_ties.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
