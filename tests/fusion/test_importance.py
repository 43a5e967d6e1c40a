"""Neuron importance: normalisation, hand-computed oracles on an MLP's last hidden level, and
Captum's methods running on every vision architecture's levels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mergeforge.errors import ConfigError
from mergeforge.evaluate.vision.models import MLP, ResNetSmall, VGGSmall, ViTSmall
from mergeforge.fusion.importance import FLOOR, neuron_importance, normalise
from mergeforge.fusion.levels import channel_dim, levels_of, run_level


def _x(n=8, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _mlp():
    torch.manual_seed(0)
    return MLP(hidden=(8, 6)).eval()


def test_uniform_is_uniform_and_sums_to_one():
    s = neuron_importance(_mlp(), None, _x(), method="uniform", width=5)
    assert torch.equal(s, torch.full((5,), 0.2, dtype=torch.float64))
    with pytest.raises(ConfigError, match="width"):
        neuron_importance(_mlp(), None, _x(), method="uniform")
    with pytest.raises(ConfigError, match="unknown neuron importance 'shap'"):
        neuron_importance(_mlp(), None, _x(), method="shap")


def test_normalise_floors_and_falls_back():
    s = normalise(torch.tensor([0.0, 1.0, 3.0]))
    assert float(s.sum()) == pytest.approx(1.0) and float(s[0]) > 0
    torch.testing.assert_close(s[1:] / s[1:].sum(), torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert float(s[0]) == pytest.approx(FLOOR / 3, rel=1e-6)
    torch.testing.assert_close(normalise(torch.zeros(4)), torch.full((4,), 0.25).double())


def _linear_head_oracle(model, x, y):
    """Before a linear head, DeepLift and Conductance of neuron j for class y are exactly
    W[y, j]·(h_j(x) − h_j(0)) (the head's gradient is constant along the path)."""
    with torch.no_grad():
        h, h0 = model.fc2(model.fc1(x)), model.fc2(model.fc1(torch.zeros_like(x[:1])))
        attr = (h - h0) * model.head.weight[y]
    s = attr.abs().double().sum(0)
    return s / s.sum()


def _ablation_oracle(model, x, y):
    """Zero neuron j of fc2's output by hand; the drop of the target logit, mean |·|."""
    with torch.no_grad():
        h = model.fc2(model.fc1(x))
        base = model.head(h).gather(1, y[:, None])[:, 0]
        drops = []
        for j in range(h.shape[1]):
            hj = h.clone()
            hj[:, j] = 0
            drops.append((base - model.head(hj).gather(1, y[:, None])[:, 0]).abs().sum())
    s = torch.stack(drops).double()
    return s / s.sum()


@pytest.mark.parametrize("method", ["deeplift", "conductance", "ablation"])
def test_attributions_match_hand_computation(method):
    m, x = _mlp(), _x(10)
    y = torch.arange(10) % 10
    s = neuron_importance(m, m.fc2, x, method=method, labels=y, batch_size=4, n_steps=5)
    want = (_ablation_oracle if method == "ablation" else _linear_head_oracle)(m, x, y)
    torch.testing.assert_close(s, normalise(want), rtol=1e-4, atol=1e-6)


def test_without_labels_the_prediction_is_the_target():
    m, x = _mlp(), _x(6)
    with torch.no_grad():
        pred = m(x).argmax(-1)
    a = neuron_importance(m, m.fc2, x, method="deeplift")
    b = neuron_importance(m, m.fc2, x, method="deeplift", labels=pred)
    torch.testing.assert_close(a, b)


ARCHS = {
    "mlp": lambda: MLP(hidden=(6, 5)),
    "vgg": lambda: VGGSmall(widths=(3, 4, 5)),
    "resnet": lambda: ResNetSmall(widths=(3, 4, 5)),  # F.relu: DeepLift falls back to gradients
    "vit": lambda: ViTSmall(dim=8, depth=1, heads=2, mlp_dim=8),
}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", ["conductance", "deeplift", "ablation"])
def test_captum_methods_run_on_every_level(arch, method):
    torch.manual_seed(0)
    m, x = ARCHS[arch](), _x(4)
    m.train()  # the flags are restored, each module's own
    next(c for c in m.modules() if isinstance(c, (nn.Linear, nn.Conv2d))).eval()
    flags = [c.training for c in m.modules()]
    spec = levels_of(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for i, lv in enumerate(spec.levels[:-1]):
        out = run_level(m, spec, x, i)
        s = neuron_importance(m, spec.module(m, i), x, method=method, batch_size=2, n_steps=3)
        assert s.shape == (out.shape[channel_dim(out.ndim)],), lv.name
        assert s.dtype == torch.float64 and bool((s > 0).all()), lv.name
        assert float(s.sum()) == pytest.approx(1.0)
    assert [c.training for c in m.modules()] == flags
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert all(not mod._forward_hooks and not mod._backward_hooks for mod in m.modules())
