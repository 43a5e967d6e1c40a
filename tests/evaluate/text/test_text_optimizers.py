"""The text suite's ``optimizer`` choice (issue 14): cache keys, curvature sidecars, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mergeforge.errors import ConfigError
from mergeforge.evaluate.bench import _finished_rows, get_suite
from mergeforge.evaluate.pool import RunResult
from mergeforge.evaluate.text.experts import OPTIMIZERS, FinetuneRecipe, finetune_expert
from mergeforge.evaluate.text.suite import TextSuite
from mergeforge.evaluate.text.tasks import load_news_topic

OLD_RECIPE_KEYS = {"steps", "batch_size", "max_length", "lr", "head_lr", "weight_decay", "seed"}


@pytest.fixture(scope="module")
def four_texts():
    """Four training texts: every batch of 4 is the whole set, so the loss should fall."""
    return load_news_topic(n_train=4, n_test=5)


def _suite(tmp_path, **kw) -> TextSuite:
    suite = TextSuite(quick=True, tasks=["polarity"], cache_dir=tmp_path, **kw)
    suite.base_sha = "0" * 64
    suite.data = {"polarity": suite._load("polarity")}
    return suite


def test_the_optimizer_is_in_the_expert_cache_key_and_adamw_keys_are_unchanged(tmp_path):
    folders = {o: _suite(tmp_path, optimizer=o)._expert_folder("polarity") for o in OPTIMIZERS}
    assert len(set(folders.values())) == len(OPTIMIZERS) == 4
    assert _suite(tmp_path)._expert_folder("polarity") == folders["adamw"]
    keys = {o: json.loads(f.with_suffix(".json").read_text()) for o, f in folders.items()}
    assert set(keys["adamw"]["finetune"]) == OLD_RECIPE_KEYS  # the keys of existing caches
    assert keys["adamw+recorder"]["finetune"]["optimizer"] == "adamw+recorder"
    assert (
        keys["umtam"]["finetune"]["optimizer"] == "umtam" and "umtam" in keys["umtam"]["finetune"]
    )
    assert keys["umtam"]["finetune"]["umtam"]["svd"] == "randomized"
    assert keys["umtam-subspace"]["finetune"]["umtam"]["svd"] == "subspace"


def test_a_bad_optimizer_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown optimizer 'sgd': choose one of adamw, adamw\+"):
        TextSuite(quick=True, cache_dir=tmp_path, optimizer="sgd")
    with pytest.raises(ConfigError, match="unknown optimizer"):
        FinetuneRecipe(optimizer="AdamW")
    with pytest.raises(ConfigError, match=r"suite 'vision' takes no option\(s\) \['optimizer'\]"):
        get_suite("vision", options={"optimizer": "umtam"}, cache_dir=tmp_path)


def test_an_old_results_file_resumes_as_adamw(tmp_path):
    def settings(**kw):
        suite = _suite(tmp_path, **kw)
        suite.expert_root = {}
        return suite, suite.settings()

    suite, now = settings()
    assert now["optimizer"] == "adamw" and suite.settings_defaults["optimizer"] == "adamw"
    old = {k: v for k, v in now.items() if k not in ("optimizer", "backbone")}
    row = RunResult(name="ta", method="task_arithmetic", params={"lambda": 0.3},
                    accuracy={"polarity": 0.5}, expert_accuracy={"polarity": 0.9})  # fmt: skip
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"settings": old, "runs": [row.to_dict()]}))
    assert len(_finished_rows(path, now, suite.settings_defaults)) == 1
    umtam, umtam_now = settings(optimizer="umtam")
    assert _finished_rows(path, umtam_now, umtam.settings_defaults) == {}


def _train(base_dir, task, out, optimizer, steps=2):
    recipe = FinetuneRecipe(steps=steps, batch_size=4, max_length=16, optimizer=optimizer)
    return finetune_expert(base_dir, task, out, recipe=recipe)


def _check_shapes(stats, encoder_dir):
    from mergeforge.evaluate.text.eval import load_encoder

    params = dict(load_encoder(encoder_dir).named_parameters())
    assert set(stats) == set(params)
    for name, p in params.items():
        if p.dim() >= 2:
            assert stats[name].R.shape == (p.shape[0],), name
            assert stats[name].C.shape == (p[0].numel(),), name
        else:
            assert stats[name].R.shape == p.shape and stats[name].C is None, name
    return params


def test_adamw_with_recorder_writes_a_curvature_sidecar(base_dir, four_texts, tmp_path):
    from mergeforge.train import load_curvature

    summary = _train(base_dir, four_texts, tmp_path, "adamw+recorder")
    assert summary["optimizer"] == "adamw+recorder"
    stats, meta = load_curvature(tmp_path / "encoder")
    params = _check_shapes(stats, tmp_path / "encoder")
    assert (meta.steps, meta.source, meta.examples) == (2, "recorder:AdamW", 8)
    assert all(stats[n].v.shape == p.shape for n, p in params.items())  # exp_avg_sq, for OTA
    assert float(stats["encoder.layer.0.attention.self.query.weight"].R.sum()) > 0


@pytest.mark.parametrize("optimizer", ["umtam", "umtam-subspace"])
def test_umtam_trains_and_exports(base_dir, four_texts, tmp_path, optimizer):
    from mergeforge.train import load_curvature

    summary = _train(base_dir, four_texts, tmp_path, optimizer, steps=5)
    losses = summary["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    stats, meta = load_curvature(tmp_path / "encoder")
    _check_shapes(stats, tmp_path / "encoder")
    assert (meta.steps, meta.source, meta.examples) == (5, "umtam-optimizer", 20)
    # the pooler gets no gradient (mean pooling): UMTAM's initial statistics
    assert torch.equal(stats["pooler.dense.weight"].R, torch.full((384,), 1e-8))
    assert float(stats["encoder.layer.0.attention.self.query.weight"].R.sum()) > 384 * 1e-8


def test_adamw_experts_without_curvature_are_refused_with_the_fix(tmp_path):
    from mergeforge.errors import ValidationError
    from mergeforge.methods.curvature import curvature_inputs

    suite = _suite(tmp_path)
    (tmp_path / "encoder").mkdir()
    suite.expert_dirs = {"polarity": tmp_path / "encoder"}
    with pytest.raises(ValidationError, match=r"--optimizer adamw\+recorder.*polarity expert"):
        suite.prepare_statistics(curvature_inputs())
