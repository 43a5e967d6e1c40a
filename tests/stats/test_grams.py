"""Gram hooks: G = XᵀX / n over non-padding rows, keyed by the weight's name."""

from __future__ import annotations

import torch
from torch import nn
from torch.testing import assert_close

from mergeforge.stats.grams import GramRecorder, compute_grams, linear_modules


def _batches(g, in_dim=5):
    x1 = torch.randn(2, 4, in_dim, generator=g)
    m1 = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    x2 = torch.randn(1, 3, in_dim, generator=g)
    m2 = torch.ones(1, 3, dtype=torch.long)
    return [{"x": x1, "attention_mask": m1}, {"x": x2, "attention_mask": m2}]


def _by_hand(batches) -> torch.Tensor:
    rows = torch.cat([b["x"][b["attention_mask"].bool()] for b in batches])  # (n_real, in)
    return rows.T @ rows / rows.shape[0]


def test_linear_gram_is_xtx_over_n_without_padding():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    batches = _batches(g)
    grams = compute_grams(model, batches, lambda b: model(b["x"]))
    assert set(grams) == {"0.weight", "2.weight"}
    assert grams["0.weight"].shape == (5, 5) and grams["2.weight"].shape == (3, 3)
    assert_close(grams["0.weight"], _by_hand(batches), rtol=1e-5, atol=1e-6)
    hidden = [{"x": torch.relu(model[0](b["x"])).detach(), "attention_mask": b["attention_mask"]}
              for b in batches]  # fmt: skip
    assert_close(grams["2.weight"], _by_hand(hidden), rtol=1e-5, atol=1e-6)


def test_padding_rows_do_not_count():
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 3))
    batches = _batches(g)
    with_pad = [{**b, "x": b["x"].clone()} for b in batches]
    with_pad[0]["x"][0, 3] = 1e3  # a padding position: must not change the Gram
    a = compute_grams(model, batches, lambda b: model(b["x"]))["0.weight"]
    b = compute_grams(model, with_pad, lambda b: model(b["x"]))["0.weight"]
    assert_close(a, b)


def test_unmasked_inputs_count_every_row_and_hooks_are_removed():
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 3))
    x = torch.randn(6, 5, generator=g)  # (B, H): leading shape differs from any mask
    with GramRecorder(model) as rec:
        rec.mask = torch.ones(6, 9)
        model(x)
    assert_close(rec.grams()["0.weight"], x.T @ x / 6)
    assert not model[0]._forward_hooks


def test_conv1d_gram_is_over_its_input_dimension():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=3, nx=5)  # weight (in=5, out=3)
    model = nn.ModuleDict({"c_attn": conv})
    assert set(linear_modules(model)) == {"c_attn"}
    batches = _batches(torch.Generator().manual_seed(3))
    grams = compute_grams(model, batches, lambda b: conv(b["x"]))
    assert_close(grams["c_attn.weight"], _by_hand(batches), rtol=1e-5, atol=1e-6)
