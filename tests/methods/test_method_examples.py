"""One hand-worked example per method: the expected numbers are worked out in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from tests.methods._engine import call_method, merge_tensor
from torch.testing import assert_close

from mergeforge.methods.consensus import agrees, disjoint_mean, elect_sign
from mergeforge.methods.params import DellaModelParams
from mergeforge.methods.sparsify import della_magprune

T = torch.tensor
ONES = torch.ones(2, 2)


def test_linear():
    a, b = T([[1.0, 2.0], [3.0, 4.0]]), T([[3.0, 2.0], [1.0, 0.0]])
    w = [{"weight": 1.0}, {"weight": 3.0}]
    # (1·a + 3·b) / 4 = [[10, 8], [6, 4]] / 4
    assert_close(merge_tensor("linear", None, [a, b], {}, w), T([[2.5, 2.0], [1.5, 1.0]]))
    assert_close(
        merge_tensor("linear", None, [a, b], {"normalize": False}, w), T([[10.0, 8.0], [6.0, 4.0]])
    )


def test_task_arithmetic_with_forgetting():
    x1 = T([[2.0, 1.0], [1.0, 0.0]])  # τ1 = [[1, 0], [0, −1]]
    x2 = T([[1.0, 3.0], [1.0, 1.0]])  # τ2 = [[0, 2], [0, 0]]
    w = [{"weight": 1.0}, {"weight": -0.5}]
    # θ = 1 + 2·(τ1 − ½τ2) = 1 + 2·[[1, −1], [0, −1]]
    out = merge_tensor("task_arithmetic", ONES, [x1, x2], {"lambda_": 2.0}, w)
    assert_close(out, T([[3.0, -1.0], [1.0, -1.0]]))


TIES_TAUS = [
    T([[3.0, -1.0], [0.5, 2.0]]),
    T([[-2.0, -4.0], [1.0, 0.1]]),
    T([[1.0, 2.0], [-3.0, 0.2]]),
]


def test_ties():
    # trim to the top 2 of 4: τ1 → [[3, 0], [0, 2]], τ2 → [[−2, −4], [0, 0]], τ3 → [[0, 2], [−3, 0]]
    # mass vote Σ: [[1, −2], [−3, 2]] → γ = [[+, −], [−, +]]
    # agreeing entries: [0,0] τ1=3; [0,1] τ2=−4; [1,0] τ3=−3; [1,1] τ1=2 → disjoint mean
    xs = [ONES + t for t in TIES_TAUS]
    mp = [{"density": 0.5}] * 3
    assert_close(merge_tensor("ties", ONES, xs, {}, mp), ONES + T([[3.0, -4.0], [-3.0, 2.0]]))
    # count vote (one vote per model): [0,0] +,−,0 → tie → +; [0,1] 0,−,+ → tie → + (τ3 = 2)
    out = merge_tensor("ties", ONES, xs, {"consensus_method": "count", "lambda_": 0.5}, mp)
    assert_close(out, ONES + 0.5 * T([[3.0, 2.0], [-3.0, 2.0]]))


def test_ties_weights_and_disjoint_mean():
    # weights 2 and 1 on τ = [4, −1] and [2, 3] (dense): weighted [8, −2], [2, 3]
    # votes [10, 1] → both +; [0] agree: (8 + 2)/(2 + 1); [1]: only the second: 3/1
    xs = [T([4.0, -1.0]), T([2.0, 3.0])]
    mp = [{"weight": 2.0}, {"weight": 1.0}]
    assert_close(merge_tensor("ties", torch.zeros(2), xs, {}, mp), T([10 / 3, 3.0]))
    deltas = T([[8.0, -2.0], [2.0, 3.0]])
    assert elect_sign(deltas).tolist() == [1.0, 1.0]
    assert agrees(deltas, elect_sign(deltas)).tolist() == [[True, False], [True, True]]
    w = T([[2.0], [1.0]])
    assert disjoint_mean(deltas, w, None, normalize=False).tolist() == [10.0, 1.0]


def test_trim_rescale():
    # τ = [4, −1, 2, 1], keep the top half → [4, 0, 2, 0]; ‖τ‖₁ = 8, ‖kept‖₁ = 6 → × 4/3
    tau, mp = T([4.0, -1.0, 2.0, 1.0]), [{"density": 0.5}]
    out = merge_tensor("ties", torch.zeros(4), [tau], {"rescale": True}, mp)
    assert_close(out, T([16 / 3, 0.0, 8 / 3, 0.0]))
    # inverse_prob: ÷ density
    p = {"rescale": True, "rescale_norm": "inverse_prob"}
    assert_close(merge_tensor("ties", torch.zeros(4), [tau], p, mp), T([8.0, 0.0, 4.0, 0.0]))


def test_breadcrumbs():
    # 10 entries, density 0.5, gamma 0.2: drop the 2 largest and the 3 smallest → keep |τ| 0.4…0.8
    tau = T([0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -1.0])
    mp = [{"weight": 2.0, "density": 0.5, "gamma": 0.2}]
    out = merge_tensor("breadcrumbs", torch.zeros(10), [tau], {}, mp)
    assert_close(out, 2 * T([0, 0, 0, -0.4, 0.5, -0.6, 0.7, -0.8, 0, 0]))
    # breadcrumbs_ties with −τ as a second model: every vote is 0 → +; only τ's positive
    # survivors and −τ's positive survivors count, each alone → mean = itself (normalize)
    out = merge_tensor(
        "breadcrumbs_ties", torch.zeros(10), [tau, -tau], {"normalize": True}, [mp[0], mp[0]]
    )
    assert_close(out, T([0, 0, 0, 0.4, 0.5, 0.6, 0.7, 0.8, 0, 0]))


def test_della_keep_probabilities():
    # row [0.3, −0.1, 0.2]: magnitude ranks 2, 0, 1 of 0…2 → positions 1, 0, ½;
    # p = (0.5 − 0.1) + position·0.2 = [0.6, 0.4, 0.5]; mean keep probability = density
    mp = DellaModelParams(density=0.5, epsilon=0.1)
    mask, probs = della_magprune(T([[0.3, -0.1, 0.2]]), mp, torch.Generator().manual_seed(0))
    assert_close(probs, T([[0.6, 0.4, 0.5]]))
    assert set(mask.flatten().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
def test_random_drop_survivors_are_rescaled(name):
    # every output entry is 0 or c·τ_j with c = ‖τ‖₁ / ‖kept‖₁ (mergekit's l1 rescale)
    tau = torch.arange(1.0, 21.0)
    mp = [{"density": 0.5, **({"epsilon": 0.2} if "della" in name else {})}]
    out = merge_tensor(name, torch.zeros(20), [tau], {}, mp, seed=3)
    kept = out != 0
    assert 0 < kept.sum() < 20
    c = tau.sum() / tau[kept].sum()
    assert_close(out[kept], c * tau[kept])
    # inverse_prob: DARE divides by the density
    if name == "dare_linear":
        out = merge_tensor(name, torch.zeros(20), [tau], {"rescale_norm": "inverse_prob"}, mp)
        assert_close(out[out != 0], 2 * tau[out != 0])


def test_slerp():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])  # 90° apart: t turns by t·90°
    assert_close(merge_tensor("slerp", a, [b], {"t": 0.5}), T([math.sqrt(0.5)] * 2))
    assert_close(merge_tensor("slerp", a, [b], {"t": 1 / 3}), T([math.sqrt(3) / 2, 0.5]))
    # parallel: plain interpolation 0.75·a + 0.25·b
    out = merge_tensor("slerp", T([1.0, 2.0]), [T([2.0, 4.0])], {"t": 0.25})
    assert_close(out, T([1.25, 2.5]))


def test_model_stock():
    base = T([1.0, 1.0])
    # τ1 = [1, 0], τ2 = [1, 1]: cos φ = 1/√2, t = 2c/(1 + c); average τ = [1, ½]
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    out = merge_tensor("model_stock", base, [T([2.0, 1.0]), T([2.0, 2.0])])
    assert_close(out, T([1 + t, 1 + 0.5 * t]))
    # orthogonal offsets: cos 0 → t = 0 → the base
    assert_close(merge_tensor("model_stock", base, [T([2.0, 1.0]), T([1.0, 2.0])]), base)
    # filter-wise: row 0 has orthogonal offsets (t = 0), row 1 equal ones (cos 1, t = 1)
    b2 = torch.zeros(2, 2)
    xs = [T([[1.0, 0.0], [1.0, 1.0]]), T([[0.0, 1.0], [1.0, 1.0]])]
    out = merge_tensor("model_stock", b2, xs, {"filter_wise": True})
    assert_close(out, T([[0.0, 0.0], [1.0, 1.0]]))


EMR_TAUS = [
    T([2.0, -1.0, 0.0, 1.0, 1.0]),
    T([-1.0, -3.0, 0.0, 2.0, -1.0]),
    T([1.0, 1.0, 0.0, -1.0, 0.0]),
]


def test_emr():
    # Σ = [2, −3, 0, 2, 0] → σ = [+, −, −, +, −] (a tied vote elects −, as the authors' code)
    # masks: τ1 [1,1,0,1,0], τ2 [0,1,0,1,1], τ3 [1,0,0,0,0]
    # ε = [2, 3, 0, 2, 1] → τ_uni = [2, −3, 0, 2, −1]
    # λ1 = 5/7, λ2 = 7/6, λ3 = 3/2 (Σ|τ_t| / Σ|M_t τ_uni|)
    base = torch.zeros(5)
    xs = list(EMR_TAUS)
    assert_close(merge_tensor("emr", base, xs), T([2.0, -3.0, 0.0, 2.0, -1.0]))
    for task, expected in [
        (0, 5 / 7 * T([2.0, -3.0, 0.0, 2.0, 0.0])),
        (1, 7 / 6 * T([0.0, -3.0, 0.0, 2.0, -1.0])),
        (2, 3 / 2 * T([2.0, 0.0, 0.0, 0.0, 0.0])),
    ]:
        for scope in ("model", "tensor"):  # one tensor: the model and the tensor agree
            out = merge_tensor("emr", base, xs, {"task": task, "scale_scope": scope})
            assert_close(out, expected)


def test_passthrough():
    x = T([[1.0, -2.0]])
    assert call_method("passthrough", None, [x]) is x  # the method itself copies nothing
    assert torch.equal(merge_tensor("passthrough", None, [x]), x)  # the engine's own copy
    assert_close(merge_tensor("passthrough", None, [x], {}, [{"scale": 0.5}]), T([[0.5, -1.0]]))
