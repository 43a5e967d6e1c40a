"""SCE: a hand-worked example per step (numbers in the comments) and mergekit's ``sce`` as the
oracle (≤ 1e-6 in fp32)."""

from __future__ import annotations

import pytest
import torch
from tests.methods._engine import merge_tensor
from tests.methods._mergekit import SHAPES, experts, mergekit_tensor
from torch.testing import assert_close

from mergeforge.errors import ConfigError
from mergeforge.methods.sce import calculate, select

T = torch.tensor
ZERO = torch.zeros(4)
TAU1, TAU2 = T([1.0, -2.0, 0.0, 3.0]), T([3.0, 2.0, -1.0, 0.0])


def test_sce_without_select():
    # calculate: mean squares 14/4 and 14/4 → η = [½, ½]
    # erase: Σ τ = [4, 0, −1, 3] → signs [+, + (tie), −, +]; agreeing (non-zero, same sign):
    # [0] both → (½·1 + ½·3)/1 = 2; [1] τ₂ → 2; [2] τ₂ → −1; [3] τ₁ → 3
    assert_close(merge_tensor("sce", ZERO, [TAU1, TAU2]), T([2.0, 2.0, -1.0, 3.0]))
    # τ₂ doubled: mean squares 3.5 and 14 → η = [0.2, 0.8]; [0]: (0.2·1 + 0.8·6)/1 = 5
    assert_close(merge_tensor("sce", ZERO, [TAU1, 2 * TAU2]), T([5.0, 4.0, -2.0, 3.0]))


def test_sce_with_select():
    # variance over the 2 models ((τ₁ − τ₂)/2)²: [1, 4, 0.25, 2.25], 4 non-zero; select_topk ½
    # keeps k = 2: entries 1 and 3 → τ₁ = [0, −2, 0, 3], τ₂ = [0, 2, 0, 0]
    # η ∝ [13/4, 1] → [13/17, 4/17]; Σ τ = [0, 0, 0, 3] → + everywhere; [1]: only τ₂ agrees → 2
    out = merge_tensor("sce", ZERO, [TAU1, TAU2], {"select_topk": 0.5})
    assert_close(out, T([0.0, 2.0, 0.0, 3.0]))
    deltas = torch.stack([TAU1, TAU2])
    assert select(deltas, 0.5).tolist() == [False, True, False, True]
    assert select(deltas, 0.2).tolist() == [False] * 4  # ⌊0.2·4⌋ = 0 entries
    assert_close(calculate(deltas * select(deltas, 0.5)), T([13 / 17, 4 / 17]))
    # select_topk 0 keeps nothing: the base
    assert torch.equal(merge_tensor("sce", ZERO, [TAU1, TAU2], {"select_topk": 0.0}), ZERO)


def test_sce_tiny_task_vectors_get_equal_coefficients():
    # Σ mean(τ²) < 1e-6: no signal to weigh by, η = 1/N (mergekit's rule)
    small = [1e-4 * TAU1, 1e-4 * 2 * TAU2]
    assert_close(calculate(torch.stack(small)), T([0.5, 0.5]))


def test_bad_select_topk():
    with pytest.raises(ConfigError, match="'select_topk' = 1.5 is invalid"):
        merge_tensor("sce", ZERO, [TAU1, TAU2], {"select_topk": 1.5})


@pytest.mark.mergekit
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("select_topk", [1.0, 0.6, 0.1, 0.0])
def test_same_as_mergekit(shape, select_topk):
    base, xs = experts(shape)
    shared = {"select_topk": select_topk}
    theirs = mergekit_tensor("sce", base, xs, shared)
    ours = merge_tensor("sce", base, xs, shared)
    assert (ours - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shape", [(2, 1001), (3, 64, 33), (5, 7), (8, 4099)])
def test_fast_variance_is_torch_var_bit_for_bit(shape):
    """The select step's variance (Welford in float64 across whole task vectors) equals
    ``torch.var(dim=0, unbiased=False)`` exactly, ties and zero-variance entries included."""
    from mergeforge.methods.sce import _variance

    g = torch.Generator().manual_seed(sum(shape))
    d = torch.randn(shape, generator=g) * torch.logspace(-8, 2, shape[-1])
    d[:, : shape[-1] // 4] = d[0, : shape[-1] // 4]  # identical across tasks: variance 0
    assert torch.equal(_variance(d), d.var(dim=0, unbiased=False))
    half = d.half()
    assert torch.equal(_variance(half), half.var(dim=0, unbiased=False))
