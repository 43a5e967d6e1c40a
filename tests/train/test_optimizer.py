"""UMTAM, the merge-ready optimizer: oracles, not smoke (STYLE habits 8, 9).

Four ways: against references (the exact EMA of the gradients at full rank; a plain, step-by-step
transcription of the paper's update; ``torch.optim.AdamW`` for the vector path), determinism
(bit-identical state for the same seed; the user's RNG untouched), convergence on a small
least-squares problem, and properties (the stable variant's clamps, the state's size, the
between-refresh rule, >2-D weights, state_dict round trips). One table holds each setting's sample
inputs, one its error inputs with the expected message.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mergeforge.errors import ConfigError, ValidationError
from mergeforge.train.optimizer import STABLE, UMTAM, truncated_svd

F64 = torch.float64

# name -> (UMTAM keywords, number of steps, gradient scale). Gradients ~ N(0, scale²) (6, 5).
SETTINGS: dict[str, tuple[dict, int, float]] = {
    "paper, one step": (dict(rank=2), 1, 1.0),
    "paper, four steps": (dict(rank=2), 4, 0.1),
    "clipped, weight decay": (dict(rank=3, weight_decay=0.1, lr=1e-2), 3, 5.0),
    "hold between refreshes": (dict(rank=2, svd_every=2), 5, 1.0),
    "feedback between refreshes": (dict(rank=2, svd_every=2, between_refreshes="feedback"), 5, 1.0),
    "stable": ({**STABLE, "rank": 2, "lr": 1e-2}, 4, 1e-3),
    "stable, update clipped": ({**STABLE, "rank": 2, "lr": 10.0}, 3, 1.0),
    "full rank, no feedback": (dict(rank=5, gamma=0.0, betas=(0.5, 0.9)), 3, 1.0),
}

# keywords -> expected message (every error names the parameter)
ERROR_INPUTS: list[tuple[dict, str]] = [
    (dict(lr=-1e-3), "lr must be a finite number >= 0"),
    (dict(lr=float("nan")), "lr must be a finite number >= 0"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\] must be in \[0, 1\)"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\] must be in \[0, 1\)"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(gamma=1.0), r"gamma must be in \[0, 1\)"),
    (dict(alpha=-0.5), r"alpha must be in \[0, 1\)"),
    (dict(eps=0.0), "eps must be a finite number > 0"),
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=2.5), "rank must be an integer >= 1"),
    (dict(svd_every=0), "svd_every must be an integer >= 1"),
    (dict(power_iters=-1), "power_iters must be an integer >= 0"),
    (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0"),
    (dict(stat_min=-1e-4), "stat_min must be a finite number >= 0"),
    (dict(grad_clip=0.0), r"grad_clip must be None \(off\) or a number > 0"),
    (dict(max_precond=-10.0), r"max_precond must be None \(off\) or a number > 0"),
    (dict(max_update_norm=0), r"max_update_norm must be None \(off\) or a number > 0"),
    (dict(between_refreshes="accumulate"), "between_refreshes must be one of"),
    (dict(svd="qr"), "svd must be one of"),
    (dict(track_saliency="yes"), "track_saliency must be True or False"),
]


def _grads(steps: int, shape=(6, 5), scale=1.0, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=gen, dtype=F64) for _ in range(steps)]


def _run(w0: torch.Tensor, grads: list[torch.Tensor], **kw) -> tuple[nn.Parameter, UMTAM]:
    """``UMTAM(**kw)`` on one parameter (a copy of ``w0``) fed ``grads``, one step each."""
    w = nn.Parameter(w0.clone())
    opt = UMTAM([("w", w)], **kw)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w, opt


def _momentum(st: dict) -> torch.Tensor:
    return (st["U"] * st["sigma"]) @ st["V"].mT


def transcription(w, grads, *, lr=1e-3, rank=32, betas=(0.9, 0.999), gamma=0.9, eps=1e-8,
                  weight_decay=0.0, grad_clip=1.0, svd_every=1, between_refreshes="hold",
                  stat_min=0.0, max_precond=None, max_update_norm=None):  # fmt: skip
    """The paper's update (../shared/ALGORITHMS.md §4, with the authors' code's guards) written
    out plainly for one matrix, step by step. Returns W and the state."""
    beta1, beta2 = betas
    m, n = w.shape
    r = min(rank, m, n)
    U, s, V = torch.zeros(m, r, dtype=F64), torch.zeros(r, dtype=F64), torch.zeros(n, r, dtype=F64)
    E = torch.zeros(m, n, dtype=F64)
    R = torch.full((m,), max(eps, stat_min), dtype=F64)
    C = torch.full((n,), max(eps, stat_min), dtype=F64)
    W = w.clone()
    for t, G in enumerate(grads, start=1):
        # per-tensor clipping to norm grad_clip; ‖G‖ before clipping feeds ε_t
        g_norm = torch.linalg.norm(G).item()
        if grad_clip is not None and g_norm > grad_clip:
            G = G * (grad_clip / g_norm)
        # decoupled weight decay
        W = W * (1 - lr * weight_decay)
        # momentum: M̃ = β₁ U Σ Vᵀ + (1 − β₁) G + γ E; refreshed on steps 1, 1 + k, 1 + 2k, ...
        M = U @ torch.diag(s) @ V.T
        M_tilde = beta1 * M + (1 - beta1) * G + gamma * E
        if (t - 1) % svd_every == 0:
            U_full, s_full, Vh_full = torch.linalg.svd(M_tilde, full_matrices=False)
            U, s, V = U_full[:, :r], s_full[:r], Vh_full[:r].T
            M = U @ torch.diag(s) @ V.T
            E = M_tilde - M
        elif between_refreshes == "feedback":
            E = M_tilde - M
        # Adafactor row / column second moments
        R = beta2 * R + (1 - beta2) * (G**2).sum(dim=1)
        C = beta2 * C + (1 - beta2) * (G**2).sum(dim=0)
        if stat_min > 0:
            R, C = R.clamp(min=stat_min), C.clamp(min=stat_min)
        # preconditioner P = (Ŝ + ε_t)^(−1/2), Ŝ = R Cᵀ / sum(R)
        S_hat = torch.outer(R, C) / (R.sum() + eps)
        W_norm = torch.linalg.norm(W).item()
        eps_t = eps * max(1.0, g_norm / W_norm) if W_norm > eps else eps
        P = 1.0 / torch.sqrt(S_hat + eps_t)
        if max_precond is not None:
            P = P.clamp(max=max_precond)
        # W ← W − η P ⊙ U Σ Vᵀ
        update = lr * P * M
        if max_update_norm is not None and torch.linalg.norm(update) > max_update_norm:
            update = update * (max_update_norm / torch.linalg.norm(update))
        W = W - update
    return W, {"M": M, "E": E, "R": R, "C": C}


# --- against references ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SETTINGS))
def test_matches_the_transcribed_update(name):
    kw, steps, scale = SETTINGS[name]
    w0 = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    grads = _grads(steps, scale=scale)
    w, opt = _run(w0, grads, **kw)
    W, ref = transcription(w0, grads, **kw)
    st = opt.state[w]
    torch.testing.assert_close(w.detach(), W, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_momentum(st), ref["M"], rtol=1e-10, atol=1e-12)
    for key in ("E", "R", "C"):
        torch.testing.assert_close(st[key], ref[key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 5), (4, 9)])
def test_full_rank_momentum_is_the_exact_ema_of_clipped_gradients(shape):
    grads = _grads(6, shape=shape, scale=3.0)  # norms ~ 15: every step is clipped
    w, opt = _run(torch.zeros(shape, dtype=F64) + 1.0, grads, rank=min(shape), gamma=0.0,
                  svd_every=1, betas=(0.8, 0.99))  # fmt: skip
    ema = torch.zeros(shape, dtype=F64)
    for g in grads:
        ema = 0.8 * ema + 0.2 * g / torch.linalg.norm(g)
    torch.testing.assert_close(_momentum(opt.state[w]), ema, rtol=1e-10, atol=1e-12)


def _vector_model(seed: int) -> nn.ParameterDict:
    gen = torch.Generator().manual_seed(seed)
    return nn.ParameterDict({
        "bias": nn.Parameter(torch.randn(10, generator=gen)),
        "norm": nn.Parameter(torch.ones(7)),
        "scale": nn.Parameter(torch.tensor(0.5)),
        "matrix": nn.Parameter(torch.randn(4, 3, generator=gen)),  # AdamW path: factored=False
    })  # fmt: skip


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_vector_path_is_adamw(grad_clip):
    """Vectors, scalars and a ``factored=False`` matrix: bit-identical to torch.optim.AdamW (on
    the per-tensor clipped gradient when clipping is on)."""
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    ours, ref = _vector_model(0), _vector_model(0)
    opt = UMTAM([{"params": list(ours.named_parameters()), "factored": False}],
                grad_clip=grad_clip, **hyper)  # fmt: skip
    adamw = torch.optim.AdamW(ref.parameters(), foreach=False, **hyper)
    gen = torch.Generator().manual_seed(3)
    for _ in range(8):
        for (_, p), (_, q) in zip(ours.items(), ref.items(), strict=True):
            g = 2.0 * torch.randn(p.shape, generator=gen)
            p.grad = g.clone()
            norm = torch.linalg.vector_norm(g).item()
            q.grad = g * (grad_clip / norm) if grad_clip and norm > grad_clip else g.clone()
        opt.step()
        adamw.step()
    for (name, p), q in zip(ours.items(), ref.values(), strict=True):
        assert torch.equal(p, q), name
        assert torch.equal(opt.state[p]["exp_avg_sq"], adamw.state[q]["exp_avg_sq"]), name


def test_vectors_take_adamw_beside_factored_matrices():
    """In a default group the bias takes AdamW and the weight the factored path."""
    layer = nn.Linear(5, 4)
    opt = UMTAM(layer.named_parameters())
    layer.weight.grad, layer.bias.grad = torch.ones(4, 5), torch.ones(4)
    opt.step()
    assert set(opt.state[layer.weight]) == {"step", "U", "sigma", "V", "E", "R", "C"}
    assert set(opt.state[layer.bias]) == {"step", "exp_avg", "exp_avg_sq"}


# --- determinism ----------------------------------------------------------------------------


def _train_mlp(seed: int, steps: int, **kw) -> tuple[nn.Module, UMTAM, list[float]]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 16), nn.Dropout(0.1), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 12), torch.randn(64, 3)
    opt = UMTAM(net.named_parameters(), rank=4, **kw)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return net, opt, losses


@pytest.mark.parametrize("svd", ["exact", "randomized", "subspace"])
def test_same_seed_gives_bit_identical_state(svd):
    kw = dict(svd=svd, oversample=2, svd_every=2, between_refreshes="feedback")
    net_a, opt_a, losses_a = _train_mlp(0, 6, **kw)
    net_b, opt_b, losses_b = _train_mlp(0, 6, **kw)
    assert losses_a == losses_b
    for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
        for key, ta in opt_a.state[pa].items():
            assert torch.equal(ta, opt_b.state[pb][key]), key


def test_randomized_svd_leaves_the_global_rng_alone():
    w = nn.Parameter(torch.randn(20, 30))
    opt = UMTAM([w], rank=3, svd="randomized")
    w.grad = torch.randn(20, 30)
    before = torch.get_rng_state()
    opt.step()
    assert torch.equal(torch.get_rng_state(), before)


def test_randomized_svd_is_exact_on_a_low_rank_matrix():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, 3, generator=gen, dtype=F64) @ torch.randn(3, 30, generator=gen, dtype=F64)
    u, s, v = truncated_svd(a, 3, method="randomized", oversample=2, power_iters=1, seed=5)
    torch.testing.assert_close((u * s) @ v.mT, a, rtol=1e-9, atol=1e-10)
    _, s_exact, _ = torch.linalg.svd(a)
    torch.testing.assert_close(s, s_exact[:3], rtol=1e-9, atol=1e-10)


def test_subspace_svd_starts_as_randomized_then_tracks_the_exact_factors():
    gen = torch.Generator().manual_seed(1)
    spectrum = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5] + [0.01] * 25, dtype=F64)
    q1 = torch.linalg.qr(torch.randn(40, 30, generator=gen, dtype=F64)).Q
    q2 = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=F64)).Q
    a = (q1 * spectrum) @ q2.mT
    kw = dict(method="subspace", oversample=2, power_iters=2, seed=3)
    first = truncated_svd(a, 3, **kw)  # no previous factor: the randomized range finder
    for x, y in zip(first, truncated_svd(a, 3, **{**kw, "method": "randomized"}), strict=True):
        assert torch.equal(x, y)
    # warm-started from the previous V, repeated refreshes of the same matrix are block power
    # iteration: the factors converge to the exact top-3 (gap σ₄/σ₃ = 0.5 a refresh)
    v = first[2]
    for step in range(40):
        u, s, v = truncated_svd(a, 3, **{**kw, "seed": step}, start=v)
    _, s_exact, vh = torch.linalg.svd(a)
    torch.testing.assert_close(s, s_exact[:3], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((v.mT @ vh[:3].mT).abs(), torch.eye(3, dtype=F64), atol=1e-8, rtol=0)
    # exact in one refresh on a matrix of rank ≤ r, whatever the start
    low = torch.randn(40, 3, generator=gen, dtype=F64)
    low = low @ torch.randn(3, 30, generator=gen, dtype=F64)
    u, s, v = truncated_svd(low, 3, **kw, start=torch.linalg.qr(torch.randn(30, 3, dtype=F64)).Q)
    torch.testing.assert_close((u * s) @ v.mT, low, rtol=1e-9, atol=1e-10)


# --- convergence ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(svd="randomized"),
        dict(svd="subspace"),
        {**STABLE, "lr": 1e-2, "between_refreshes": "feedback"},
    ],
    ids=["paper", "randomized", "subspace", "stable+feedback"],  # fmt: skip
)
def test_converges_on_least_squares(kw):
    """y = A x + b with A (8, 20) of rank 3: from zero, the loss falls ≥ 100×."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 3, generator=gen) @ torch.randn(3, 20, generator=gen) / 3
    b = torch.randn(8, generator=gen)
    x = torch.randn(256, 20, generator=gen)
    y = x @ a.T + b
    layer = nn.Linear(20, 8)
    nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)
    opt = UMTAM(layer.named_parameters(), **{"lr": 1e-2, "rank": 4, **kw})
    losses = []
    for _ in range(400):
        loss = nn.functional.mse_loss(layer(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 100, (losses[0], losses[-1])


# --- properties -----------------------------------------------------------------------------


def test_stable_variant_clamps_hold():
    # tiny gradients: R, C would fall below 1e-4 and P above 10 without the clamps
    w0 = torch.randn(6, 5, dtype=F64)
    grads = _grads(3, scale=1e-4)
    w, opt = _run(w0, grads, **{**STABLE, "rank": 2})
    st = opt.state[w]
    assert st["R"].min() >= 1e-4 and st["C"].min() >= 1e-4
    assert torch.all(st["R"] == 1e-4)  # clamped, not merely above
    # the last step moved W by lr P ⊙ U Σ Vᵀ with P ≤ 10, and P = 10 where it binds
    before = _run(w0, grads[:-1], **{**STABLE, "rank": 2})[0].detach()
    ratio = (before - w.detach()).abs() / (1e-4 * _momentum(st).abs())
    assert 10 * (1 - 1e-6) <= ratio.max() <= 10 * (1 + 1e-6)  # W ~ 1, ΔW ~ 1e-8: cancellation
    # a huge learning rate: the update's norm is held at 1
    w0 = torch.randn(6, 5, dtype=F64)
    w, _ = _run(w0, _grads(1), **{**STABLE, "rank": 2, "lr": 1e3})
    assert math.isclose(torch.linalg.norm(w.detach() - w0).item(), 1.0, rel_tol=1e-9)
    # and the paper's variant, unclamped, moves it far further
    w, _ = _run(w0, _grads(1), rank=2, lr=1e3)
    assert torch.linalg.norm(w.detach() - w0).item() > 100


def test_hold_keeps_the_factors_between_refreshes_and_feedback_keeps_e_exact():
    w0 = torch.randn(6, 5, dtype=F64)
    grads = _grads(2)
    w1, opt1 = _run(w0, grads[:1], rank=2, svd_every=3)
    w2, opt2 = _run(w0, grads, rank=2, svd_every=3)
    for key in ("U", "sigma", "V", "E"):
        assert torch.equal(opt1.state[w1][key], opt2.state[w2][key]), key
    w3, opt3 = _run(w0, grads, rank=2, svd_every=3, between_refreshes="feedback")
    st1, st3 = opt1.state[w1], opt3.state[w3]
    g = grads[1] / max(1.0, torch.linalg.norm(grads[1]).item())
    m_tilde = 0.9 * _momentum(st1) + 0.1 * g + 0.9 * st1["E"]
    torch.testing.assert_close(st3["E"], m_tilde - _momentum(st3), rtol=1e-12, atol=1e-14)


def test_state_bytes_below_adamw_and_as_documented():
    m, n, r = 128, 256, 8
    layer = nn.Linear(n, m, bias=False)
    adamw = torch.optim.AdamW(layer.parameters())
    ours = UMTAM(layer.named_parameters(), rank=r)
    layer.weight.grad = torch.randn(m, n)
    adamw.step()
    ours.step()
    adamw_bytes = sum(t.numel() * t.element_size() for t in adamw.state[layer.weight].values())
    assert adamw_bytes == 4 * (2 * m * n + 1)
    assert ours.state_bytes() == 4 * (m * n + r * (m + n + 1) + m + n + 1)
    assert ours.state_bytes() < 0.6 * adamw_bytes
    tracked = UMTAM(layer.named_parameters(), rank=r, track_saliency=True)
    tracked.step()
    assert tracked.state_bytes() == ours.state_bytes() + 4 * 2 * m * n


def test_higher_dimensional_weight_is_its_matrix_view():
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 3, 2, 2, generator=gen, dtype=F64)
    grads = _grads(4, shape=(6, 3, 2, 2))
    conv, opt_conv = _run(w0, grads, rank=2)
    mat, opt_mat = _run(w0.reshape(6, 12), [g.reshape(6, 12) for g in grads], rank=2)
    assert torch.equal(conv.detach().reshape(6, 12), mat.detach())
    assert opt_conv.state[conv]["R"].shape == (6,) and opt_conv.state[conv]["C"].shape == (12,)


def test_state_dict_round_trip_continues_the_same_trajectory():
    w0 = torch.randn(6, 5, dtype=F64)
    grads = _grads(6)
    kw = dict(rank=2, svd_every=2, between_refreshes="feedback", track_saliency=True)
    straight, _ = _run(w0, grads, **kw)
    half, opt = _run(w0, grads[:3], **kw)
    saved = copy.deepcopy(opt.state_dict())
    resumed = nn.Parameter(half.detach().clone())
    opt2 = UMTAM([("w", resumed)], **kw)
    opt2.load_state_dict(saved)
    for g in grads[3:]:
        resumed.grad = g.clone()
        opt2.step()
    assert torch.equal(resumed, straight)


def test_dtype_is_kept_and_bf16_follows_fp32():
    w0 = torch.randn(6, 5)
    grads = [g.float() for g in _grads(3)]
    w32, _ = _run(w0, grads, rank=2, lr=1e-2)
    w16, opt = _run(w0.bfloat16(), [g.bfloat16() for g in grads], rank=2, lr=1e-2)
    assert w16.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for k, t in opt.state[w16].items() if k != "step")
    torch.testing.assert_close(w16.detach().float(), w32.detach(), rtol=2e-2, atol=2e-2)


