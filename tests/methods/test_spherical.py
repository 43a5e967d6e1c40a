"""multislerp, nuslerp, karcher: hand-worked examples (numbers in the comments), the shared
geometry, and mergekit's own tensor functions as oracles (≤ 1e-6 in fp32)."""

from __future__ import annotations

import math

import pytest
import torch
from tests.methods._engine import merge_model, merge_tensor
from tests.methods._mergekit import SHAPES, experts, mergekit_tensor
from torch.testing import assert_close

from mergeforge.errors import ConfigError, ValidationError
from mergeforge.methods.sphere import exp_map, great_circle, log_map

T = torch.tensor
E1, E2 = T([1.0, 0.0]), T([0.0, 1.0])
R = 1 / math.sqrt(2)


def w(*ws):
    return [{"weight": x} for x in ws]


def test_nuslerp_hand_worked():
    # orthogonal: Ω = π/2, t = w₁/(w₀ + w₁) → [sin((1 − t)π/2), sin(tπ/2)]
    assert_close(merge_tensor("nuslerp", None, [E1, E2], {}, w(1, 1)), T([R, R]))
    s8, c8 = math.sin(math.pi / 8), math.cos(math.pi / 8)
    assert_close(merge_tensor("nuslerp", None, [E1, E2], {}, w(1, 3)), T([s8, c8]))
    # with a base: slerp of the task vectors [1, 0], [0, 1], base added back
    base = T([1.0, 1.0])
    assert_close(merge_tensor("nuslerp", base, [base + E1, base + E2], {}, w(2, 2)), base + R)
    # weights summing to ~0: t = 0.5
    assert_close(merge_tensor("nuslerp", None, [E1, E2], {}, w(1, -1)), T([R, R]))


def test_nuslerp_vector_by_vector():
    a, b = T([[1.0, 0.0], [3.0, 0.0]]), T([[0.0, 1.0], [3.0, 0.0]])
    rows = {"nuslerp_flatten": False}
    # rows: [1,0]→[0,1] at t = ½ is [R, R]; [3,0] = [3,0] is parallel: linear
    assert_close(merge_tensor("nuslerp", None, [a, b], rows, w(1, 1)), T([[R, R], [3.0, 0.0]]))
    # columns (row_wise): [1,3]→[0,3] by the formula; [0,0]→[1,0]: a zero vector has cos 0,
    # Ω = π/2, so sin(π/4)·[1, 0] = [R, 0]
    out = merge_tensor("nuslerp", None, [a, b], rows | {"nuslerp_row_wise": True}, w(1, 1))
    omega = math.acos(3 / math.sqrt(10))
    col0 = (math.sin(omega / 2) / math.sin(omega)) * (T([1.0, 3.0]) + T([0.0, 3.0]))
    assert_close(out[:, 0], col0)
    assert_close(out[:, 1], T([R, 0.0]))
    # flattened (the default): one vector [1,0,3,0]→[0,1,3,0], cos Ω = 9/10
    omega = math.acos(0.9)
    flat = (math.sin(omega / 2) / math.sin(omega)) * (a + b)
    assert_close(merge_tensor("nuslerp", None, [a, b], {}, w(1, 1)), flat)


def test_nuslerp_is_slerp_without_a_base():
    base, (x,) = experts((6, 5), n=1)
    for t in (0.0, 0.3, 1.0):
        ours = merge_tensor("nuslerp", None, [base, x], {}, w(1 - t, t))
        assert_close(ours, merge_tensor("slerp", base, [x], {"t": t}), rtol=1e-6, atol=1e-6)


def test_multislerp_hand_worked():
    # orthogonal unit vectors, equal weights: the midpoint [R, R], scaled by the mean norm
    assert_close(merge_tensor("multislerp", None, [E1, E2], {}, w(1, 1)), T([R, R]))
    assert_close(merge_tensor("multislerp", None, [2 * E1, 4 * E2], {}, w(1, 1)), 3 * T([R, R]))
    # weights 1, 3: mean direction [1, 3]/√10 and the weighted tangents cancel
    # (¼·[0.9, −0.3] + ¾·[−0.3, 0.1] = 0): the normalised mean, not slerp's [sin π/8, cos π/8]
    out = merge_tensor("multislerp", None, [E1, E2], {}, w(1, 3))
    assert_close(out, T([1.0, 3.0]) / math.sqrt(10))
    # three orthonormal vectors: [1, 1, 1]/√3
    eye = list(torch.eye(3))
    assert_close(merge_tensor("multislerp", None, eye, {}, w(1, 1, 1)), torch.ones(3) / 3**0.5)
    # one model is returned as it is, base or not
    assert_close(merge_tensor("multislerp", torch.zeros(2), [2 * E1], {}, w(5)), 2 * E1)


