"""The neuron-centric methods (hf, kf, kf_gradient) and last_layer_kd make every tensor on the
device of their inputs, never on torch's default device (a CPU tensor next to CUDA activations
is an error on a GPU).

Without a GPU the same mistake is provoked on the CPU: the inputs are CPU tensors and torch's
default device is ``meta`` while the pieces run, so a tensor made without ``device=`` lands on
``meta`` and mixing it with the inputs raises, as a CPU tensor next to CUDA inputs would. The
CUDA test runs the whole methods on a GPU when there is one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mergeforge.evaluate.vision.models import MLP, VGGSmall
from mergeforge.fusion.base import FusionData, fuse
from mergeforge.fusion.cluster import (
    group_targets,
    head_targets,
    hf_grouping,
    kf_grouping,
    weighted_kmeans,
)
from mergeforge.fusion.fit import affine_lstsq
from mergeforge.fusion.importance import neuron_importance
from mergeforge.fusion.kd import ensemble_log_probs

METHODS = ["hf", "kf", "kf_gradient", "last_layer_kd"]
FAST = {
    "hf": {"epochs": 1, "head_epochs": 1, "patience": 1, "fit": "gradient"},
    "kf": {},
    "kf_gradient": {"epochs": 1, "head_epochs": 1, "patience": 1},
    "last_layer_kd": {"epochs": 1, "patience": 1},
}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _mats(k=2, rows=30, width=6, dtype=torch.float64):
    return [torch.randn(rows, width, generator=_gen(i)).to(dtype) for i in range(k)]


def _data(n=48, k=2):
    g = _gen(3)
    return FusionData(
        inputs=torch.randn(n, 1, 28, 28, generator=g),
        labels=torch.randint(0, 10, (n,), generator=g),
        class_fractions=torch.rand(k, 10, generator=g),
    )


def _parents(k=2):
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(MLP(hidden=(8, 6)).eval())
    return out


def test_the_pieces_make_nothing_on_the_default_device():
    lin = nn.Linear(5, 3).double()
    x, t = torch.randn(40, 5, generator=_gen()).double(), torch.randn(40, 3, generator=_gen(1))
    conv = nn.Conv2d(2, 3, 3, padding=1)
    xc = torch.randn(4, 2, 6, 6, generator=_gen(2))
    mats = _mats()
    scores = [torch.full((6,), 1 / 6, dtype=torch.float64) for _ in mats]
    logits = [m[:, :4] for m in mats]
    fractions = torch.rand(2, 4, generator=_gen(4))
    with torch.device("meta"):  # what the pieces make without device= lands here
        w, b = affine_lstsq(lin, x, t)
        wc, bc = affine_lstsq(conv, xc, conv(xc).detach())
        centres, assign = weighted_kmeans(torch.cat([m.T for m in mats]), None, 6, seed=0)
        groups = {"kf": kf_grouping(mats, scores, seed=0), "hf": hf_grouping(mats, scores)}
        targets = {name: group_targets(mats, a, scores) for name, a in groups.items()}
        heads = [head_targets(logits, None), head_targets(logits, fractions)]
        kd = ensemble_log_probs(logits, fractions)
        uniform = neuron_importance(lin, lin, x, method="uniform", width=3)
    made = [w, b, wc, bc, centres, assign, *heads, kd, uniform]
    made += [a for grouping in groups.values() for a in grouping]
    made += [t for pair in targets.values() for t in pair]
    assert all(t.device.type == "cpu" for t in made)


@pytest.mark.parametrize("method", METHODS)
def test_whole_methods_make_nothing_on_the_default_device(method):
    parents, data = _parents(), _data()
    want = fuse(parents, data, method, FAST[method])
    with torch.device("meta"):
        got = fuse(parents, data, method, FAST[method])
    assert all(got[k].device.type == "cpu" for k in want)
    assert all(torch.equal(got[k], want[k]) for k in want)  # and the same result


def test_float64_inputs_give_float64_targets():
    mats = _mats()
    scores = [torch.full((6,), 1 / 6, dtype=torch.float64) for _ in mats]
    target, slot_w = group_targets(mats, kf_grouping(mats, scores), scores)
    assert target.dtype == slot_w.dtype == torch.float64
    assert head_targets([m.float() for m in mats], None).dtype == torch.float64
    lin = nn.Linear(6, 2).double()
    w, b = affine_lstsq(lin, mats[0], mats[1][:, :2])
    assert w.dtype == b.dtype == torch.float64  # the module's dtype, solved in float64
    x1 = torch.cat([mats[0], torch.ones(30, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(x1, mats[1][:, :2]).solution
    torch.testing.assert_close(torch.cat([w.T, b[None]]), sol, rtol=1e-8, atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", METHODS)
def test_methods_run_on_a_gpu(method):
    """Parents on the GPU, the fusion set (labels, class fractions) left on the CPU."""
    cpu = fuse(_parents(), _data(), method, FAST[method])
    gpu = fuse([p.cuda() for p in _parents()], _data(), method, FAST[method])
    assert gpu.keys() == cpu.keys()
    assert all(t.is_cuda and t.shape == cpu[k].shape for k, t in gpu.items())
    assert all(bool(torch.isfinite(t).all()) for t in gpu.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pieces_run_on_a_gpu():
    mats = [m.cuda() for m in _mats()]
    scores = [torch.full((6,), 1 / 6, dtype=torch.float64) for _ in mats]  # CPU scores
    for grouping in (kf_grouping(mats, scores), hf_grouping(mats, scores)):
        target, slot_w = group_targets(mats, grouping, scores)
        assert target.is_cuda and slot_w.is_cuda
    assert head_targets([m[:, :4] for m in mats], torch.rand(2, 4)).is_cuda
    conv = VGGSmall(widths=(3, 4, 5)).block1[0].cuda()
    x = torch.randn(4, 1, 28, 28, device="cuda")
    w, b = affine_lstsq(conv, x, conv(x).detach())
    assert w.is_cuda and b.is_cuda
