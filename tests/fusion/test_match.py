"""Matchers against their references: scipy's LAP, POT's exact OT, and hand-worked ZipIt! cases."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from mergeforge.errors import ValidationError
from mergeforge.fusion.match import cross_correlation, hungarian, ot_plan, zip_greedy


@pytest.mark.parametrize("shape", [(5, 5), (4, 7), (7, 4), (1, 1)])
@pytest.mark.parametrize("maximize", [False, True])
def test_hungarian_reaches_scipy_optimum(shape, maximize):
    g = torch.Generator().manual_seed(sum(shape) + maximize)
    cost = torch.randn(*shape, generator=g)
    rows, cols = hungarian(cost, maximize=maximize)
    r, c = linear_sum_assignment(cost.double().numpy(), maximize=maximize)
    assert rows.dtype == cols.dtype == torch.int64
    assert len(rows) == min(shape) and len(set(cols.tolist())) == min(shape)
    got = float(cost.double()[rows, cols].sum())
    assert got == pytest.approx(float(cost.double().numpy()[r, c].sum()), abs=1e-12)


def test_hungarian_recovers_a_permutation_and_leaves_input():
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    sim = torch.eye(6)[perm]  # sim[i, perm[i]] = 1
    before = sim.clone()
    rows, cols = hungarian(sim, maximize=True)
    assert torch.equal(cols, perm) and torch.equal(rows, torch.arange(6))
    assert torch.equal(sim, before)


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.tensor([[1.0, float("nan")]])])
def test_hungarian_rejects_bad_cost(bad):
    with pytest.raises(ValidationError, match="hungarian"):
        hungarian(bad)


@pytest.mark.parametrize("shape", [(5, 5), (3, 6)])
def test_ot_plan_matches_pot(shape):
    g = torch.Generator().manual_seed(shape[1])
    cost = torch.rand(*shape, generator=g)
    a = torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.1
    plan = ot_plan(cost, a * 3.0, b)  # scale must not matter: marginals are normalised
    an, bn = (a / a.sum()).numpy(), (b / b.sum()).numpy()
    ref = ot.emd(an, bn, cost.double().numpy())
    assert plan.dtype == torch.float64
    assert torch.allclose(plan.sum(1), torch.as_tensor(an), atol=1e-12)
    assert torch.allclose(plan.sum(0), torch.as_tensor(bn), atol=1e-12)
    assert float((plan * cost.double()).sum()) == pytest.approx(
        float(np.sum(ref * cost.double().numpy())), abs=1e-9
    )


def test_ot_plan_uniform_square_is_a_scaled_permutation():
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(1))
    cost = 1.0 - torch.eye(5)[perm]
    plan = ot_plan(cost)
    assert torch.allclose(plan, torch.eye(5, dtype=torch.float64)[perm] / 5)
    assert torch.allclose(ot_plan(cost, torch.ones(5), torch.full((5,), 2.0)), plan)


def test_ot_plan_rejects_negative_cost_and_bad_marginal():
    with pytest.raises(ValidationError, match="negative"):
        ot_plan(-torch.ones(2, 2))
    with pytest.raises(ValidationError, match="marginal a"):
        ot_plan(torch.ones(2, 2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValidationError, match="marginal b has 3"):
        ot_plan(torch.ones(2, 2), None, torch.ones(3))


def _corr_two_models(perm: torch.Tensor, noise: float = 0.0) -> torch.Tensor:
    """Correlation of features [A (n), B (n)] where B's feature perm[i] copies A's feature i."""
    g = torch.Generator().manual_seed(3)
    n = len(perm)
    a = torch.randn(200, n, generator=g)
    b = torch.empty_like(a)
    b[:, perm] = a + noise * torch.randn(200, n, generator=g)
    return torch.corrcoef(torch.cat([a, b], 1).T)


def test_zip_greedy_pairs_a_permuted_copy():
    perm = torch.tensor([2, 0, 3, 1])
    merge, unmerge = zip_greedy(_corr_two_models(perm, noise=0.01), [4, 4])
    assert merge.shape == (4, 8) and unmerge.shape == (8, 4)
    expected = torch.zeros(4, 8)
    expected[torch.arange(4), torch.arange(4)] = 0.5
    expected[torch.arange(4), 4 + perm] = 0.5  # cluster i = {A_i, B_perm[i]}
    assert torch.allclose(merge, expected)
    assert torch.equal(unmerge, (expected > 0).float().T)
    assert torch.allclose(merge.sum(1), torch.ones(4))
    assert torch.allclose(merge @ unmerge, torch.eye(4))


def test_zip_greedy_hand_worked_within_model_merge():
    # A0 ≈ A1 (0.9), B0 ≈ A0 (0.8) and B1 ≈ A1 (0.7); budget int(1.0 · (2 // 2)) = 1 per model.
    c = torch.tensor(
        [[0, 0.9, 0.8, 0.1], [0.9, 0, 0.2, 0.7], [0.8, 0.2, 0, 0.3], [0.1, 0.7, 0.3, 0]]
    )
    merge, unmerge = zip_greedy(c, [2, 2], alpha=0.3, beta=1.0)
    # 1st: {A0, A1} (0.9, within A). Its similarity to B0 = 0.3·min(0.8, 0.2) = 0.06, to B1 0.03;
    # B0–B1 (0.3) is now the best pair: {B0, B1}.
    assert torch.allclose(merge, torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]))
    # with beta = 0 within-model merges are barred: A0–B0 then A1–B1
    merge0, _ = zip_greedy(c, [2, 2], beta=0.0)
    assert torch.allclose(merge0, torch.tensor([[0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5]]))


def test_zip_greedy_within_model_budget_respected():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(100, 4, generator=g)
    # each model's features come in near-duplicate pairs: within-model merges are attractive
    feats = torch.cat([x, x + 0.01 * torch.randn(100, 4, generator=g)], 1)
    y = torch.randn(100, 8, generator=g)
    corr = torch.corrcoef(torch.cat([feats, y], 1).T)  # model 0: 8 features, model 1: 8 random
    merge, unmerge = zip_greedy(corr, [8, 8], beta=0.5)  # budget int(0.5 · (8 // 2)) = 2
    within = int((unmerge[:8].sum(0) - 1).clamp_min(0).sum())  # merges inside model 0
    assert within == 2  # the near-duplicates use the whole budget, and no more
    assert torch.allclose(merge.sum(1), torch.ones(8)) and torch.equal(
        unmerge.sum(1), torch.ones(16)
    )


def test_zip_greedy_relaxes_the_budget_rather_than_fail():
    # three models, beta = 0: {A0,B0}, {A1,C0}, {B1,C1} would leave only over-budget pairs
    c = torch.zeros(6, 6)
    for i, j, v in [(0, 2, 0.9), (1, 4, 0.8), (3, 5, 0.7)]:
        c[i, j] = c[j, i] = v
    merge, unmerge = zip_greedy(c, [2, 2, 2], beta=0.0)
    assert merge.shape == (2, 6) and torch.equal(unmerge.sum(1), torch.ones(6))


def test_zip_greedy_three_models_and_errors():
    g = torch.Generator().manual_seed(2)
    corr = torch.corrcoef(torch.randn(50, 9, generator=g).T)
    merge, unmerge = zip_greedy(corr, [3, 3, 3], target=3)
    assert merge.shape == (3, 9) and torch.equal(unmerge.sum(1), torch.ones(9))
    with pytest.raises(ValidationError, match="6×6"):
        zip_greedy(corr, [3, 3])
    with pytest.raises(ValidationError, match="NaN"):
        zip_greedy(torch.full((4, 4), float("nan")), [2, 2])


def test_cross_correlation_matches_corrcoef_and_handles_dead_units():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(30, 3, generator=g), torch.randn(30, 2, generator=g)
    ref = torch.corrcoef(torch.cat([x, y], 1).T.double())[:3, 3:]
    assert torch.allclose(cross_correlation(x, y), ref, atol=1e-6)
    dead = torch.cat([x, torch.zeros(30, 1)], 1)
    c = cross_correlation(dead, torch.cat([dead, torch.full((30, 1), 2.0)], 1))
    assert torch.isfinite(c).all()
    # two constant columns are indistinguishable (1); constant vs varying is 0
    assert torch.equal(c[3], torch.tensor([0.0, 0, 0, 1, 1], dtype=torch.float64))
    assert torch.equal(c[:3, 3:], torch.zeros(3, 2, dtype=torch.float64))