def test_multislerp_unchanged_tensor_and_cancelling_weights():
    base = T([0.5, -1.0, 2.0])
    same = merge_tensor("multislerp", base, [base.clone()] * 3, {}, w(1, 2, 3))
    assert torch.equal(same, base)  # no model changed it: the base (mergekit raises here)
    with pytest.raises(ValidationError, match=r"'t'.*antipodal.*Change a 'weight'"):
        merge_tensor("multislerp", None, [E1, -E1, E1], {}, w(1, 2, 1))


def test_karcher_hand_worked():
    # two orthogonal unit vectors: the arc midpoint; norms 2 and 4: × their mean 3
    assert_close(merge_tensor("karcher", None, [E1, E2]), T([R, R]))
    assert_close(merge_tensor("karcher", None, [2 * E1, 4 * E2]), 3 * T([R, R]))
    # e1, e1, e2 on one circle: the Fréchet mean is the mean angle (0 + 0 + 90°)/3 = 30°,
    # not the Euclidean mean's atan(½) = 26.6°: [cos 30°, sin 30°]
    expected = T([math.cos(math.pi / 6), 0.5])
    assert_close(merge_tensor("karcher", None, [E1, E1, E2]), expected, rtol=1e-5, atol=1e-5)
    # a base_model is one more point (as mergekit): base e2 with models e1, e1 is the same
    assert_close(merge_tensor("karcher", E2, [E1, E1]), expected, rtol=1e-5, atol=1e-5)
    # no step: the Euclidean mean's direction
    assert_close(merge_tensor("karcher", None, [E1, E1, E2], {"max_iter": 0}),
                 T([2.0, 1.0]) / 5**0.5)  # fmt: skip
    assert torch.equal(merge_tensor("karcher", None, [torch.zeros(2)] * 2), torch.zeros(2))


def test_geometry_steps():
    # exp of log returns the point (unit circle, 60° apart)
    p, u = E1, T([0.5, 3**0.5 / 2])
    v = log_map(p, u, (p * u).sum())
    assert_close(torch.linalg.vector_norm(v), T(math.pi / 3))
    assert_close(exp_map(p, v, torch.linalg.vector_norm(v)), u)
    # great circle: t = 0 and 1 are the end points; the linear rows are the straight line
    a, b = torch.stack([E1, E1]), torch.stack([E2, 2 * E1])
    cos = T([[0.0], [1.0]])
    out = great_circle(a, b, cos, 0.25, cos.abs() > 0.9995)
    assert_close(out, torch.stack([T([math.cos(math.pi / 8), math.sin(math.pi / 8)]),
                                   T([1.25, 0.0])]))  # fmt: skip


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [("max_iter", -1, "max_iter"), ("max_iter", 2.5, "whole number"), ("tol", -1.0, "tol")],
)
def test_bad_karcher_parameters(name, value, needle):
    with pytest.raises(ConfigError, match=needle):
        merge_tensor("karcher", None, [E1, E2], {name: value})


def test_nuslerp_needs_two_models():
    with pytest.raises(ConfigError, match="exactly 2 model"):
        merge_tensor("nuslerp", None, [E1, E2, E1], {}, w(1, 1, 1))


SPHERICAL = [
    ("multislerp", True, 3, {}, True),
    ("multislerp", False, 3, {"normalize_weights": False, "eps": 1e-6}, True),
    ("nuslerp", True, 2, {}, True),
    ("nuslerp", False, 2, {"nuslerp_flatten": False}, True),
    ("nuslerp", True, 2, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, True),
    ("karcher", False, 3, {}, False),
    ("karcher", True, 3, {"max_iter": 4, "tol": 1e-7}, False),
]


@pytest.mark.mergekit
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("name", "with_base", "n", "shared", "weighted"), SPHERICAL)
def test_same_as_mergekit(name, with_base, n, shared, weighted, shape):
    base, xs = experts(shape, n=n)
    base = base if with_base else None
    mps = w(0.7, 0.3, 1.1)[:n] if weighted else [{}] * n
    theirs = mergekit_tensor(name, base, xs, shared, mps if weighted else None)
    ours = merge_model(name, {"t": (base, xs)}, shared, mps)["t"]
    assert (ours - theirs).abs().max().item() <= 1e-6
