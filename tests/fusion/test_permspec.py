"""Permutation specs: every group of every arch is a true symmetry (permuting leaves outputs
unchanged), apply_transforms' rule reproduces ½(θ_A + π(θ_B)), and bad specs name the fix."""

from __future__ import annotations

import pytest
import torch
from tests.fusion._models import build, builders, random_perms
from torch import nn

from mergeforge.errors import ValidationError
from mergeforge.fusion.infer import infer_spec
from mergeforge.fusion.permspec import (
    PermutationSpec,
    apply_transforms,
    features,
    perm_matrix,
    permute,
    spec_for,
)

BUILDERS = builders(
    chain=lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 10),
        nn.ReLU(),
        nn.Linear(10, 3),
    )
)


def _build(arch: str, seed: int) -> nn.Module:
    model = build(arch, seed, BUILDERS)
    with torch.no_grad():  # a non-zero CLS token, so its permutation is exercised too
        for name, p in model.named_parameters():
            if name.endswith("cls"):
                p.normal_()
    return model


def _inputs(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_every_group_is_a_symmetry(arch):
    model = _build(arch, 0)
    spec = spec_for(model)
    perms = random_perms(spec, model, 1)
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    other = _build(arch, 0)
    other.load_state_dict(permute(model.state_dict(), spec, perms))
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(other(x), model(x), atol=1e-5)
        assert not torch.allclose(
            other.state_dict()[next(iter(spec.axes))], model.state_dict()[next(iter(spec.axes))]
        )


@pytest.mark.parametrize("arch", ["mlp", "resnet", "vit"])
def test_permutation_transforms_give_the_aligned_mean(arch):
    a, b = _build(arch, 0), _build(arch, 1)
    spec = spec_for(a)
    perms = random_perms(spec, a, 2)
    sa, sb = a.state_dict(), b.state_dict()
    before = {k: v.clone() for k, v in sb.items()}
    merge = {g: [torch.eye(len(p)) / 2, perm_matrix(p) / 2] for g, p in perms.items()}
    unmerge = {g: [torch.eye(len(p)), perm_matrix(p).T] for g, p in perms.items()}
    fused = apply_transforms([sa, sb], spec, merge, unmerge)
    pb = permute(sb, spec, perms)
    for key in sa:
        assert torch.allclose(fused[key], (sa[key] + pb[key]) / 2, atol=1e-6), key
        assert fused[key].dtype == sa[key].dtype
        assert torch.equal(sb[key], before[key])


def test_features_shapes_and_mode_restored():
    model = _build("resnet", 0).train()
    spec = spec_for(model)
    feats = features(model, spec, _inputs(5), batch_size=2)
    assert model.training
    widths = spec.widths(model)
    assert set(feats) == set(widths)
    for g, f in feats.items():
        assert f.shape[1] == widths[g] and f.dtype == torch.float32
    assert feats["res1"].shape[0] == 2 * 5 * 14 * 14  # stem and block1 outputs, 14×14 maps
    assert feats["res3"].shape[0] == 5 * 4 * 4


def test_vit_features_are_tokens():
    model = _build("vit", 0)
    feats = features(model, spec_for(model), _inputs(3))
    assert feats["res"].shape == (3 * 3 * 17, 16)  # 3 points × 3 samples × 17 tokens
    assert feats["blocks.0.mlp"].shape == (3 * 17, 12)


def test_inferred_chain_spec():
    spec = infer_spec(_build("chain", 0))
    assert spec.axes["7.weight"] == ("7", ("3", 4))
    assert spec.axes["9.weight"] == (None, "7")
    assert spec.points == {"0": (("2", 1),), "3": (("5", 1),), "7": (("8", -1),)}


class _Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(x) + x)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (_Skip(), "single chain"),
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)), "LayerNorm"),
        (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1)), "grouped"),
    ],
)
def test_infer_spec_refuses_non_chains_with_howto(model, match):
    with pytest.raises(ValidationError, match=match) as err:
        spec_for(model)
    assert "permutation_spec()" in str(err.value)


def test_spec_validation_names_parameter_and_group():
    model = _build("mlp", 0)
    raw = model.permutation_spec()
    bad_width = dict(raw["axes"], **{"head.weight": (None, "fc1")})
    with pytest.raises(ValidationError, match="group 'fc1'.*'head.weight'"):
        PermutationSpec(axes=bad_width).widths(model)
    missing = {k: v for k, v in raw["axes"].items() if k != "head.bias"}
    with pytest.raises(ValidationError, match="head.bias"):
        PermutationSpec(axes=missing).widths(model)
    with pytest.raises(ValidationError, match="'nope'"):
        PermutationSpec(axes=raw["axes"], points={"nope": (("fc1", -1),)})
    with pytest.raises(ValidationError, match="axis entry"):
        PermutationSpec(axes={"head.weight": (None, 3)})
    with pytest.raises(ValidationError, match="no observation points"):
        features(model, PermutationSpec(axes=raw["axes"]), _inputs(2))


def test_apply_transforms_and_own_spec_errors():
    model = _build("mlp", 0)
    spec = spec_for(model)
    sd = model.state_dict()
    eye = {g: torch.eye(w) for g, w in spec.widths(model).items()}
    merge = {g: [e / 2, e / 2] for g, e in eye.items()}
    with pytest.raises(ValidationError, match="unmerge needs 2 matrices for group 'fc1'"):
        apply_transforms([sd, sd], spec, merge, {})
    bad = dict(merge, fc2=[torch.eye(3), torch.eye(3)])
    with pytest.raises(ValidationError, match="group 'fc2', parent 0"):
        apply_transforms([sd, sd], spec, bad, {g: [e, e] for g, e in eye.items()})

    class Odd(nn.Linear):
        def permutation_spec(self):
            return {"axes": {}, "groups": ()}

    with pytest.raises(ValidationError, match="Odd.permutation_spec().*unexpected keyword"):
        spec_for(Odd(2, 2))
