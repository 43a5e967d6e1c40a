"""Whole-model methods against direct transcriptions that do hold the whole model.

The statistics passes never concatenate the model; these references do, on a model small
enough for it: model-scope TIES thresholds against ``torch.kthvalue`` over the concatenated
|τ_i|, and EMR's per-task models against the paper's formulas.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.methods._engine import build, merge_model
from torch.testing import assert_close

from mergeforge.errors import ConfigError
from mergeforge.methods import get_method
from mergeforge.methods.stats import ModelTopK

SHAPES = {"embed": (12, 8), "q": (8, 8), "norm": (8,), "conv": (2, 3, 4)}


def make_model(n=3, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    model = {}
    for key, shape in shapes.items():
        base = torch.randn(shape, generator=g)
        model[key] = (
            base,
            [base + 0.1 * (i + 1) * torch.randn(shape, generator=g) for i in range(n)],
        )
    return model


def thresholds(model, densities):
    m = get_method("ties")
    p, mps = build(m, {"topk_scope": "model"}, [{"density": d} for d in densities])
    stat = m.statistic(p)
    assert stat.passes == 2
    for i in range(stat.passes):
        for key, (base, xs) in model.items():
            stat.observe(i, key, base, xs, p, mps)
        stat.end_pass(i)
    return stat.result()


def kth_reference(model, i, density):
    flat = torch.cat([(xs[i] - base).abs().reshape(-1) for base, xs in model.values()])
    n = flat.numel()
    k = max(1, int(density * n))
    return torch.kthvalue(flat, n - k + 1).values.item()


@pytest.mark.parametrize("densities", [(0.5, 0.2, 0.9), (0.01, 0.999, 0.3)])
def test_model_scope_threshold_is_kthvalue_of_the_concatenation(densities):
    model = make_model()
    got = thresholds(model, densities)
    assert got == tuple(kth_reference(model, i, d) for i, d in enumerate(densities))


@settings(max_examples=15, deadline=None)
@given(
    density=st.floats(0.001, 0.999),
    exponent=st.integers(-140, 30),
    seed=st.integers(0, 10_000),
    ties=st.booleans(),
)
def test_radix_select_on_awkward_values(density, exponent, seed, ties):
    """Tiny (subnormal), huge and repeated magnitudes, exact zeros: still exact."""
    g = torch.Generator().manual_seed(seed)
    model = {}
    for key, n in {"a": 37, "b": 64, "c": 5}.items():
        base = torch.zeros(n)
        tau = torch.randn(n, generator=g) * 2.0**exponent
        if ties:
            tau = tau.round() * 2.0**exponent  # many equal magnitudes and zeros
        model[key] = (base, [base + tau])
    (got,) = thresholds(model, (density,))
    assert got == kth_reference(model, 0, density)


def test_densities_of_zero_and_one_need_no_threshold():
    assert thresholds(make_model(), (0.0, 1.0, 0.5))[:2] == (None, None)


def test_model_scope_ties_against_global_trim():
    model = make_model()
    densities, weights = (0.3, 0.5, 0.2), (1.0, 0.5, 2.0)
    mps = [{"density": d, "weight": w} for d, w in zip(densities, weights, strict=True)]
    ours = merge_model("ties", model, {"topk_scope": "model", "lambda_": 0.9}, mps)
    thr = [kth_reference(model, i, d) for i, d in enumerate(densities)]
    for key, (base, xs) in model.items():
        taus = torch.stack([(x - base) * ((x - base).abs() >= t) * w
                            for x, t, w in zip(xs, thr, weights, strict=True)])  # fmt: skip
        gamma = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
        agree = (taus.sign() == gamma).float()
        w = torch.tensor(weights).reshape(-1, *[1] * base.dim())
        den = (w * agree).sum(0)
        expected = base + 0.9 * (taus * agree).sum(0) / torch.where(den == 0, 1.0, den)
        assert_close(ours[key], expected, rtol=1e-6, atol=1e-6)
    # the whole-model top-k keeps about density of each task vector, not of each tensor
    kept = [sum(((xs[i] - b).abs() >= thr[i]).sum().item() for b, xs in model.values())
            for i in range(3)]  # fmt: skip
    n = sum(b.numel() for b, _ in model.values())
    assert kept == [max(1, int(d * n)) for d in densities]


def test_model_scope_needs_one_density_per_model():
    model = make_model()
    m = get_method("ties")
    p, mps = build(m, {"topk_scope": "model"}, [{"density": 0.5}] * 3)
    _, other = build(m, {}, [{"density": 0.4}] * 3)
    stat = m.statistic(p)
    stat.observe(0, "embed", *model["embed"], p, mps)
    with pytest.raises(ConfigError, match="one density per model"):
        stat.observe(0, "q", *model["q"], p, other)


def test_statistics_pass_only_when_needed():
    ties, emr = get_method("ties"), get_method("emr")
    assert ties.statistic(ties.params()).passes == 0
    assert isinstance(ties.statistic(ties.params(topk_scope="model")), ModelTopK)
    assert emr.statistic(emr.params()).passes == 0  # task: null needs no rescaler
    assert emr.statistic(emr.params(task=0, scale_scope="tensor")).passes == 0
    assert emr.statistic(emr.params(task=0)).passes == 1


def emr_reference(model, task):
    """EMR (2405.17461) transcribed: σ = sign(Σ τ_t) (ties → −1), M_t = 1{τ_t σ > 0},
    ε = max_t |M_t τ_t|, τ_uni = σ ε, λ_t = Σ_model |τ_t| / Σ_model |M_t τ_uni|."""
    parts, num, den = {}, 0.0, 0.0
    for key, (base, xs) in model.items():
        taus = [x - base for x in xs]
        sigma = torch.where(sum(taus) > 0, 1.0, -1.0)
        masks = [(t * sigma) > 0 for t in taus]
        eps = torch.stack([(t * m).abs() for t, m in zip(taus, masks, strict=True)]).max(0).values
        uni = sigma * eps
        parts[key] = (base, uni, masks[task])
        num += taus[task].abs().sum().item()
        den += (masks[task] * uni).abs().sum().item()
    return {k: base + (num / den) * m * uni for k, (base, uni, m) in parts.items()}


@pytest.mark.parametrize("task", [0, 1, 2])
def test_emr_task_models_against_the_formulas(task):
    model = make_model()
    ours = merge_model("emr", model, {"task": task})
    expected = emr_reference(model, task)
    for key in model:
        assert_close(ours[key], expected[key], rtol=1e-6, atol=1e-6)


def test_emr_tensor_scope_uses_each_tensor_alone():
    model = make_model()
    ours = merge_model("emr", model, {"task": 1, "scale_scope": "tensor"})
    for key, value in model.items():
        assert_close(ours[key], emr_reference({key: value}, 1)[key], rtol=1e-6, atol=1e-6)


def test_emr_task_out_of_range():
    with pytest.raises(ConfigError, match="'task' = 3 is out of range"):
        merge_model("emr", make_model(), {"task": 3, "scale_scope": "tensor"})
