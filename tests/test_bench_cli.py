"""`mergeforge bench`: the command line, with the suite, merge and evaluation stubbed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeforge.cli import main
from mergeforge.evaluate import bench

TASKS = ("alpha", "beta")
EXPERT = {"alpha": 0.8, "beta": 0.5}


class FakePool:
    tasks = TASKS

    def evaluate(self, model_dir, *, tasks=None):
        # The base scores 0.4 everywhere; a merge scores what its folder name encodes.
        name = Path(model_dir).name
        if name == "base":
            return dict.fromkeys(TASKS, 0.4)
        lam = float(name.rsplit("=", 1)[1]) if "=" in name else 0.5
        return {"alpha": lam, "beta": 0.25}


class FakeSuite:
    name = "fake"

    def __init__(self, *, quick, full, cache_dir, tasks, console):
        self.quick = quick
        self.pool = FakePool()

    def prepare(self):
        self.base_dir = Path("/nowhere/base")
        self.expert_dirs = {t: Path(f"/nowhere/{t}") for t in TASKS}

    def expert_accuracy(self):
        return dict(EXPERT)

    def settings(self):
        return {"quick": self.quick}


@pytest.fixture
def stubbed(monkeypatch):
    merges = []

    def fake_merge(config, out):
        merges.append(config)
        return 1.5, 2**30

    monkeypatch.setitem(bench.SUITES, "fake", FakeSuite)
    monkeypatch.setattr(bench, "merge_isolated", fake_merge)
    return merges


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--methods", "--quick", "--full", "--out", "--tasks", "SUITE".lower()):
        assert flag in out.lower()


def test_bench_run_writes_the_table_json_and_markdown(tmp_path, stubbed, capsys):
    methods = tmp_path / "methods.yaml"
    methods.write_text(
        "methods:\n"
        "  - {name: pretrained, method: pretrained}\n"
        "  - {name: ta, method: task_arithmetic, parameters: {lambda: [0.2, 0.6]}}\n"
        "  - {name: avg, method: linear}\n"
    )
    out = tmp_path / "res"
    assert main(["bench", "fake", "--methods", str(methods), "--out", str(out), "--no-plots"]) == 0

    # Two task-arithmetic merges with the swept lambda, and a base-free linear merge.
    assert [c["merge_method"] for c in stubbed] == ["task_arithmetic", "task_arithmetic", "linear"]
    assert [c["parameters"]["lambda"] for c in stubbed[:2]] == [0.2, 0.6]
    assert "base_model" in stubbed[0] and "base_model" not in stubbed[2]
    assert [m["model"] for m in stubbed[0]["models"]] == ["/nowhere/alpha", "/nowhere/beta"]

    md = (out / "results.md").read_text().splitlines()
    assert md[0] == "| method | alpha | beta | average | normalized | merge s | peak RSS GiB |"
    assert md[2] == "| experts (own task) | 80.0 | 50.0 | 65.0 | 100.0 |  |  |"
    assert md[3] == "| pretrained | 40.0 | 40.0 | 40.0 | 65.0 |  |  |"
    # lambda 0.6: alpha 0.6 / 0.8 = 75 %, beta 0.25 / 0.5 = 50 %: normalized 62.5.
    assert md[5] == "| ta lambda=0.6 | 60.0 | 25.0 | 42.5 | 62.5 | 1.5 | 1.00 |"

    data = json.loads((out / "results.json").read_text())
    assert data["suite"] == "fake" and data["tasks"] == list(TASKS) and data["failed"] == {}
    rows = {r["name"]: r for r in data["runs"]}
    assert rows["ta lambda=0.2"]["params"] == {"lambda": 0.2}
    assert rows["ta lambda=0.2"]["swept"] == ["lambda"]
    assert rows["ta lambda=0.6"]["normalized_average"] == pytest.approx(0.625)
    assert rows["ta lambda=0.6"]["peak_rss_bytes"] == 2**30

    printed = capsys.readouterr().out
    for col in ("method", "alpha", "beta", "average", "normalized", "merge s", "peak RSS GiB"):
        assert col in printed


def test_bench_rejects_a_bad_methods_file_before_work(tmp_path, stubbed, capsys):
    methods = tmp_path / "m.yaml"
    methods.write_text("methods:\n  - {method: ties, parameters: {lamda: 0.5}}\n")
    assert main(["bench", "fake", "--methods", str(methods), "--out", str(tmp_path)]) != 0
    assert "lamda" in capsys.readouterr().err and stubbed == []


def test_bench_unknown_suite(tmp_path, capsys):
    methods = tmp_path / "m.yaml"
    methods.write_text("methods:\n  - {method: linear}\n")
    assert main(["bench", "nope", "--methods", str(methods), "--out", str(tmp_path)]) != 0
    assert "unknown suite 'nope'" in capsys.readouterr().err


def test_bench_resume_reuses_finished_rows_only(tmp_path, stubbed):
    methods = tmp_path / "methods.yaml"
    methods.write_text(
        "methods:\n  - {name: ta, method: task_arithmetic, parameters: {lambda: [0.2, 0.6]}}\n"
    )
    out = tmp_path / "res"
    args = ["bench", "fake", "--methods", str(methods), "--out", str(out), "--no-plots"]
    assert main(args) == 0
    assert len(stubbed) == 2 and json.loads((out / "results.json").read_text())["complete"]
    # one more sweep value: --resume merges only the new one, and keeps the old rows
    methods.write_text(
        "methods:\n  - {name: ta, method: task_arithmetic, parameters: {lambda: [0.2, 0.6, 1.0]}}\n"
    )
    assert main([*args, "--resume"]) == 0
    assert [c["parameters"]["lambda"] for c in stubbed[2:]] == [1.0]
    rows = [r["name"] for r in json.loads((out / "results.json").read_text())["runs"]]
    assert rows == ["experts (own task)", "ta lambda=0.2", "ta lambda=0.6", "ta lambda=1"]
    # without --resume everything runs again
    assert main(args) == 0
    assert len(stubbed) == 6


def test_bench_resume_reads_a_setting_added_later_as_its_default(tmp_path, stubbed, monkeypatch):
    methods = tmp_path / "methods.yaml"
    methods.write_text("methods:\n  - {name: ta, method: task_arithmetic}\n")
    out = tmp_path / "res"
    args = ["bench", "fake", "--methods", str(methods), "--out", str(out), "--no-plots"]
    assert main(args) == 0 and len(stubbed) == 1  # results.json without "backbone"
    # The suite then gains a setting; older files are read as having its default.
    monkeypatch.setattr(FakeSuite, "settings", lambda self: {"quick": False, "backbone": "a"})
    monkeypatch.setattr(FakeSuite, "settings_defaults", {"backbone": "a"}, raising=False)
    assert main([*args, "--resume"]) == 0 and len(stubbed) == 1  # reused
    # Another value of the new setting is another experiment: nothing is reused.
    monkeypatch.setattr(FakeSuite, "settings", lambda self: {"quick": False, "backbone": "b"})
    assert main([*args, "--resume"]) == 0 and len(stubbed) == 2


def test_bench_exclude_reaches_the_merge_config_and_the_resume_key(tmp_path, stubbed):
    methods = tmp_path / "methods.yaml"
    methods.write_text(
        "methods:\n"
        "  - {name: ta, method: task_arithmetic, exclude: ['LayerNorm', 'bias']}\n"
        "  - {name: avg, method: linear, exclude: embeddings}\n"
    )
    out = tmp_path / "res"
    args = ["bench", "fake", "--methods", str(methods), "--out", str(out), "--no-plots"]
    assert main(args) == 0
    assert [c.get("exclude") for c in stubbed] == [["LayerNorm", "bias"], ["embeddings"]]
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert rows["ta"]["exclude"] == ["LayerNorm", "bias"]
    assert rows["experts (own task)"]["exclude"] == []
    # Same exclusions: reused. Changed exclusions: merged again (the row would differ).
    methods.write_text(
        "methods:\n"
        "  - {name: ta, method: task_arithmetic, exclude: ['LayerNorm', 'bias']}\n"
        "  - {name: avg, method: linear}\n"
    )
    assert main([*args, "--resume"]) == 0
    assert len(stubbed) == 3 and "exclude" not in stubbed[2]


def test_bench_exclude_is_checked_before_work(tmp_path, stubbed, capsys):
    for bad, match in (
        ("exclude: '(oops'", "not a valid regex"),
        ("exclude: {a: 1}", "a regex or a list of regexes"),
    ):
        methods = tmp_path / "m.yaml"
        methods.write_text(f"methods:\n  - {{method: linear, {bad}}}\n")
        assert main(["bench", "fake", "--methods", str(methods), "--out", str(tmp_path)]) != 0
        assert match in capsys.readouterr().err and stubbed == []
    methods.write_text("methods:\n  - {method: pretrained, exclude: bias}\n")
    assert main(["bench", "fake", "--methods", str(methods), "--out", str(tmp_path)]) != 0
    assert "takes no exclude" in capsys.readouterr().err