def test_inputs_are_not_mutated():
    w = nn.Parameter(torch.randn(6, 5))
    opt = UMTAM([w], rank=2)
    g = 10 * torch.randn(6, 5)  # clipped inside: the caller's gradient stays as it was
    w.grad = g.clone()
    opt.step()
    assert torch.equal(w.grad, g)


# --- error inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "message"), ERROR_INPUTS, ids=[m for _, m in ERROR_INPUTS])
def test_invalid_hyper_parameters_name_the_parameter(kw, message):
    with pytest.raises(ConfigError, match="UMTAM: " + message):
        UMTAM([nn.Parameter(torch.zeros(2, 2))], **kw)


def test_invalid_group_hyper_parameter_is_refused():
    with pytest.raises(ConfigError, match="rank must be an integer >= 1, got 0"):
        UMTAM([{"params": [nn.Parameter(torch.zeros(2, 2))], "rank": 0}])


def test_stable_takes_overrides():
    opt = UMTAM.stable([nn.Parameter(torch.zeros(2, 2))], rank=4)
    assert opt.defaults["rank"] == 4 and opt.defaults["svd_every"] == 10
    assert opt.defaults["max_precond"] == 10.0 and opt.defaults["lr"] == 1e-4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_names_the_parameter_and_changes_nothing(bad):
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = UMTAM(net.named_parameters(), rank=2)
    before = copy.deepcopy(net.state_dict())
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    net[1].weight.grad[0, 1] = bad
    with pytest.raises(ValidationError, match=r"gradient of 1\.weight is not finite .* step 1"):
        opt.step()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not opt.state


