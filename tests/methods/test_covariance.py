"""Oracles for the covariance family (WUDI, SWUDI, SWUDI-A, ACE; ALGORITHMS.md §3).

Closed forms against their iterative definitions, hand-worked 2×2 examples, and ACE against a
plain transcription of its formula. Everything in float64 unless the test is about float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from tests.methods._engine import merge_model, merge_tensor
from torch.testing import assert_close

from mergeforge.errors import ConfigError
from mergeforge.methods import get_method
from mergeforge.methods.covariance import solve_spectral, spectrum, wudi_quadratic
from mergeforge.methods.wudi import entropy_rank, gavish_donoho, participation_sqrt

F64 = {"solve_dtype": "float64"}


def task_vectors(n, d1, d2, seed=0, scales=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    scales = scales or [1.0] * n
    return [s * torch.randn(d1, d2, generator=g, dtype=dtype) for s in scales]


def merged_delta(method, deltas, params=None, key="w"):
    """Run the registered method with a random base and return θ − θ₀."""
    g = torch.Generator().manual_seed(99)
    base = torch.randn(deltas[0].shape, generator=g, dtype=deltas[0].dtype)
    out = merge_model(method, {key: (base, [base + d for d in deltas])}, params)[key]
    return out - base


def c_and_d(deltas):
    """C = Σ τᵀτ/‖τ‖², D = Σ τ τᵀτ/‖τ‖², written plainly."""
    c = sum(t.T @ t / (t**2).sum() for t in deltas)
    d = sum(t @ t.T @ t / (t**2).sum() for t in deltas)
    return c, d


def wudi_loss(x, deltas):
    return sum(((x - t) @ t.T).pow(2).sum() / t.pow(2).sum() for t in deltas)


# --- the 2×2 example worked by hand --------------------------------------------------------
# τ₁ = [[1,0],[0,0]], τ₂ = [[1,1],[0,0]]: C = [[1.5,.5],[.5,.5]] (tr 2), D = [[2,1],[0,0]],
# C⁻¹ = [[1,-1],[-1,3]], D C⁻¹ = [[1,1],[0,0]] (= τ₂; the loss is 0 there), Σ τ = [[2,1],[0,0]].
HAND = [torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])]
HAND = [t.double() for t in HAND]


def test_hand_worked_exact_solution_and_start():
    exact = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    total = torch.tensor([[2.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    for filt in ("none", "exp"):
        p = {"filter": filt, "rank_ratio": 1.0, "exp_time": 1e9, **F64}
        assert_close(merged_delta("swudi", HAND, p), exact, atol=1e-9, rtol=0)
    assert_close(merged_delta("swudi", HAND, {"exp_time": 0.0, **F64}), total)
    assert_close(
        merged_delta("swudi_a", HAND, {"rank_rule": "entropy", **F64}), exact, atol=1e-9, rtol=0
    )


def test_hand_worked_first_adam_step():
    # gradient at Σ τ: 2(X₀C − D) = 2([[3.5,1.5],[0,0]] − [[2,1],[0,0]]) = [[3,1],[0,0]];
    # Adam's first step moves every entry with g ≠ 0 by lr·g/(|g| + 1e-8) ≈ lr·sign(g)
    out = merged_delta("wudi", HAND, {"iterations": 1, "lr": 0.1, **F64})
    first = [2 - 0.1 * 3 / (3 + 1e-8), 1 - 0.1 / (1 + 1e-8)]
    expected = torch.tensor([first, [0.0, 0.0]], dtype=torch.float64)
    assert_close(out, expected, atol=1e-12, rtol=0)


# --- SWUDI closed form against its definitions --------------------------------------------


def test_trace_of_c_is_the_number_of_task_vectors():
    deltas = task_vectors(5, 6, 9, scales=[1e-3, 1.0, 20.0, 0.5, 3.0])
    q = wudi_quadratic(deltas, sum(deltas))
    assert_close(torch.trace(q.gram), torch.tensor(5.0, dtype=torch.float64))
    c, d = c_and_d(deltas)
    assert_close(q.gram, c)
    assert_close(q.residual, sum(deltas) @ c - d)  # R₀ = X₀C − D, computed without cancelling


@pytest.mark.parametrize("init", ["sum", "mean", "zero"])
def test_infinite_time_full_rank_is_the_exact_solution(init):
    deltas = task_vectors(3, 4, 9)  # N·D1 = 12 ≥ D2 = 9: C invertible
    c, d = c_and_d(deltas)
    exact = torch.linalg.solve(c, d, left=False)  # D C⁻¹
    for p in ({"exp_time": 1e9}, {"filter": "none"}, {"filter": "tikhonov", "alpha": 1e-14}):
        out = merged_delta("swudi", deltas, {**p, "rank_ratio": 1.0, "init": init, **F64})
        assert_close(out, exact, rtol=1e-8, atol=1e-10)


def test_exact_solution_in_float32_matches_float64():
    deltas = task_vectors(3, 8, 16)
    p = {"filter": "none", "rank_ratio": 1.0}
    out32 = merged_delta("swudi", [t.float() for t in deltas], p)
    assert_close(out32.double(), merged_delta("swudi", deltas, {**p, **F64}), rtol=2e-3, atol=2e-4)


def test_zero_time_returns_the_start():
    deltas = task_vectors(4, 5, 7)
    total = sum(deltas)
    cases = {"sum": total, "mean": total / 4, "zero": torch.zeros_like(total)}
    for init, start in cases.items():
        assert_close(merged_delta("swudi", deltas, {"exp_time": 0.0, "init": init, **F64}), start)


def test_landweber_is_gradient_descent():
    # f = 1 − (1 − ηλ)^n, η = 0.9/λ_max, is n steps X ← X − α∇L with α = η/2, since
    # ∇L = 2(XC − D): in C's eigenbasis each step multiplies the error by (1 − 2αλ).
    deltas = task_vectors(3, 4, 6, seed=3)
    c, _ = c_and_d(deltas)
    alpha = 0.45 / float(torch.linalg.eigvalsh(c).max())
    x = sum(deltas).clone().requires_grad_(True)
    for _ in range(9):
        (grad,) = torch.autograd.grad(wudi_loss(x, deltas), x)
        x = (x - alpha * grad).detach().requires_grad_(True)
    p = {"filter": "landweber", "steps": 9, "rank_ratio": 1.0, **F64}
    assert_close(merged_delta("swudi", deltas, p), x.detach(), rtol=1e-10, atol=1e-12)


def test_exp_filter_is_the_gradient_flow():
    # Ẋ = −(XC − D) integrated with many tiny Euler steps approaches the exp filter at time t
    deltas = task_vectors(2, 3, 4, seed=5)
    c, d = c_and_d(deltas)
    t, steps = 0.7, 20000
    x = sum(deltas).clone()
    for _ in range(steps):
        x = x - (t / steps) * (x @ c - d)
    out = merged_delta("swudi", deltas, {"exp_time": t, "rank_ratio": 1.0, **F64})
    assert_close(out, x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_small_gram_path_equals_the_eigh_path(dtype, tol):
    deltas = task_vectors(2, 3, 11, seed=7, scales=[1.0, 4.0], dtype=dtype)  # N·D1 = 6 < 11
    q = wudi_quadratic(deltas, sum(deltas), gram=True, factor=True)
    small, full = spectrum(q, small_gram=True), spectrum(q, small_gram=False)
    assert small.vectors.shape[1] == 6 and full.vectors.shape[1] == 11
    assert_close(small.values, full.values, rtol=tol, atol=tol)
    assert int((full.values > 0).sum()) == 6  # the other 5 were rounding and are now exact 0
    for gain in (
        -torch.expm1(-300 * full.values.clamp(min=1e-8)) * (full.values > 0),
        (full.values > 0).to(dtype),
        torch.tensor([1.0, 1.0, 1.0] + [0.0] * 8, dtype=dtype),
    ):
        a, b = solve_spectral(q, small, gain), solve_spectral(q, full, gain)
        assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))
    # singular C, full rank kept, no filter: D C⁺ (the minimum-norm exact solution)
    c, d = c_and_d(deltas)
    out = merged_delta(
        "swudi", deltas, {"filter": "none", "rank_ratio": 1.0, "solve_dtype": str(dtype)[6:]}
    )
    assert_close(out, d @ torch.linalg.pinv(c, hermitian=True), rtol=tol * 10, atol=tol * 10)


def test_swudi_a_picks_the_same_rank_on_both_paths():
    deltas = task_vectors(2, 4, 13, seed=11, scales=[1.0, 0.2])
    q = wudi_quadratic(deltas, sum(deltas), gram=True, factor=True)
    for rule in (participation_sqrt, entropy_rank, gavish_donoho):
        ks = [rule(spectrum(q, small_gram=s).values, q.factor.shape[0]) for s in (True, False)]
        assert ks[0] == ks[1], rule.__name__


def test_rank_rules_by_hand():
    values = torch.tensor([4.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert participation_sqrt(values, 8) == 2  # (2 + 1)² / 5 = 1.8
    assert entropy_rank(torch.tensor([2.0, 2.0, 2.0, 0.0]), 8) == 3  # uniform over 3
    assert entropy_rank(torch.tensor([1.0, 0.0]), 8) == 1
    # m = 8 rows, D2 = 4: β = 1/2, ω ≈ 0.07 − 0.2375 + 0.91 + 1.43 = 2.1725; median σ of
    # [10, 3, 1, 1] is 2, threshold 4.345: only σ = 10 passes
    assert gavish_donoho(torch.tensor([100.0, 9.0, 1.0, 1.0]), 8) == 1
    assert gavish_donoho(torch.tensor([100.0, 81.0, 1.0, 1.0, 1.0, 1.0]), 12) == 2  # thr 2.17


def test_rank_ratio_counts_eigenvalues():
    deltas = task_vectors(3, 5, 10, seed=2)
    full = merged_delta("swudi", deltas, {"filter": "none", "rank_ratio": 1.0, **F64})
    part = merged_delta("swudi", deltas, {"filter": "none", "rank_ratio": 0.65, **F64})
    c, d = c_and_d(deltas)
    lam, v = torch.linalg.eigh(c)
    vk, lk = v[:, -7:], lam[-7:]  # ⌈0.65·10⌉ = 7 (not 8 from 0.65·10 = 6.500000000000001)
    x0 = sum(deltas)
    expected = x0 - (x0 @ c - d) @ vk @ torch.diag(1 / lk) @ vk.T
    assert_close(part, expected)
    assert not torch.allclose(part, full)


# --- WUDI: Adam on the loss ----------------------------------------------------------------


@pytest.mark.parametrize("init", ["sum", "zero"])
def test_wudi_is_torch_adam_on_the_loss(init):
    deltas = task_vectors(3, 5, 7, seed=4, scales=[1.0, 0.1, 2.0])
    x = (sum(deltas) if init == "sum" else torch.zeros(5, 7, dtype=torch.float64)).clone()
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=1e-3)
    for _ in range(25):
        opt.zero_grad()
        wudi_loss(x, deltas).backward()
        opt.step()
    out = merged_delta("wudi", deltas, {"iterations": 25, "lr": 1e-3, "init": init, **F64})
    assert_close(out, x.detach(), rtol=1e-10, atol=1e-12)


def test_wudi_float32_under_no_grad_and_inference_mode():
    deltas = task_vectors(3, 6, 8, dtype=torch.float32)
    ref = merged_delta("wudi", deltas, {"iterations": 10})
    with torch.no_grad():
        assert torch.equal(merged_delta("wudi", deltas, {"iterations": 10}), ref)
    with torch.inference_mode():
        assert torch.equal(merged_delta("wudi", deltas, {"iterations": 10}), ref)


# --- degenerate inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["wudi", "swudi", "swudi_a"])
def test_one_task_vector_is_returned(method):
    (delta,) = task_vectors(1, 4, 6)
    assert_close(merged_delta(method, [delta], F64), delta, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["wudi", "swudi", "swudi_a", "ace"])
@pytest.mark.parametrize("shape", [(4, 6), (2, 30), (30, 2)])
def test_zero_and_low_rank_task_vectors_stay_finite(method, shape):
    u = torch.randn(shape[0], 1, dtype=torch.float64)
    rank_one = u @ torch.randn(1, shape[1], dtype=torch.float64)
    cases = [
        [torch.zeros(shape, dtype=torch.float64)] * 3,  # identical experts
        [torch.zeros(shape, dtype=torch.float64), rank_one],  # one expert equals the base
        [rank_one, 2 * rank_one, -rank_one],  # rank-one C
    ]
    for deltas in cases:
        for params in ({}, F64):
            out = merged_delta(method, [d.float() for d in deltas], params)
            assert torch.isfinite(out).all()
    zeros = torch.zeros(shape)
    assert torch.equal(merged_delta(method, [zeros] * 3), zeros)


def test_conv1d_weights_are_solved_transposed():
    deltas = task_vectors(3, 4, 6)
    p = {"filter": "none", "rank_ratio": 1.0, **F64}
    stored = [t.T.contiguous() for t in deltas]  # GPT-2 Conv1D: (in, out)
    base = torch.zeros(6, 4, dtype=torch.float64)
    out = merge_tensor("swudi", base, stored, p)  # key "t": read as (out, in)
    conv = get_method("swudi")
    from mergeforge.methods import TensorContext

    ctx = TensorContext(key="h.0.attn.c_attn.weight")
    flipped = conv.fn(base, stored, conv.params(**p), (), ctx)
    assert_close(flipped.T, merged_delta("swudi", deltas, p))
    assert not torch.allclose(flipped, out)


# --- ACE against a plain transcription of ALGORITHMS.md §3 --------------------------------


def ace_by_hand(taus, eps=1e-2, threshold=0.3, frac=0.3, ridge="absolute", prior="code"):
    T, d2 = len(taus), taus[0].shape[1]
    # 1. heterogeneity
    ell = torch.tensor([math.log((t**2).sum().item() + 1e-12) for t in taus])
    gamma = ell.var() / (ell.mean() ** 2 + 1e-12)
    hetero = bool(gamma > threshold)
    # 2. centred covariances
    centred, sigmas, ridged = [], [], []
    for t in taus:
        tc = t - t.mean(dim=0, keepdim=True)
        s = tc.T @ tc
        tr = torch.trace(s).item() + 1e-12
        sigma = s / tr if hetero else s
        if ridge == "absolute":
            e = eps / tr if hetero else eps
        else:
            e = eps * torch.trace(sigma).item() / d2
        centred.append(tc)
        sigmas.append(sigma)
        ridged.append(sigma + e * torch.eye(d2, dtype=t.dtype))
    # 3. W = B A⁻¹ with the collective prior
    B = sum(tc @ r for tc, r in zip(centred, ridged, strict=True))
    A = sum(ridged)
    if prior == "code":
        c_agg = sum(sigmas).mean(dim=0, keepdim=True).expand(d2, d2)
    else:
        c_agg = torch.trace(sum(sigmas)) / d2 * torch.eye(d2, dtype=A.dtype)
    if hetero:
        c_agg = c_agg / (sum((t**2).sum() for t in taus) / T + 1e-12)
    W = B @ torch.linalg.inv(A + c_agg)
    # 4. isotropic refinement
    if hetero:
        mean_ridged = sum(ridged) / T
        R = sum(t @ (s - mean_ridged) for t, s in zip(taus, sigmas, strict=True))
        U, S, Vh = torch.linalg.svd(R + W, full_matrices=False)
        k = int(S.numel() * frac)
        W = W + S[:k].mean() * U[:, :k] @ Vh[:k, :]
    return W, hetero


@pytest.mark.parametrize("ridge", ["absolute", "relative"])
@pytest.mark.parametrize("prior", ["code", "isotropic"])
@pytest.mark.parametrize("scales", [[1.0, 1.1, 0.9, 1.05], [1e-3, 1.0, 30.0, 0.1]])
def test_ace_equals_its_formula(ridge, prior, scales):
    taus = task_vectors(4, 7, 10, seed=8, scales=scales)
    expected, hetero = ace_by_hand(taus, ridge=ridge, prior=prior)
    assert hetero == (scales[0] == 1e-3)  # both branches are exercised
    out = merged_delta("ace", taus, {"ridge": ridge, "prior": prior, **F64})
    assert_close(out, expected, rtol=1e-8, atol=1e-10)


def test_ace_output_side_is_the_authors_code_on_gpt2_conv1d():
    # The authors' code runs the formula on each weight as stored. GPT-2's Conv1D stores
    # (in, out), so there its covariances are over the output features: side "output".
    taus = task_vectors(4, 7, 10, seed=8, scales=[1e-3, 1.0, 30.0, 0.1])  # hetero branch too
    p = {"ridge": "absolute", "side": "output", **F64}
    on_stored, _ = ace_by_hand([t.T for t in taus])  # what their code does to (in, out)
    # a Linear weight (out, in): output side = the formula on τᵀ, transposed back
    assert_close(merged_delta("ace", taus, p), on_stored.T, rtol=1e-8, atol=1e-10)
    # the same as reading the Linear weight as if it were stored (in, out)
    in_out = merged_delta("ace", taus, {**p, "side": "input", "orientation": "in_out"})
    assert_close(merged_delta("ace", taus, p), in_out, rtol=1e-12, atol=0)
    # a GPT-2 Conv1D weight stored (in, out): side "output" is their code on it, untransposed
    stored = [t.T.contiguous() for t in taus]
    conv = merged_delta("ace", stored, p, key="h.0.mlp.c_fc.weight")
    assert_close(conv, on_stored, rtol=1e-8, atol=1e-10)
    # and side "input" there is the formula on the (out, in) reading, as for a Linear
    conv_in = merged_delta("ace", stored, {**p, "side": "input"}, key="h.0.mlp.c_fc.weight")
    assert_close(conv_in, ace_by_hand(taus)[0].T, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(conv, conv_in)


@pytest.mark.parametrize("method", ["wudi", "swudi", "swudi_a", "ace"])
def test_output_side_solves_the_transpose(method):
    taus = task_vectors(3, 5, 9, seed=4)  # D1 ≠ D2, so the two sides differ in size
    p = {"iterations": 20} if method == "wudi" else {}
    out = merged_delta(method, taus, {**p, "side": "output", **F64})
    on_t = merged_delta(method, [t.T.contiguous() for t in taus], {**p, **F64})
    assert_close(out, on_t.T, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out, merged_delta(method, taus, {**p, **F64}))
    with pytest.raises(ConfigError, match="'side'"):
        get_method(method).params(side="rows")


def test_ace_absolute_ridge_swamps_small_task_vectors():
    # the "Caution, measured" paragraph: tiny τ ⇒ A ≈ T·eps·I ⇒ W ≈ mean of the centred τ
    taus = task_vectors(3, 6, 8, seed=9, scales=[5e-4] * 3)
    centred_mean = sum(t - t.mean(dim=0, keepdim=True) for t in taus) / 3
    absolute = merged_delta("ace", taus, {"ridge": "absolute", **F64})
    assert_close(absolute, centred_mean, rtol=1e-3, atol=1e-6)
    relative = merged_delta("ace", taus, {"ridge": "relative", **F64})
    assert not torch.allclose(relative, centred_mean, rtol=1e-2)
    # the relative ridge is scale-free: merging c·τ gives c·merge(τ) (no refinement here)
    big = merged_delta("ace", [1000 * t for t in taus], {"ridge": "relative", **F64})
    assert_close(big, 1000 * relative)


# --- parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,params,name",
    [
        ("wudi", {"iterations": -1}, "iterations"),
        ("wudi", {"iterations": 2.5}, "iterations"),
        ("wudi", {"lr": -1e-5}, "lr"),
        ("wudi", {"init": "mean"}, "init"),
        ("swudi", {"filter": "gauss"}, "filter"),
        ("swudi", {"rank_ratio": 1.5}, "rank_ratio"),
        ("swudi", {"exp_time": -1.0}, "exp_time"),
        ("swudi", {"steps": True}, "steps"),
        ("swudi", {"alpha": float("nan")}, "alpha"),
        ("swudi", {"solve_dtype": "float16"}, "solve_dtype"),
        ("swudi_a", {"rank_rule": "oracle"}, "rank_rule"),
        ("ace", {"ridge": "none"}, "ridge"),
        ("ace", {"prior": "zero"}, "prior"),
        ("ace", {"refine_fraction": 1.5}, "refine_fraction"),
        ("ace", {"eps": -1.0}, "eps"),
    ],
)
def test_invalid_parameters_name_the_parameter(method, params, name):
    with pytest.raises(ConfigError, match=repr(name)):
        get_method(method).params(**params)


def test_defaults_follow_the_papers():
    fields = {
        m: get_method(m).param_fields()["shared"] for m in ("wudi", "swudi", "swudi_a", "ace")
    }
    assert fields["wudi"] | {} == fields["wudi"]
    assert (fields["wudi"]["iterations"], fields["wudi"]["lr"], fields["wudi"]["init"]) == (
        300,
        1e-5,
        "sum",
    )
    assert (fields["swudi"]["exp_time"], fields["swudi"]["rank_ratio"]) == (300.0, 0.65)
    assert fields["swudi_a"]["rank_rule"] == "participation_sqrt"
    assert (fields["ace"]["eps"], fields["ace"]["hetero_threshold"]) == (1e-2, 0.3)
    assert all(f["scaling"] == 1.0 for f in fields.values())


def test_rank_rules_take_round_off_negatives_and_zero_grams():
    """``eigh`` returns −1e-9 for a zero eigenvalue: its square root must not turn K into NaN
    (seen in a federated round with a client scaled ×100); a zero F keeps nothing."""

    values = torch.tensor([4.0, 1.0, -1e-9])
    assert participation_sqrt(values, 3) == 2  # (2 + 1)² / 5 = 1.8 -> 2
    assert entropy_rank(values, 3) == 2
    assert gavish_donoho(values, 3) == 0
    assert participation_sqrt(torch.zeros(3), 3) == 0
    assert entropy_rank(torch.zeros(3), 3) == 0
