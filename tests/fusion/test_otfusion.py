"""OT-Fusion: a permuted copy is transported back exactly (both modes, every arch), the fused
layer equals a hand-built ½(W_A + Q W_B) with Q from ot.emd, uniform marginals are the unweighted
form, K = 3 works, parents are not touched."""

from __future__ import annotations

import ot
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

import mergeforge.fusion.otfusion  # noqa: F401  (registers the method)
from mergeforge.errors import ConfigError, ValidationError
from mergeforge.fusion.base import fuse, get_method
from mergeforge.fusion.otfusion import (
    OTFusionParams,
    importance_marginals,
    ot_fusion_state,
    transport_map,
)
from mergeforge.fusion.permspec import spec_for


@pytest.mark.parametrize("mode", ["activation", "weight"])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_permuted_copy_is_fused_back(mode, arch):
    a = build(arch, 0)
    b = permuted_copy(a, arch, 1)
    before = [{k: v.clone() for k, v in p.state_dict().items()} for p in (a, b)]
    flags = [mix_flags(p) for p in (a, b)]
    same_function(fuse([a, b], fusion_data(), "ot_fusion", {"mode": mode}), a, arch)
    for p, ref, fl in zip((a, b), before, flags, strict=True):
        assert all(torch.equal(p.state_dict()[k], v) for k, v in ref.items())
        assert [m.training for m in p.modules()] == fl  # every module's own train/eval flag


@pytest.mark.parametrize("mode", ["activation", "weight"])
def test_three_parents(mode):
    a = build("resnet", 0)
    copies = [permuted_copy(a, "resnet", s) for s in (1, 2)]
    same_function(fuse([a, *copies], fusion_data(), "ot_fusion", {"mode": mode}), a, "resnet")
    out = fuse([build("vgg", s) for s in range(3)], fusion_data(), "ot_fusion", {"mode": mode})
    assert all(torch.isfinite(v).all() for v in out.values())


def test_weight_mode_equals_the_hand_built_transport():
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)) for _ in range(2))
    out = fuse([a, b], fusion_data(4), "ot_fusion", {"mode": "weight"})
    sa, sb = ({k: v.double() for k, v in m.state_dict().items()} for m in (a, b))
    rows = [torch.cat([s["0.weight"], s["0.bias"][:, None]], 1) for s in (sb, sa)]
    plan = ot.emd(torch.full((5,), 0.2).double(), torch.full((5,), 0.2).double(),
                  torch.cdist(*rows))  # fmt: skip
    q = 5.0 * torch.as_tensor(plan).T  # diag(1/ν) Tᵀ with ν = 1/5
    assert torch.allclose(out["0.weight"].double(), (sa["0.weight"] + q @ sb["0.weight"]) / 2)
    assert torch.allclose(out["0.bias"].double(), (sa["0.bias"] + q @ sb["0.bias"]) / 2)
    assert torch.allclose(out["2.weight"].double(), (sa["2.weight"] + sb["2.weight"] @ q.T) / 2)
    assert torch.allclose(out["2.bias"].double(), (sa["2.bias"] + sb["2.bias"]) / 2)
    assert not torch.allclose(q, torch.eye(5, dtype=torch.float64))  # a real re-ordering


@pytest.mark.parametrize("mode", ["activation", "weight"])
def test_uniform_marginals_are_the_unweighted_form(mode):
    parents = [build("resnet", s) for s in (0, 1)]
    params = OTFusionParams(mode=mode)
    widths = spec_for(parents[0]).widths(parents[0])
    ones = {g: [torch.full((w,), 3.0), torch.ones(w)] for g, w in widths.items()}
    plain = ot_fusion_state(parents, fusion_data(), params)
    weighted = ot_fusion_state(parents, fusion_data(), params, marginals=ones)
    assert all(torch.allclose(plain[k], weighted[k], atol=1e-6) for k in plain)
    skew = {"res1": [torch.arange(1.0, 5.0), torch.ones(4)]}
    other = ot_fusion_state(parents, fusion_data(), params, marginals=skew)
    assert not torch.allclose(other["stem.0.weight"], plain["stem.0.weight"])


def test_transport_map_rows_are_convex_combinations():
    cost = torch.rand(4, 6, generator=torch.Generator().manual_seed(0))
    q = transport_map(cost, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert q.shape == (6, 4) and torch.allclose(q.sum(1), torch.ones(6, dtype=torch.float64))
    perm = torch.tensor([2, 0, 1])
    assert torch.allclose(transport_map(1 - torch.eye(3)[:, perm]), torch.eye(3)[perm].double())


def test_bad_marginals_and_params():
    parents = [build("mlp", s) for s in (0, 1)]
    params = OTFusionParams()
    with pytest.raises(ValidationError, match="group 'nope'"):
        ot_fusion_state(parents, fusion_data(), params, marginals={"nope": [torch.ones(3)] * 2})
    with pytest.raises(ValidationError, match="parent 1's marginal for group 'fc1'"):
        ot_fusion_state(
            parents, fusion_data(), params, marginals={"fc1": [torch.ones(12), -torch.ones(12)]}
        )
    with pytest.raises(ConfigError, match="mode"):
        get_method("ot_fusion").make_params({"mode": "sinkhorn"})


def test_weighted_marginals_give_a_soft_normalised_transport():
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)) for _ in range(2))
    nu, mu = torch.tensor([1.0, 1, 1, 1, 4]), torch.tensor([2.0, 1, 1, 3, 1])
    out = ot_fusion_state(
        [a, b], fusion_data(4), OTFusionParams(mode="weight"), marginals={"0": [nu, mu]}
    )
    sa, sb = ({k: v.double() for k, v in m.state_dict().items()} for m in (a, b))
    rows = [torch.cat([s["0.weight"], s["0.bias"][:, None]], 1) for s in (sb, sa)]
    nu_n, mu_n = (nu / nu.sum()).double(), (mu / mu.sum()).double()
    plan = torch.as_tensor(ot.emd(mu_n.numpy(), nu_n.numpy(), torch.cdist(*rows).numpy()))
    q = plan.T / nu_n[:, None]
    assert (q > 0).sum() > 5  # a soft transport, not a permutation
    assert torch.allclose(out["0.weight"].double(), (sa["0.weight"] + q @ sb["0.weight"]) / 2)
    assert torch.allclose(out["2.weight"].double(), (sa["2.weight"] + sb["2.weight"] @ q.T) / 2)


