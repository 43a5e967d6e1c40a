"""RAM and RAM+: hand-worked examples (numbers in the comments), the whole-model overlap count
against the per-tensor one, and mergekit's ``ram`` / ``ramplus_tl`` as the oracle."""

from __future__ import annotations

import pytest
import torch
from tests.methods._engine import merge_model, merge_tensor
from tests.methods._mergekit import SHAPES, experts, mergekit_tensor
from torch.testing import assert_close

from mergeforge.errors import ConfigError

T = torch.tensor
ZERO = torch.zeros(5)
TAUS = [T([1.0, 0.0, 2.0, 0.0, 0.5]), T([3.0, 0.0, 0.0, -1.0, 0.0]), T([0.0, 0.0, 4.0, 0.0, 0.0])]
PLUS = {"r": 0.5, "alpha": 1.5}


def test_ram():
    # changed by: [0] τ₁ τ₂ → mean 2; [1] none → 0; [2] τ₁ τ₃ → 3; [3] τ₂ alone → −1 whole;
    # [4] τ₁ alone → 0.5 whole
    assert_close(merge_tensor("ram", ZERO, TAUS), T([2.0, 0.0, 3.0, -1.0, 0.5]))
    # epsilon 0.75: τ₁'s 0.5 does not count as a change
    assert_close(merge_tensor("ram", ZERO, TAUS, {"epsilon": 0.75}), T([2.0, 0.0, 3.0, -1.0, 0.0]))


def test_ramplus_per_tensor():
    # (shared, unique) entries per model: τ₁ (2, 1) → ρ = 2; τ₂ (1, 1) → 1; τ₃ (1, 0) → 1/ε
    # λ = 1 + ½·min(ρ, 1.5) = [1.75, 1.5, 1.75]: unique entries [3] −1·1.5, [4] 0.5·1.75
    out = merge_tensor("ramplus_tl", ZERO, TAUS, PLUS)
    assert_close(out, T([2.0, 0.0, 3.0, -1.5, 0.875]))
    # r = 0 is RAM
    assert_close(
        merge_tensor("ramplus_tl", ZERO, TAUS, {"r": 0.0}), merge_tensor("ram", ZERO, TAUS)
    )


def test_ramplus_over_the_whole_model():
    # a second tensor where τ₁ alone changes both entries: over the model τ₁ has (2, 3) → ρ = ⅔,
    # λ₁ = 1 + ½·⅔ = 4/3; τ₂ (1, 1) → 1.5; per tensor, τ₁ in b has (0, 2) → ρ = 0, λ = 1
    model = {
        "a": (ZERO, TAUS),
        "b": (torch.zeros(2), [T([1.0, 1.0]), torch.zeros(2), torch.zeros(2)]),
    }
    whole = merge_model("ramplus_tl", model, {**PLUS, "overlap_scope": "model"})
    assert_close(whole["a"], T([2.0, 0.0, 3.0, -1.5, 0.5 * 4 / 3]))
    assert_close(whole["b"], T([4 / 3, 4 / 3]))
    local = merge_model("ramplus_tl", model, PLUS)
    assert_close(local["b"], T([1.0, 1.0]))


@pytest.mark.parametrize(
    ("params", "needle"),
    [({"epsilon": -1.0}, "'epsilon'"), ({"alpha": -0.1}, "'alpha'"),
     ({"overlap_scope": "layer"}, "tensor, model")],
)  # fmt: skip
def test_bad_parameters(params, needle):
    with pytest.raises(ConfigError, match=needle):
        merge_tensor("ramplus_tl", ZERO, TAUS, params)


@pytest.mark.mergekit
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("name", "shared"),
    [("ram", {}), ("ram", {"epsilon": 0.1}), ("ramplus_tl", {}),
     ("ramplus_tl", {"epsilon": 0.1, "r": 0.7, "alpha": 0.9})],
)  # fmt: skip
def test_same_as_mergekit(name, shared, shape):
    base, xs = experts(shape)
    theirs = mergekit_tensor(name, base, xs, shared)
    ours = merge_tensor(name, base, xs, shared)
    assert (ours - theirs).abs().max().item() <= 1e-6
