"""``ranked_ties`` (issue 18): mergekit has it only on a 2024 branch (named by the ``ties.yml`` of
its ``examples/``), never in a release, so mergekit 0.1.5 cannot be the oracle. The oracles
here: a hand-worked keep-probability example, a transcription of the branch's definition
(rank → linear probabilities → Bernoulli → L1 rescale → sign election by sum → sum, no
normalisation) drawing from torch's global RNG exactly as the branch does, which our method must
equal bit for bit when it draws from the same stream, and the statistics of the keep rate."""

from __future__ import annotations

import pytest
import torch
import yaml
from tests.methods._engine import merge_tensor
from torch.testing import assert_close

from mergeforge.config import load_config
from mergeforge.errors import ConfigError
from mergeforge.methods import TensorContext, get_method
from mergeforge.methods.params import RankedModelParams
from mergeforge.methods.sparsify import ranked

T = torch.tensor


def test_keep_probabilities_hand_worked():
    # |τ| = [0.3, 0.1, 0.4, 0.2] → descending order 2, 0, 3, 1 → linspace(1, 0, 4) = 1, ⅔, ⅓, 0
    mask, probs = ranked(T([0.3, -0.1, 0.4, 0.2]), RankedModelParams(density=0.3))
    assert_close(probs[[0, 2, 3]], T([2 / 3, 1.0, 1 / 3]))
    assert probs[1] == torch.finfo(torch.float32).tiny  # p = 0, floored for inverse_prob
    assert mask[2] == 1 and mask[1] == 0  # p = 1 always kept, p = 0 never
    # density_aware: p = r^(1/0.25 − 1) = r³ → 8/27, 1, 1/27
    _, probs = ranked(T([0.3, -0.1, 0.4, 0.2]), RankedModelParams(density=0.25, density_aware=True))
    assert_close(probs[[0, 2, 3]], T([8 / 27, 1.0, 1 / 27]))


def _branch_ranked_ties(base, xs, weights):
    """The branch's definition, written out: per model, keep probability by magnitude rank
    (argsort descending, linspace 1 → 0), ``torch.bernoulli`` on the global RNG, rescale to
    the task vector's L1 norm; weighted deltas, sign elected by their sum, agreeing entries
    summed; ``normalize`` false, so no division."""
    deltas = []
    for x in xs:
        d = x - base
        w = d.abs().reshape(-1)
        rank = torch.zeros_like(d)
        rank.view(-1)[torch.argsort(w, descending=True)] = torch.linspace(1, 0, w.numel())
        mask = torch.bernoulli(rank)
        before, after = d.abs().sum(), (d * mask).abs().sum()
        deltas.append(d * (before / after) * mask)
    weighted = torch.stack(deltas) * T(weights).view(-1, *[1] * base.dim())
    sign = weighted.sign()
    majority = (weighted.sum(0) >= 0).to(base.dtype) * 2 - 1
    return base + (weighted * (sign == majority)).sum(0)


@pytest.mark.parametrize("shape", [(64,), (24, 40)])
def test_equals_the_branch_on_the_same_rng_stream(shape):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g)
    xs = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(3)]  # no |τ| ties
    weights = [1.0, 0.8, 0.5]
    method = get_method("ranked_ties")
    params = method.params()
    mps = [
        method.model_params(weight=w, density=d)
        for w, d in zip(weights, (0.8, 0.3, 0.1), strict=True)
    ]
    torch.manual_seed(123)
    expected = _branch_ranked_ties(base, xs, weights)
    torch.manual_seed(123)  # ctx.generator None: the global stream, model by model, as the branch
    ours = method.fn(base, xs, params, mps, TensorContext(key="w"))
    assert torch.equal(ours, expected)
    assert not params.normalize and params.rescale and params.rescale_norm == "l1"


def test_keep_rate_ignores_density_unless_density_aware():
    tau = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    for density in (0.1, 0.5, 0.9):
        out = merge_tensor("ranked_ties", torch.zeros_like(tau), [tau], {}, [{"density": density}])
        assert abs((out != 0).float().mean().item() - 0.5) < 0.02  # the branch: always ~½
        aware = [{"density": density, "density_aware": True}]
        out = merge_tensor("ranked_ties", torch.zeros_like(tau), [tau], {}, aware)
        assert abs((out != 0).float().mean().item() - density) < 0.02
    # the kept entries are the larger ones: mean |τ| of survivors above the dropped ones'
    kept = out != 0
    assert tau[kept].abs().mean() > tau[~kept].abs().mean()


def test_full_density_is_task_arithmetic_with_election():
    # density 1 (the default): nothing is dropped, as in every sparse member
    g = torch.Generator().manual_seed(1)
    base, xs = torch.randn(50, generator=g), [torch.randn(50, generator=g) for _ in range(2)]
    out = merge_tensor("ranked_ties", base, xs, {"rescale": False}, [{}, {}])
    ties = merge_tensor("ties", base, xs, {"normalize": False}, [{}, {}])
    assert_close(out, ties)


def test_seeded_and_repeatable():
    tau = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    a = merge_tensor("ranked_ties", torch.zeros(1000), [tau], {}, [{"density": 0.5}], seed=4)
    b = merge_tensor("ranked_ties", torch.zeros(1000), [tau], {}, [{"density": 0.5}], seed=4)
    c = merge_tensor("ranked_ties", torch.zeros(1000), [tau], {}, [{"density": 0.5}], seed=5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_parameter():
    with pytest.raises(ConfigError, match="density_aware"):
        get_method("ranked_ties").model_params(density=0.5, density_aware="yes")


def test_the_example_yaml_parses():
    # mergekit's examples/ties.yml at that commit: density/weight gradients, empty parameters
    text = (
        "models:\n  - model: a\n    parameters:\n      density: [0.8, 0.3, 0.1]\n"
        "      weight: [1.0, 0.8, 0.5]\n  - model: b\n    parameters:\n"
        "      density: [0.1, 0.4, 0.1]\n      weight: [0.2, 0.8, 0.1]\n"
        "merge_method: ranked_ties\nbase_model: base\nparameters:\ndtype: bfloat16\n"
    )
    config = load_config(yaml.safe_load(text))
    assert config.merge_method == "ranked_ties"
