"""fuse()'s checks before a method runs (class_fractions against the parents' classes; a warning
when the method ignores them), and the average baseline's precision."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import mergeforge.fusion.base as base
from mergeforge.errors import ValidationError
from mergeforge.evaluate.vision.models import MLP
from mergeforge.fusion.base import FUSION_METHODS, FusionData, fuse, get_method

USES = ["hf", "kf", "kf_gradient", "last_layer_kd"]
IGNORES = ["average", "rebasin_weight", "rebasin_activation", "zipit", "ot_fusion"]


def _parents(k=2, dtype=torch.float32):
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(MLP(hidden=(8, 6)).to(dtype).eval())
    return out


def _x(n=16):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _never_runs(*_args):
    raise AssertionError("the method ran: the check came too late")


@pytest.mark.parametrize("method", USES)
def test_class_fractions_of_the_wrong_width_fail_before_the_method(method, monkeypatch):
    assert get_method(method).uses_class_fractions
    monkeypatch.setitem(FUSION_METHODS, method, dataclasses.replace(get_method(method),
                                                                    fn=_never_runs))  # fmt: skip
    data = FusionData(_x(), class_fractions=torch.rand(2, 7))  # the MLP has 10 classes
    with pytest.raises(ValidationError, match=r"class_fractions has 7 columns .* 10 classes"):
        fuse(_parents(), data, method)


def test_class_fractions_of_the_right_width_pass_and_the_parents_keep_their_flags():
    parents = _parents()
    parents[0].train()  # the width probe runs in eval mode and restores every flag
    flags = [[m.training for m in p.modules()] for p in parents]
    data = FusionData(_x(), class_fractions=torch.rand(2, 10))
    fuse(parents, data, "last_layer_kd", {"epochs": 1})
    assert [[m.training for m in p.modules()] for p in parents] == flags


def test_methods_that_ignore_class_fractions_say_so_once(monkeypatch, caplog):
    monkeypatch.setattr(base, "_WARNED", set())
    assert not any(get_method(m).uses_class_fractions for m in IGNORES)
    data = FusionData(_x(), class_fractions=torch.rand(2, 10))
    with caplog.at_level(logging.WARNING, logger="mergeforge"):
        fuse(_parents(), data, "average")
        fuse(_parents(), data, "average")
        fuse(_parents(), FusionData(_x()), "zipit")  # none given: nothing to say
    said = [r.getMessage() for r in caplog.records if "class_fractions" in r.getMessage()]
    assert len(said) == 1 and "'average' ignores class_fractions" in said[0]


def test_average_of_identical_float64_parents_is_bit_identical():
    a = _parents(1, torch.float64)[0]
    with torch.no_grad():  # values float32 cannot hold (the init's are float32 numbers)
        for prm in a.parameters():
            prm += 1e-3 * torch.randn(prm.shape, dtype=torch.float64)
    out = fuse([a, a], FusionData(_x()), "average")
    for k, v in a.state_dict().items():
        assert out[k].dtype == torch.float64 and torch.equal(out[k], v), k
    # float32 parents still average in float32 (bit for bit what they did before)
    f = _parents(2)
    out = fuse(f, FusionData(_x()), "average", {"weights": (1, 3)})
    sds = [p.state_dict() for p in f]
    for k, v in out.items():
        assert torch.equal(v, 0.25 * sds[0][k].float() + 0.75 * sds[1][k].float()), k
