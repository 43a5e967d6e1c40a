"""The closed form against pinv (and patches unfolded by hand), and the gradient fitter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mergeforge.errors import ValidationError
from mergeforge.fusion.fit import affine_lstsq, design_matrix, fit_gradient


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _with_ones(x):
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


@pytest.mark.parametrize("rows", [50, 6])  # over- and under-determined
def test_linear_equals_pinv(rows):
    lin = nn.Linear(8, 3)
    x, t = torch.randn(rows, 8, generator=_gen()), torch.randn(rows, 3, generator=_gen(1))
    w, b = affine_lstsq(lin, x, t, ridge=0)
    want = torch.linalg.pinv(_with_ones(x.double())) @ t.double()
    torch.testing.assert_close(torch.cat([w.T, b[None]]).double(), want, rtol=1e-5, atol=1e-5)
    assert w.shape == lin.weight.shape and w.dtype == lin.weight.dtype
    w2, b2 = affine_lstsq(lin, x, t)  # the default tiny ridge: the same fit to fp32 noise
    if rows > 9:
        torch.testing.assert_close(torch.cat([w2.T, b2[None]]).double(), want, rtol=1e-4, atol=1e-4)
    else:  # many exact solutions; the ridge does not shrink the bias, pinv does: same outputs
        torch.testing.assert_close(x @ w2.T + b2, t, rtol=1e-4, atol=1e-4)


def _patches_by_hand(x, k, stride, pad):
    """Rows (sample, out_y, out_x) of the flattened (c, ky, kx) patches, loops only."""
    xp = nn.functional.pad(x, (pad, pad, pad, pad))
    n, c, h, w = xp.shape
    rows = []
    for i in range(n):
        for y in range(0, h - k + 1, stride):
            for z in range(0, w - k + 1, stride):
                rows.append(xp[i, :, y : y + k, z : z + k].reshape(-1))
    return torch.stack(rows)


def test_conv_equals_pinv_of_hand_unfolded_patches():
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    x = torch.randn(4, 2, 7, 7, generator=_gen())
    with torch.no_grad():
        t = conv(x) + 0.1 * torch.randn(4, 3, 4, 4, generator=_gen(1))  # not exactly reachable
    w, b = affine_lstsq(conv, x, t, ridge=0)
    x1 = _with_ones(_patches_by_hand(x, 3, 2, 1).double())
    assert torch.equal(design_matrix(conv, x).double(), x1[:, :-1])
    want = torch.linalg.pinv(x1) @ t.permute(0, 2, 3, 1).reshape(-1, 3).double()
    torch.testing.assert_close(w.reshape(3, -1).T.double(), want[:-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.double(), want[-1], rtol=1e-5, atol=1e-5)


def test_reachable_targets_give_back_the_weights():
    conv = nn.Conv2d(3, 4, 3, padding=1, dilation=2, bias=False)
    x = torch.randn(5, 3, 8, 8, generator=_gen())
    with torch.no_grad():
        t = conv(x)
    w, b = affine_lstsq(conv, x, t)
    assert b is None
    torch.testing.assert_close(w, conv.weight, rtol=1e-4, atol=1e-5)
    lin = nn.Linear(5, 2)
    x3 = torch.randn(4, 6, 5, generator=_gen(2))  # B×T×d rows = sample × token
    with torch.no_grad():
        w, b = affine_lstsq(lin, x3, lin(x3))
    torch.testing.assert_close(w, lin.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b, lin.bias, rtol=1e-4, atol=1e-5)


def test_closed_form_errors():
    with pytest.raises(ValidationError, match="Linear or Conv2d"):
        affine_lstsq(nn.ReLU(), torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(ValidationError, match="ridge"):
        affine_lstsq(nn.Linear(2, 2), torch.ones(2, 2), torch.ones(2, 2), ridge=-1)
    with pytest.raises(ValidationError, match="rows"):
        affine_lstsq(nn.Linear(2, 2), torch.ones(3, 2), torch.ones(2, 2))


def _regression(n=200):
    x = torch.randn(n, 4, generator=_gen())
    true = nn.Linear(4, 2)
    with torch.no_grad():
        return x, true(x)


def test_gradient_fit_converges_and_leaves_the_module():
    x, t = _regression()
    torch.manual_seed(0)
    lin = nn.Linear(4, 2)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    state = fit_gradient(lin, x, t, epochs=60, patience=5, lr=3e-2)
    assert all(torch.equal(v, before[k]) for k, v in lin.state_dict().items())
    fitted = nn.Linear(4, 2)
    fitted.load_state_dict(state)
    with torch.no_grad():
        assert (fitted(x) - t).pow(2).mean() < 1e-3 < (lin(x) - t).pow(2).mean()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradient_fit_from_perturbed_weights_reaches_the_closed_form(kind):
    """Started away from an exactly reachable target, the fitter must arrive where the closed
    form does (a fitter that returns its start fails by orders of magnitude)."""
    g = _gen(3)
    torch.manual_seed(0)
    if kind == "linear":
        true, x = nn.Linear(6, 3), torch.randn(400, 6, generator=g)
    else:
        true, x = nn.Conv2d(2, 3, 3, padding=1), torch.randn(64, 2, 6, 6, generator=g)
    with torch.no_grad():
        t = true(x)
        start = copy.deepcopy(true)
        for p in start.parameters():
            p += 0.3 * torch.randn(p.shape, generator=g)
    w, b = affine_lstsq(start, x, t)  # the closed form: the true weights
    closed = copy.deepcopy(start)
    with torch.no_grad():
        closed.weight.copy_(w)
        closed.bias.copy_(b)
    fitted = copy.deepcopy(start)
    fitted.load_state_dict(fit_gradient(start, x, t, lr=1e-2, epochs=200, patience=15))
    with torch.no_grad():
        assert float((start(x) - t).abs().max()) > 1.0
        assert float((closed(x) - t).abs().max()) < 1e-4
        assert float((fitted(x) - closed(x)).abs().max()) < 1e-3
    torch.testing.assert_close(fitted.weight, w, rtol=0, atol=1e-3)


def test_gradient_fit_is_seeded():
    x, t = _regression(64)
    torch.manual_seed(0)
    lin = nn.Linear(4, 2)
    one = fit_gradient(lin, x, t, epochs=3, seed=5)
    two = fit_gradient(lin, x, t, epochs=3, seed=5)
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_a_level_at_its_target_does_not_move():
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    x = torch.randn(40, 4, generator=_gen())
    with torch.no_grad():
        t = head(x)
    for loss in ("mse", "kl"):
        state = fit_gradient(head, x, t, loss=loss, epochs=5, patience=2)
        assert all(torch.equal(v, head.state_dict()[k]) for k, v in state.items())


def test_kl_fit_matches_target_distribution():
    torch.manual_seed(0)
    x = torch.randn(64, 4, generator=_gen())
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    with torch.no_grad():
        t = teacher(x) * 2
    state = fit_gradient(student, x, t, loss="kl", epochs=40, patience=5, lr=5e-2)
    student.load_state_dict(state)
    with torch.no_grad():
        kl = nn.functional.kl_div(
            student(x).log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean"
        )
    assert float(kl) < 0.01


def test_importance_weights_steer_the_fit():
    x = torch.randn(100, 3, generator=_gen())
    t = torch.stack([x[:, 0] * 2, x[:, 0] * x[:, 1]], 1)  # neuron 1 unreachable by a line
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    errs = []
    for w in (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])):
        fitted = nn.Linear(3, 2)
        fitted.load_state_dict(fit_gradient(lin, x, t, weights=w, epochs=40, lr=3e-2))
        with torch.no_grad():
            errs.append((fitted(x)[:, 0] - t[:, 0]).pow(2).mean())
    assert errs[0] < 0.01 * errs[1]  # weight 0 on neuron 0: left near where it started


def test_gradient_fit_errors():
    with pytest.raises(ValidationError, match="loss"):
        fit_gradient(nn.Linear(2, 2), torch.ones(4, 2), torch.ones(4, 2), loss="l1")
    with pytest.raises(ValidationError, match="targets"):
        fit_gradient(nn.Linear(2, 2), torch.ones(4, 2), torch.ones(3, 2))
