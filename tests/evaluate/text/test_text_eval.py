"""Pooling, embedding and head accuracy against hand-computed values."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mergeforge.errors import CheckpointError
from mergeforge.evaluate.text.eval import (
    embed,
    evaluate_accuracy,
    load_head,
    mean_pool,
    save_head,
)


class DigitTokenizer:
    """Token ids are the whitespace-separated integers of the text; 0-padded like BERT's."""

    def __call__(self, texts, *, padding, truncation, max_length, return_tensors):
        ids = [[int(w) for w in t.split()][:max_length] for t in texts]
        width = max(map(len, ids))
        return {
            "input_ids": torch.tensor([r + [0] * (width - len(r)) for r in ids]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
        }


class IdEncoder(nn.Module):
    """Hidden state of a token = (its id, 1.0): the mean-pooled embedding is (mean id, 1)."""

    def forward(self, input_ids, attention_mask):
        hidden = torch.stack([input_ids.float(), torch.ones_like(input_ids, dtype=torch.float)], -1)
        return SimpleNamespace(last_hidden_state=hidden)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_evaluate_accuracy_by_hand():
    # Mean ids: 2, 10, 4, 4.5. The head predicts class 0 iff mean id > 5: 1, 0, 1, 1.
    examples = [("1 3", 1), ("10", 0), ("4 4 4 4", 0), ("0 9", 1)]
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, -5.0], [0.0, 0.0]]))
        head.bias.zero_()
    # batch_size=3 mixes lengths and reorders texts by length: results must come back in order.
    emb = embed(IdEncoder(), DigitTokenizer(), [t for t, _ in examples], batch_size=3)
    assert torch.equal(emb, torch.tensor([[2.0, 1.0], [10.0, 1.0], [4.0, 1.0], [4.5, 1.0]]))
    acc = evaluate_accuracy(IdEncoder(), DigitTokenizer(), head, examples, batch_size=3)
    assert acc == 0.75
    # Truncation at max_length tokens: "4 4 20" -> "4 4" has mean 4 -> class 1.
    assert evaluate_accuracy(IdEncoder(), DigitTokenizer(), head, [("4 4 20", 1)], max_length=2)


def test_embed_is_padding_invariant_on_a_tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    model = BertModel(config).train()  # embed must switch dropout off, then restore the mode
    texts = ["1 2 3 4 5", "6", "7 8", "9 10 11"]
    together = embed(model, DigitTokenizer(), texts, batch_size=4)
    alone = torch.cat([embed(model, DigitTokenizer(), [t]) for t in texts])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert model.training


def test_head_round_trip(tmp_path):
    head = nn.Linear(4, 3)
    save_head(head, ["a", "b", "c"], tmp_path)
    loaded, labels = load_head(tmp_path)
    assert labels == ("a", "b", "c")
    assert torch.equal(loaded.weight, head.weight) and torch.equal(loaded.bias, head.bias)
    with pytest.raises(ValueError, match="3 outputs for 2 labels"):
        save_head(head, ["a", "b"], tmp_path)
    with pytest.raises(CheckpointError, match="head.safetensors"):
        load_head(tmp_path / "missing")
