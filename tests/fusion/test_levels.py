"""Levels: the vision models as chains, kinds, residual streams, prefixes, and the errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mergeforge.errors import ValidationError
from mergeforge.evaluate.vision.models import MLP, ResNetSmall, VGGSmall, ViTSmall
from mergeforge.fusion.levels import (
    from_neuron_matrix,
    levels_of,
    neuron_matrix,
    run_level,
    run_prefix,
)

SMALL = {
    "mlp": lambda: MLP(hidden=(8, 6)),
    "vgg": lambda: VGGSmall(widths=(3, 4, 5)),
    "resnet": lambda: ResNetSmall(widths=(3, 4, 5)),
    "vit": lambda: ViTSmall(dim=8, depth=2, heads=2, mlp_dim=8),
}


def _x(n=6, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _model(arch, seed=0):
    torch.manual_seed(seed)
    return SMALL[arch]().eval()


def test_kinds_and_streams_of_the_vision_models():
    got = {}
    for arch in SMALL:
        spec = levels_of(_model(arch), sample=_x())
        got[arch] = [(lv.name, lv.kind, lv.stream_of) for lv in spec.levels]
    assert got["mlp"] == [("fc1", "affine", None), ("fc2", "affine", None), ("head", "head", None)]
    assert got["vgg"][:4] == [(b, "affine", None) for b in ("block1", "block2", "block3", "fc")]
    assert got["resnet"] == [
        ("stem", "affine", None),
        ("block1", "general", "stem"),  # identity shortcut: carries the stem's channels
        ("block2", "general", None),  # 1×1 conv shortcut: a new stream
        ("block3", "general", None),
        ("head", "head", None),
    ]
    assert got["vit"] == [
        ("patch_embed", "general", None),
        ("blocks.0", "general", "patch_embed"),
        ("blocks.1", "general", "patch_embed"),  # a stream of a stream: its root
        ("head", "head", None),
    ]


def test_affine_parts_split_pre_and_post_ops():
    m = _model("resnet")
    spec = levels_of(m)
    pre, aff, post = spec.parts(m, 4)  # head = pool, flatten, Linear
    assert [type(p) for p in pre] == [nn.AdaptiveAvgPool2d, nn.Flatten] and post == []
    assert aff is m.head[2]
    pre, aff, post = spec.parts(m, 0)
    assert pre == [] and aff is m.stem[0] and [type(p) for p in post] == [nn.ReLU]
    with pytest.raises(ValidationError, match="block1"):
        spec.parts(m, 1)


def test_run_prefix_and_run_level_compose_the_forward():
    for arch in SMALL:
        m, x = _model(arch), _x(7)
        spec = levels_of(m)
        with torch.no_grad():
            full = m(x)
            h = x
            for i in range(len(spec)):
                assert torch.equal(run_prefix(m, spec, x, i, batch_size=100), h)
                out = run_level(m, spec, x, i, batch_size=3)  # batched = whole
                h = spec.module(m, i)(h)
                torch.testing.assert_close(out, h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(run_prefix(m, spec, x, len(spec), batch_size=2), full)


def test_run_level_preactivation_is_the_affine_output():
    m, x = _model("vgg"), _x()
    spec = levels_of(m)
    pre_act = run_level(m, spec, x, 1, preactivation=True)
    with torch.no_grad():
        want = m.block2[0](m.block1(x))
    torch.testing.assert_close(pre_act, want)


def test_neuron_matrix_round_trip_and_columns():
    for shape in [(4, 5), (4, 3, 5), (4, 5, 3, 2)]:
        a = torch.randn(*shape)
        m = neuron_matrix(a)
        assert m.shape[1] == 5 and m.shape[0] * 5 == a.numel()
        assert torch.equal(from_neuron_matrix(m, a.shape), a)
    a = torch.randn(2, 3, 4, 4)
    assert torch.equal(neuron_matrix(a)[:, 1], a[:, 1].reshape(-1))  # column = channel


def test_missing_module_names_it_and_lists_children():
    m = _model("mlp")
    with pytest.raises(ValidationError, match=r"'fc3'.*\['fc1', 'fc2', 'head'\]"):
        levels_of(m, ["fc1", "fc3", "head"])


def test_levels_that_do_not_compose_to_forward():
    m = _model("mlp")  # hidden (8, 6): fc1 → head fails on shape
    with pytest.raises(ValidationError, match="do not cover its forward pass.*'head' fails"):
        levels_of(m, ["fc1", "head"], sample=_x())
    torch.manual_seed(0)
    same = MLP(hidden=(6, 6)).eval()  # shapes fit, values do not: fc2 skipped
    with pytest.raises(ValidationError, match="does not reproduce model"):
        levels_of(same, ["fc1", "head"], sample=_x())


def test_overlapping_or_absent_levels_are_rejected():
    with pytest.raises(ValidationError, match="overlap"):
        levels_of(_model("vit"), ["patch_embed", "blocks", "blocks.0", "head"])
    with pytest.raises(ValidationError, match="declares no `levels`"):
        levels_of(nn.Sequential(nn.Linear(2, 2)))


def test_streams_given_override_the_probe_and_leave_the_model_alone():
    m = _model("resnet")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    spec = levels_of(m, sample=_x(), streams={})
    assert all(lv.stream_of is None for lv in spec.levels)
    assert m.training and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    spec = levels_of(m, streams={"block1": "stem", "block2": "block1"})
    assert [lv.stream_of for lv in spec.levels] == [None, "stem", "stem", None, None]
    with pytest.raises(ValidationError, match="not an earlier level"):
        levels_of(m, streams={"stem": "block1"})


def test_user_named_levels_of_a_sequential():
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 5), nn.ReLU(), nn.Linear(5, 3))
    spec = levels_of(net, ["0", "1", "2", "3"], sample=_x())
    assert [lv.kind for lv in spec.levels] == ["general", "affine", "general", "head"]
    assert [lv.has_params for lv in spec.levels] == [False, True, False, True]
