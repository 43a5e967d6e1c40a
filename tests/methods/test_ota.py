"""OTA (issue 14 item 5) against its definitions.

Oracles: p = 0 is the plain average (``linear``); hand-worked weights v^p with and without the
normalisations; the rank-1 estimate R Cᵀ / ΣR (from sums or from means) equal to v when v is
rank 1 and to OTA's Lemma 1 (row sums ⊗ column sums / total) in general; Fast Fisher Grafting's
mask and its fallback to the base; bad inputs.
"""

from __future__ import annotations

import pytest
import torch
from tests.methods._engine import merge_model
from tests.methods._engine import random_family as make_model
from torch.testing import assert_close

from mergeforge.errors import ConfigError, ValidationError
from mergeforge.methods.curvature import second_moment


def stats_of(model, seed=1, v=True):
    """Per key and expert: R, C (R alone for 1-D) and, with ``v``, a dense exp_avg_sq."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (base, xs) in model.items():
        parts = []
        for _ in xs:
            p = {":R": torch.rand(base.shape[0], generator=g) + 0.05}
            if base.dim() >= 2:
                p[":C"] = torch.rand(base[0].numel(), generator=g) + 0.05
            if v:
                p[":v"] = torch.rand(base.shape, generator=g) + 0.01
            parts.append(p)
        out[key] = tuple(parts)
    return out


def test_power_zero_is_the_plain_average():
    model = make_model()
    ours = merge_model("ota", model, {"power": 0.0}, sidecars=stats_of(model))
    avg = merge_model("linear", {k: (None, xs) for k, (_, xs) in model.items()})
    for key in model:
        assert torch.equal(ours[key], avg[key]), key


@pytest.mark.parametrize(
    ("params", "want"),
    [
        # θ₁ = [1, 2], θ₂ = [3, 6]; v₁ = [4, 1], v₂ = [1, 9] -> v^½: [2, 1], [1, 3]
        ({}, [(2 * 1 + 1 * 3) / 3, (1 * 2 + 3 * 6) / 4]),
        ({"power": 1.0}, [(4 * 1 + 1 * 3) / 5, (1 * 2 + 9 * 6) / 10]),
        # divided by their means 1.5 and 2: [4/3, 2/3], [1/2, 3/2]
        (
            {"normalization": "mean"},
            [(4 / 3 + 3 / 2) / (4 / 3 + 1 / 2), (4 / 3 + 9) / (2 / 3 + 3 / 2)],
        ),
        # divided by their sums 3 and 4: [2/3, 1/3], [1/4, 3/4]
        (
            {"normalization": "sum"},
            [(2 / 3 + 3 / 4) / (2 / 3 + 1 / 4), (2 / 3 + 9 / 2) / (1 / 3 + 3 / 4)],
        ),
    ],
)
def test_hand_worked_weights(params, want):
    model = {"b": (None, [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])])}
    stats = {"b": ({":R": torch.ones(2), ":v": torch.tensor([4.0, 1.0])},
                   {":R": torch.ones(2), ":v": torch.tensor([1.0, 9.0])})}  # fmt: skip
    out = merge_model("ota", model, params, sidecars=stats)["b"]
    assert_close(out, torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_rank1_estimate_is_lemma_1():
    g = torch.Generator().manual_seed(2)
    v = torch.rand(4, 6, generator=g)
    R, C = v.sum(1), v.sum(0)
    lemma = torch.outer(R, C) / v.sum()
    assert_close(second_moment(R, C, (4, 6)), lemma)
    assert_close(second_moment(R / 6, C / 4, (4, 6), means=True), lemma)  # the notebook variant
    rank1 = torch.outer(torch.rand(4, generator=g), torch.rand(6, generator=g))
    assert_close(second_moment(rank1.sum(1), rank1.sum(0), (4, 6)), rank1)
    assert torch.equal(second_moment(torch.zeros(4), torch.zeros(6), (4, 6)), torch.zeros(4, 6))


def test_rank1_from_recorded_moments_equals_merging_with_its_estimate():
    model = make_model(seed=3)
    stats = stats_of(model, v=False)
    ours = merge_model("ota", model, {"preconditioner": "rank1"}, sidecars=stats)
    dense = {
        k: tuple(s | {":v": second_moment(s[":R"], s.get(":C"), model[k][0].shape)} for s in v)
        for k, v in stats.items()
    }
    want = merge_model("ota", model, {"preconditioner": "exp_avg_sq"}, sidecars=dense)
    for key in model:
        assert_close(ours[key], want[key], rtol=1e-6, atol=1e-6)
    auto = merge_model("ota", model, {}, sidecars=stats)  # auto: no v anywhere, so rank1
    assert all(torch.equal(auto[k], ours[k]) for k in model)


def test_fast_fisher_grafting_mask_and_base_fallback():
    # base 0; θ₁ = [4, 1, 0.1, 2], θ₂ = [0.2, 3, 0.1, −2], v ≡ 1 (weights equal where kept):
    # v ⊙ τ² keeps 2 of 4 per expert: θ₁ [16, 1, .01, 4] keeps entries 0, 3; θ₂ [.04, 9, .01, 4]
    # keeps 1, 3 (averaged: 0); entry 2 is masked in both: the base's 0
    base = torch.zeros(4)
    x1, x2 = torch.tensor([4.0, 1.0, 0.1, 2.0]), torch.tensor([0.2, 3.0, 0.1, -2.0])
    stats = {"b": tuple({":R": torch.ones(4), ":v": torch.ones(4)} for _ in range(2))}
    out = merge_model("ota", {"b": (base, [x1, x2])}, {}, [{"density": 0.5}] * 2,
                      sidecars=stats)["b"]  # fmt: skip
    assert_close(out, torch.tensor([4.0, 3.0, 0.0, 0.0]))


def test_normalisation_makes_the_scale_of_v_irrelevant():
    model = make_model(seed=4)
    stats = stats_of(model)
    scaled = {k: (v[0] | {":v": v[0][":v"] * 1000}, *v[1:]) for k, v in stats.items()}
    for norm in ("mean", "sum"):
        a = merge_model("ota", model, {"normalization": norm}, sidecars=stats)
        b = merge_model("ota", model, {"normalization": norm}, sidecars=scaled)
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in model)
    a = merge_model("ota", model, {}, sidecars=stats)
    b = merge_model("ota", model, {}, sidecars=scaled)
    assert not all(torch.allclose(a[k], b[k]) for k in model)  # without: expert 0 dominates


def test_bad_inputs():
    model = make_model(n=2)
    no_v = stats_of(model, v=False)
    with pytest.raises(ValidationError, match=r"has 'w:R' but no 'w:v'"):
        merge_model("ota", model, {"preconditioner": "exp_avg_sq"}, sidecars=no_v)
    unbased = {k: (None, xs) for k, (_, xs) in model.items()}
    with pytest.raises(ConfigError, match="needs a base_model"):
        merge_model("ota", unbased, {}, [{"density": 0.5}] * 2, sidecars=no_v)
    with pytest.raises(ConfigError, match="'epsilon' = 0"):
        merge_model("ota", model, {"epsilon": 0}, sidecars=no_v)
