"""ZipIt!: a permuted copy zips back to the original's function, the fused layers are exactly
Σ_k M_k W_k U_kᵀ from zip_greedy's matrices, three parents work, parents are not touched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mergeforge.fusion.zipit  # noqa: F401  (registers the method)
from mergeforge.errors import ConfigError
from mergeforge.evaluate.vision.models import MLP, ResNetSmall, VGGSmall, ViTSmall
from mergeforge.fusion.base import FusionData, fuse, get_method
from mergeforge.fusion.match import cross_correlation, zip_greedy
from mergeforge.fusion.permspec import permute, spec_for

BUILDERS = {
    "mlp": lambda: MLP(hidden=(12, 10)),
    "vgg": lambda: VGGSmall(widths=(4, 6, 8)),
    "resnet": lambda: ResNetSmall(widths=(4, 6, 8)),
    "vit": lambda: ViTSmall(dim=16, depth=2, heads=2, mlp_dim=12),
    "chain": lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(4 * 7 * 7, 10),
        nn.ReLU(),
        nn.Linear(10, 3),
    ),
}


def _build(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[arch]().eval()


def _permuted_copy(model: nn.Module, arch: str, seed: int) -> nn.Module:
    spec = spec_for(model)
    g = torch.Generator().manual_seed(seed)
    perms = {grp: torch.randperm(w, generator=g) for grp, w in spec.widths(model).items()}
    other = _build(arch, 99)
    other.load_state_dict(permute(model.state_dict(), spec, perms))
    return other


def _data(n: int = 24, seed: int = 5) -> FusionData:
    return FusionData(
        inputs=torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    )


def _mix_flags(model: nn.Module) -> list[bool]:
    """One affine leaf in training mode under an eval-mode model; returns every module's flag.
    A method that restores only the top-level flag (``model.train(was)``) resets the leaf."""
    leaf = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    leaf.train()
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_permuted_copy_zips_back(arch):
    a = _build(arch, 0)
    b = _permuted_copy(a, arch, 1)
    before = [{k: v.clone() for k, v in p.state_dict().items()} for p in (a, b)]
    flags = [_mix_flags(p) for p in (a, b)]
    fused = _build(arch, 123)
    fused.load_state_dict(fuse([a, b], _data(), "zipit"))
    x = _data(8, seed=11).inputs
    with torch.no_grad():
        # every cross pair correlates exactly 1, above any within-model pair: an exact zip
        assert torch.allclose(fused(x), a(x), atol=1e-5)
    for p, ref, fl in zip((a, b), before, flags, strict=True):
        assert all(torch.equal(p.state_dict()[k], v) for k, v in ref.items())
        assert [m.training for m in p.modules()] == fl  # every module's own train/eval flag


def test_fused_layers_are_the_merge_unmerge_products():
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)) for _ in range(2))
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    out = fuse([a, b], FusionData(inputs=x), "zipit", {"beta": 0.5, "alpha": 0.5})
    with torch.no_grad():
        h = torch.cat([torch.relu(a[0](x)), torch.relu(b[0](x))], 1)  # the point: the ReLU
    m, u = zip_greedy(cross_correlation(h, h), [5, 5], alpha=0.5, beta=0.5)
    sa, sb = a.state_dict(), b.state_dict()
    w1 = m @ torch.cat([sa["0.weight"], sb["0.weight"]])
    b1 = m @ torch.cat([sa["0.bias"], sb["0.bias"]])
    w2 = torch.cat([sa["2.weight"], sb["2.weight"]], 1) @ u / 2  # head: no merge axis, mean
    assert torch.allclose(out["0.weight"], w1, atol=1e-6)
    assert torch.allclose(out["0.bias"], b1, atol=1e-6)
    assert torch.allclose(out["2.weight"], w2, atol=1e-6)
    assert torch.allclose(out["2.bias"], (sa["2.bias"] + sb["2.bias"]) / 2)


def test_three_parents_keep_shapes():
    parents = [_build("resnet", s) for s in range(3)]
    out = fuse(parents, _data(), "zipit")
    ref = parents[0].state_dict()
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize(("values", "match"), [({"alpha": 2.0}, "alpha"), ({"beta": -1}, "beta")])
def test_bad_params(values, match):
    with pytest.raises(ConfigError, match=match):
        get_method("zipit").make_params(values)
