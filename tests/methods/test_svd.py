"""The SVD family against plain transcriptions of the papers' formulas, and facts checkable by hand.

Each oracle below is written from the paper, not from our code: polar factors through
A (AᵀA)^(-1/2) (eigh), projectors as explicit (out, out) matrices, singular values via
``torch.linalg.svdvals``.
"""

from __future__ import annotations

import pytest
import torch
from tests.methods._engine import merge_model, merge_tensor
from torch.testing import assert_close

from mergeforge.errors import ConfigError
from mergeforge.methods import get_method

F64 = {"solve_dtype": "float64"}


def experts(shape=(8, 12), n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    noise = [0.1 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
    return base, [base + e for e in noise]


def polar_cols(a):
    """A (AᵀA)^(-1/2) for A (m, n) of full column rank."""
    w, q = torch.linalg.eigh(a.T @ a)
    return a @ q @ torch.diag(w.rsqrt()) @ q.T


def oracle_tsv(deltas):
    k = min(deltas[0].shape) // len(deltas)
    svds = [torch.linalg.svd(d) for d in deltas]
    u_hat = torch.cat([u[:, :k] for u, _, _ in svds], dim=1)
    s_hat = torch.cat([s[:k] for _, s, _ in svds])
    v_hat = torch.cat([vh[:k].T for _, _, vh in svds], dim=1)
    return polar_cols(u_hat) @ torch.diag(s_hat) @ polar_cols(v_hat).T


def oracle_iso_c(deltas):
    u, s, vh = torch.linalg.svd(sum(deltas))
    r = min(deltas[0].shape)
    return s.mean() * u[:, :r] @ vh[:r]


def oracle_iso_cts(deltas, f):
    t, r = len(deltas), min(deltas[0].shape)
    c = r - round((r - int(f * r)) / t) * t
    s_per = (r - c) // t
    u, s, vh = torch.linalg.svd(sum(deltas))
    projector = torch.eye(deltas[0].shape[0], dtype=u.dtype) - u[:, :c] @ u[:, :c].T
    us, sigmas, vs = [u[:, :c]], [s[:c]], [vh[:c].T]
    for d in deltas:
        ut, st, vht = torch.linalg.svd(projector @ d)
        us, sigmas, vs = us + [ut[:, :s_per]], sigmas + [st[:s_per]], vs + [vht[:s_per].T]
    sigma = torch.cat(sigmas).mean()
    return sigma * polar_cols(torch.cat(us, 1)) @ polar_cols(torch.cat(vs, 1)).T


@pytest.mark.parametrize("shape", [(8, 12), (12, 8), (9, 9)])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_against_the_formulas(shape, n):
    base, xs = experts(shape, n, seed=n)
    deltas = [x - base for x in xs]
    for name, oracle, params in (
        ("tsv", oracle_tsv, {}),
        ("iso_c", oracle_iso_c, {}),
        ("iso_cts", lambda d: oracle_iso_cts(d, 0.8), {}),
        ("iso_cts", lambda d: oracle_iso_cts(d, 0.5), {"common_fraction": 0.5}),
    ):
        out = merge_tensor(name, base, xs, {**F64, **params, "scaling": 1.3})
        assert_close(out, base + 1.3 * oracle(deltas), rtol=1e-9, atol=1e-10, msg=name)


def test_iso_c_spectrum_is_flat_at_the_mean():
    base, xs = experts((10, 7))
    total = sum(x - base for x in xs)
    out = merge_tensor("iso_c", base, xs, F64) - base
    sv = torch.linalg.svdvals(out)
    assert_close(sv, torch.full_like(sv, torch.linalg.svdvals(total).mean().item()))


def test_tsv_with_one_expert_keeps_its_delta():
    base, xs = experts((6, 9), n=1)
    assert_close(merge_tensor("tsv", base, xs, F64), xs[0], rtol=1e-12, atol=1e-12)


def test_tsv_of_identical_experts_is_the_rank_k_truncation():
    base, (x,) = experts((6, 9), n=1)
    u, s, vh = torch.linalg.svd(x - base, full_matrices=False)
    truncated = base + u[:, :2] @ torch.diag(s[:2]) @ vh[:2]  # k = 6 // 3
    assert_close(merge_tensor("tsv", base, [x] * 3, F64), truncated, rtol=1e-10, atol=1e-10)


def test_tsv_of_orthogonal_rank_one_deltas_is_their_sum():
    base = torch.zeros(4, 6, dtype=torch.float64)
    e = torch.eye(6, dtype=torch.float64)
    d1, d2 = 2.0 * torch.outer(e[0, :4], e[1]), -3.0 * torch.outer(e[2, :4], e[4])
    out = merge_tensor("tsv", base, [base + d1, base + d2], F64)
    assert_close(out, d1 + d2, rtol=0, atol=1e-12)


def test_iso_of_a_rank_one_delta():
    # Σ = a bᵀ has σ = (|a||b|, 0, 0, 0): the mean is a quarter of it and only u₁v₁ᵀ is defined
    a, b = torch.tensor([1.0, 2.0, 0.0, -2.0]), torch.tensor([0.0, 3.0, 4.0, 0.0, 0.0, 0.0])
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    for name in ("iso_c", "iso_cts"):
        out = merge_tensor(name, base, [base + torch.outer(a, b)])
        assert_close(out, base + torch.outer(a, b) / 4, msg=name)


def test_iso_cts_reduces_to_iso_c():
    base, xs = experts((8, 12))
    iso_c = merge_tensor("iso_c", base, xs, F64)
    assert_close(merge_tensor("iso_cts", base, xs, {**F64, "common_fraction": 1.0}), iso_c)
    # one task: the task-specific directions complete the common ones to the full SVD
    assert_close(merge_tensor("iso_cts", base, xs[:1], F64), merge_tensor("iso_c", base, xs[:1]))


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_zero_deltas_and_tiny_ranks_return_the_base_exactly(name):
    base, _ = experts((5, 7))
    assert torch.equal(merge_tensor(name, base, [base.clone()] * 3, F64), base)
    small = torch.randn(2, 2, dtype=torch.float64)  # TSV-M: r = 2 < T = 3 gives k = 0
    out = merge_tensor(name, small, [small + 1, small - 1, small + torch.eye(2)], F64)
    assert torch.isfinite(out).all() and (name != "tsv" or torch.equal(out, small))


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_conv1d_weights_are_read_transposed(name):
    base, xs = experts((12, 8), n=3)  # Conv1D stores (in, out)
    model = {
        "h.0.attn.c_attn.weight": (base, xs),
        "h.0.attn.q_proj.weight": (base.T, [x.T for x in xs]),
        "h.0.attn.k_proj.weight": (base, xs),
    }
    out = merge_model(name, model, {**F64, "common_fraction": 0.5} if name == "iso_cts" else F64)
    assert_close(out["h.0.attn.c_attn.weight"], out["h.0.attn.q_proj.weight"].T)
    if name == "iso_cts":  # the common-subspace projection acts on the output side only
        assert not torch.allclose(out["h.0.attn.c_attn.weight"], out["h.0.attn.k_proj.weight"])


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_non_matrices_get_the_scaled_mean(name):
    base, xs = experts((5,), n=3)
    expected = base + 0.5 * sum(x - base for x in xs) / 3
    assert_close(merge_tensor(name, base, xs, {"scaling": 0.5}), expected)
    b, ys = experts((6, 4))  # embeddings are skipped by default: also the mean
    out = merge_model(name, {"model.embed_tokens.weight": (b, ys)})["model.embed_tokens.weight"]
    assert_close(out, sum(ys) / 3)


def test_float32_solve_is_close_to_float64():
    base, xs = experts((16, 24))
    for name in ("tsv", "iso_c", "iso_cts"):
        a = merge_tensor(name, base.float(), [x.float() for x in xs])
        b = merge_tensor(name, base, xs, F64)
        assert a.dtype == torch.float32
        assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("name", "values", "message"),
    [
        ("iso_cts", {"common_fraction": 1.5}, "'common_fraction' = 1.5 .*\\[0.0, 1.0\\]"),
        ("iso_cts", {"common_fraction": -0.1}, "'common_fraction'"),
        ("iso_cts", {"common_fraction": True}, "'common_fraction'"),
        ("iso_cts", {"scaling": float("nan")}, "'scaling'"),
        ("tsv", {"scaling": "1"}, "'scaling'"),
        ("tsv", {"non_matrix": "sum"}, "'non_matrix' .*mean, base"),
        ("iso_c", {"solve_dtype": "float16"}, "'solve_dtype'"),
        ("iso_c", {"skip": "("}, "'skip'"),
    ],
)
def test_bad_values_name_the_parameter(name, values, message):
    with pytest.raises(ConfigError, match=message):
        get_method(name).params(**values)


def test_registry_records():
    for name in ("tsv", "iso_c", "iso_cts"):
        m = get_method(name)
        assert m.reference.startswith("https://arxiv.org/abs/") and m.symmetric and m.idempotent
        assert m.param_fields()["shared"]["scaling"] == 1.0
    assert get_method("iso_cts").param_fields()["shared"]["common_fraction"] == 0.8
    assert get_method("tsv_m") is get_method("tsv")
