"""Last-layer KD: parent 0's body, a head distilled to the (class-weighted) ensemble."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import mergeforge.fusion.kd  # noqa: F401  (registers last_layer_kd)
from mergeforge.errors import ConfigError
from mergeforge.evaluate.vision.models import MLP, ResNetSmall
from mergeforge.fusion.base import FusionData, fuse
from mergeforge.fusion.kd import ensemble_log_probs


def _x(n, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _kl_to(model, target_log_probs, x):
    with torch.no_grad():
        return float(
            F.kl_div(
                model(x).log_softmax(-1), target_log_probs, log_target=True, reduction="batchmean"
            )
        )


def test_one_parent_is_given_back():
    torch.manual_seed(0)
    m = ResNetSmall(widths=(3, 4, 4)).eval()
    out = fuse([m], FusionData(_x(20)), "last_layer_kd", {"epochs": 3, "patience": 1})
    assert all(torch.equal(out[k], v) for k, v in m.state_dict().items())


def test_body_is_parent_zero_and_head_moves_to_the_ensemble():
    torch.manual_seed(0)
    parents = [MLP(hidden=(12, 8)).eval() for _ in range(2)]
    before = [copy.deepcopy(p.state_dict()) for p in parents]
    x = _x(160)
    out = fuse(parents, FusionData(x), "last_layer_kd", {"epochs": 30, "lr": 3e-2, "patience": 5})
    assert all(
        torch.equal(out[k], v) for k, v in parents[0].state_dict().items() if "head" not in k
    )
    assert not torch.equal(out["head.weight"], parents[0].state_dict()["head.weight"])
    fused = MLP(hidden=(12, 8)).eval()
    fused.load_state_dict(out)
    with torch.no_grad():
        target = ensemble_log_probs([p(x) for p in parents], None)
    assert _kl_to(fused, target, x) < 0.5 * _kl_to(parents[0], target, x)
    for p, sd in zip(parents, before, strict=True):
        assert all(torch.equal(v, sd[k]) for k, v in p.state_dict().items())


def test_ensemble_is_class_fraction_weighted():
    z0, z1 = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 3.0]])
    p0, p1 = z0.softmax(-1), z1.softmax(-1)
    torch.testing.assert_close(ensemble_log_probs([z0, z1], None).exp().float(), (p0 + p1) / 2)
    frac = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]])  # class 0 from parent 0, 2 from 1
    want = torch.stack([p0[0, 0], (p0[0, 1] + p1[0, 1]) / 2, p1[0, 2]])
    got = ensemble_log_probs([z0, z1], frac).exp()[0].float()
    torch.testing.assert_close(got, want / want.sum())


def test_params_are_checked():
    torch.manual_seed(0)
    m = MLP(hidden=(4, 4))
    with pytest.raises(ConfigError, match="lr must be > 0"):
        fuse([m], FusionData(_x(4)), "last_layer_kd", {"lr": 0})
