"""The fine-tuning recipe on the real MiniLM base: 2 steps on a tiny slice."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergeforge.evaluate.text.experts import FinetuneRecipe, _batches, finetune_expert
from mergeforge.evaluate.text.tasks import load_news_topic

RECIPE = FinetuneRecipe(steps=2, batch_size=4, max_length=16)


@pytest.fixture(scope="module")
def tiny_task():
    return load_news_topic(n_train=10, n_test=5)


@pytest.fixture(scope="module")
def expert(base_dir, tiny_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("expert")
    losses = []
    stats = finetune_expert(
        base_dir, tiny_task, out, recipe=RECIPE, on_step=lambda s, l: losses.append((s, l))
    )
    return out, stats, losses


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_loss_is_finite_and_reported_each_step(expert):
    _, stats, losses = expert
    assert [s for s, _ in losses] == [1, 2]
    assert len(stats["losses"]) == 2 and all(math.isfinite(x) for x in stats["losses"])
    assert stats["losses"][0] == pytest.approx(math.log(5), abs=0.5)  # fresh 5-way head
    assert stats["seconds"] > 0


def test_saved_encoder_has_the_base_tensor_names_and_new_weights(expert, base_dir):
    out, _, _ = expert
    base = _tensors(base_dir / "model.safetensors")
    tuned = _tensors(out / "encoder" / "model.safetensors")
    assert tuned.keys() == base.keys() and len(base) == 103
    assert all(tuned[k].shape == base[k].shape and tuned[k].dtype == base[k].dtype for k in base)
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert "encoder.layer.5.output.dense.weight" in changed
    assert "embeddings.word_embeddings.weight" in changed
    # The pooler is off the mean-pooling path: no gradient, so AdamW leaves it (and its task
    # vector is zero).
    assert sorted(set(base) - set(changed)) == ["pooler.dense.bias", "pooler.dense.weight"]


def test_saved_folders_load_offline(expert, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, _, _ = expert
    model = AutoModel.from_pretrained(str(out / "encoder"))
    assert type(model).__name__ == "BertModel"
    assert AutoTokenizer.from_pretrained(str(out / "encoder"))("a b")["input_ids"][0] == 101
    head = load_file(out / "head.safetensors")
    assert head["weight"].shape == (5, 384) and head["bias"].shape == (5,)
    assert json.loads((out / "labels.json").read_text()) == list(load_news_topic().labels)


def test_same_seed_same_expert(expert, base_dir, tiny_task, tmp_path):
    out, stats, _ = expert
    again = finetune_expert(base_dir, tiny_task, tmp_path, recipe=RECIPE)
    assert again["losses"] == stats["losses"]
    first, second = (
        _tensors(out / "encoder/model.safetensors"),
        _tensors(tmp_path / "encoder/model.safetensors"),
    )
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_batches_walk_through_epochs():
    batches = _batches(5, 2, 5, seed=0)
    assert [len(b) for b in batches] == [2] * 5
    flat = [i for b in batches for i in b]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert _batches(5, 2, 5, seed=0) == batches


def test_recipe_validates():
    with pytest.raises(ValueError, match="steps"):
        FinetuneRecipe(steps=0)
