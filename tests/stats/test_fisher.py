"""Diagonal Fisher = mean of per-example squared gradients of the log-likelihood."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from mergeforge.stats.fisher import diagonal_fisher


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(1)
    examples = [(torch.randn(3, generator=g), torch.tensor(i % 3)) for i in range(5)]
    return model, examples


def _by_hand(model, examples, labels):
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for (x, _), y in zip(examples, labels, strict=True):
        model.zero_grad()
        torch.log_softmax(model(x), -1)[y].backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad**2
    return {n: a / len(examples) for n, a in acc.items()}


def _fn(model):
    return lambda ex: (model(ex[0])[None], ex[1][None])


def test_empirical_fisher_is_mean_squared_per_example_gradient():
    model, examples = _setup()
    got, n = diagonal_fisher(dict(model.named_parameters()), examples, _fn(model),
                             mode="empirical")  # fmt: skip
    want = _by_hand(model, examples, [y for _, y in examples])
    assert n == 5 and set(got) == set(want)
    for k in want:
        assert_close(got[k], want[k], rtol=1e-5, atol=1e-8)
        assert got[k].shape == dict(model.named_parameters())[k].shape


def test_sampled_fisher_draws_labels_from_the_model_with_the_seed():
    model, examples = _setup()
    params = dict(model.named_parameters())
    a, _ = diagonal_fisher(params, examples, _fn(model), mode="sampled", seed=3)
    b, _ = diagonal_fisher(params, examples, _fn(model), mode="sampled", seed=3)
    c, _ = diagonal_fisher(params, examples, _fn(model), mode="sampled", seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    gen = torch.Generator().manual_seed(3)  # the same draws, by hand
    with torch.no_grad():
        ys = [torch.multinomial(torch.softmax(model(x), -1)[None], 1, generator=gen).item()
              for x, _ in examples]  # fmt: skip
    want = _by_hand(model, examples, ys)
    for k in want:
        assert_close(a[k], want[k], rtol=1e-5, atol=1e-8)


def test_unused_parameters_get_zero_and_grads_are_untouched():
    model, examples = _setup()
    extra = nn.Parameter(torch.ones(2))
    params = {**dict(model.named_parameters()), "unused": extra}
    got, _ = diagonal_fisher(params, examples, _fn(model), mode="empirical")
    assert torch.equal(got["unused"], torch.zeros(2))
    assert all(p.grad is None for p in model.parameters())


def test_no_examples_is_an_error():
    model, _ = _setup()
    with pytest.raises(ValueError, match="no examples"):
        diagonal_fisher(dict(model.named_parameters()), [], _fn(model))