# --- the curvature artifact -----------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)  # weight (4, 2, 3, 3) -> (4, 18)
        self.fc = nn.Linear(8, 5)
        self.emb = nn.Embedding(7, 8)  # on the AdamW path below


def _tiny_trained(**kw) -> tuple[_Tiny, UMTAM]:
    torch.manual_seed(0)
    model = _Tiny()
    named = dict(model.named_parameters())
    opt = UMTAM(
        [
            {"params": [(n, p) for n, p in named.items() if not n.startswith("emb")]},
            {"params": [("emb.weight", named["emb.weight"])], "factored": False},
        ],
        rank=2,
        **kw,
    )
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    return model, opt


def test_curvature_state_follows_the_contract():
    model, opt = _tiny_trained(track_saliency=True)
    tensors, meta = opt.curvature_state(examples=96)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    assert shapes == {
        "conv.weight:R": (4,), "conv.weight:C": (18,), "conv.weight:S": (4, 2, 3, 3),
        "conv.bias:R": (4,),
        "fc.weight:R": (5,), "fc.weight:C": (8,), "fc.weight:S": (5, 8),
        "fc.bias:R": (5,),
        "emb.weight:R": (7,), "emb.weight:C": (8,),
    }  # fmt: skip
    v = opt.state[model.emb.weight]["exp_avg_sq"]
    torch.testing.assert_close(tensors["emb.weight:R"], v.sum(dim=1))
    torch.testing.assert_close(tensors["emb.weight:C"], v.sum(dim=0))
    assert torch.equal(tensors["fc.bias:R"], opt.state[model.fc.bias]["exp_avg_sq"])
    assert {k: meta[k] for k in ("kind", "variant", "beta2", "steps", "examples", "source")} == {
        "kind": "curvature", "variant": "ema", "beta2": "0.999", "steps": "3",
        "examples": "96", "source": "umtam-optimizer",
    }  # fmt: skip
    assert meta["has_saliency"] == "true" and meta["has_exp_avg_sq"] == "false"


def test_curvature_state_needs_names():
    w = nn.Parameter(torch.randn(3, 3))
    opt = UMTAM([w])
    w.grad = torch.ones(3, 3)
    opt.step()
    with pytest.raises(ConfigError, match="has no name"):
        opt.curvature_state()
    holder = nn.Module()
    holder.w = w
    assert set(opt.curvature_state(model=holder)[0]) == {"w:R", "w:C"}


def test_export_writes_the_curvature_sidecar(tmp_path):
    artifact = pytest.importorskip("mergeforge.train.artifact")
    from safetensors.torch import save_file

    model, opt = _tiny_trained()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    path = opt.export(tmp_path, examples=96)
    assert path.is_file()
    stats, meta = artifact.load_curvature(tmp_path)
    tensors, _ = opt.curvature_state(examples=96)
    assert set(stats) == {k.rpartition(":")[0] for k in tensors}
    torch.testing.assert_close(stats["fc.weight"].R, tensors["fc.weight:R"])
    torch.testing.assert_close(stats["conv.weight"].C, tensors["conv.weight:C"])
    assert (meta.variant, meta.steps, meta.examples, meta.source) == (
        "ema",
        3,
        96,
        "umtam-optimizer",
    )
