"""ZipIt!: a permuted copy zips back to the original's function, the fused layers are exactly
Σ_k M_k W_k U_kᵀ from zip_greedy's matrices, three parents work, parents are not touched."""

from __future__ import annotations

import pytest
import torch
from tests.fusion._models import (
    BUILDERS,
    build,
    fusion_data,
    mix_flags,
    permuted_copy,
    same_function,
)
from torch import nn

import mergeforge.fusion.zipit  # noqa: F401  (registers the method)
from mergeforge.errors import ConfigError
from mergeforge.fusion.base import FusionData, fuse, get_method
from mergeforge.fusion.match import cross_correlation, zip_greedy


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_permuted_copy_zips_back(arch):
    a = build(arch, 0)
    b = permuted_copy(a, arch, 1)
    before = [{k: v.clone() for k, v in p.state_dict().items()} for p in (a, b)]
    flags = [mix_flags(p) for p in (a, b)]
    # every cross pair correlates exactly 1, above any within-model pair: an exact zip
    same_function(fuse([a, b], fusion_data(), "zipit"), a, arch)
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
    parents = [build("resnet", s) for s in range(3)]
    out = fuse(parents, fusion_data(), "zipit")
    ref = parents[0].state_dict()
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize(("values", "match"), [({"alpha": 2.0}, "alpha"), ({"beta": -1}, "beta")])
def test_bad_params(values, match):
    with pytest.raises(ConfigError, match=match):
        get_method("zipit").make_params(values)