# ---- importance marginals (the OT-Fusion {uniform, conductance, DeepLIFT} rows) -------


def test_uniform_importance_is_the_current_result_exactly():
    parents = [build("resnet", s) for s in (0, 1)]
    plain = ot_fusion_state(parents, fusion_data(), OTFusionParams())
    via = fuse(parents, fusion_data(), "ot_fusion", {"importance": "uniform"})
    assert importance_marginals(parents, fusion_data(), OTFusionParams()) == {}
    assert all(torch.equal(plain[k], via[k]) for k in plain)


@pytest.mark.parametrize(
    ("arch", "importance"),
    [("resnet", "conductance"), ("vit", "deeplift"), ("vgg", "deeplift"), ("mlp", "ablation")],
)
def test_importance_marginals_still_fuse_a_permuted_copy_back(arch, importance):
    # importances are permutation-equivariant: parent B's marginal is parent A's, permuted, so
    # the zero-cost permutation is still a feasible (and optimal) plan
    a = build(arch, 0)
    b = permuted_copy(a, arch, 1)
    params = {"importance": importance, "conductance_steps": 2}
    data = fusion_data()  # fewer rows leave VGG's fc units dead on all of them: ties, not a bug
    flags = [mix_flags(p) for p in (a, b)]
    marg = importance_marginals([a, b], data, OTFusionParams(**params))
    assert [[m.training for m in p.modules()] for p in (a, b)] == flags
    assert set(marg) == set(spec_for(a).groups)
    assert any(not torch.allclose(m[0], m[0].mean().expand_as(m[0])) for m in marg.values())
    same_function(fuse([a, b], data, "ot_fusion", params), a, arch)


def test_stream_importance_is_the_mean_over_its_points():
    from mergeforge.fusion.importance import neuron_importance

    parents = [build("resnet", s) for s in (0, 1)]
    data = fusion_data(6)
    marg = importance_marginals(parents, data, OTFusionParams(importance="ablation"))
    x = data.inputs
    for k, m in enumerate(parents):
        per_point = [
            neuron_importance(m, m.get_submodule(n), x, method="ablation", dim=1)
            for n in ("stem", "block1")
        ]
        assert torch.allclose(marg["res1"][k], (per_point[0] + per_point[1]) / 2)
        assert abs(float(marg["res1"][k].sum()) - 1) < 1e-12


def test_importance_marginals_change_the_plan_as_ot_emd_says():
    from mergeforge.fusion.importance import neuron_importance

    torch.manual_seed(0)
    a, b = (
        nn.Sequential(nn.Flatten(), nn.Linear(784, 5), nn.ReLU(), nn.Linear(5, 3)) for _ in "ab"
    )
    data = fusion_data(16)
    out = fuse([a, b], data, "ot_fusion", {"mode": "weight", "importance": "ablation"})
    nu, mu = (
        neuron_importance(m, m[2], data.inputs, method="ablation", dim=-1) for m in (a, b)
    )  # the hidden group "1" is observed after its ReLU, module "2"
    assert not torch.allclose(nu, torch.full_like(nu, 0.2), atol=0.02)  # truly non-uniform
    sa, sb = ({k: v.double() for k, v in m.state_dict().items()} for m in (a, b))
    rows = [torch.cat([s["1.weight"], s["1.bias"][:, None]], 1) for s in (sb, sa)]
    plan = torch.as_tensor(ot.emd(mu.numpy(), nu.numpy(), torch.cdist(*rows).numpy()))
    q = plan.T / nu[:, None]
    uniform = 5.0 * torch.as_tensor(ot.emd(torch.full((5,), 0.2).double().numpy(),
                                           torch.full((5,), 0.2).double().numpy(),
                                           torch.cdist(*rows).numpy())).T  # fmt: skip
    assert not torch.allclose(q, uniform)  # the marginals moved the plan
    assert torch.allclose(out["1.weight"].double(), (sa["1.weight"] + q @ sb["1.weight"]) / 2)
    assert torch.allclose(out["1.bias"].double(), (sa["1.bias"] + q @ sb["1.bias"]) / 2)
    assert torch.allclose(out["3.weight"].double(), (sa["3.weight"] + sb["3.weight"] @ q.T) / 2)


def test_bad_importance_is_refused():
    with pytest.raises(ConfigError, match="importance"):
        get_method("ot_fusion").make_params({"importance": "shapley"})
