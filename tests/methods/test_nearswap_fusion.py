"""nearswap and arcee_fusion (two-model methods): hand-worked examples (numbers in the
comments) and mergekit's functions as the oracle (≤ 1e-6 in fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.methods._engine import merge_tensor
from tests.methods._mergekit import SHAPES, experts, mergekit_tensor
from torch.testing import assert_close

from mergeforge.errors import ConfigError
from mergeforge.methods.arcee_fusion import fusion_threshold, importance, quantiles

T = torch.tensor


def test_nearswap():
    base, other = torch.zeros(4), T([0.05, 0.1, 0.4, -1.0])
    # w = clamp(0.1/|Δ|, 0, 1) = [1, 1, 0.25, 0.1] → w·other = [0.05, 0.1, 0.1, −0.1]:
    # every entry moves at most t = 0.1
    out = merge_tensor("nearswap", base, [other], {"t": 0.1})
    assert_close(out, T([0.05, 0.1, 0.1, -0.1]))
    assert_close(out, base + (other - base).clamp(-0.1, 0.1))
    assert torch.equal(merge_tensor("nearswap", base, [other], {"t": -1.0}), base)


def test_nearswap_needs_t():
    with pytest.raises(ConfigError, match="'t'"):
        merge_tensor("nearswap", torch.zeros(2), [torch.ones(2)], {})


def test_arcee_fusion():
    base = torch.zeros(8)
    delta = T([0.1, 0.2, 0.1, 0.3, 0.2, 0.1, 2.0, 0.2])
    # one row: importance = |Δ|·KL, the same KL for every entry. Sorted |Δ|: .1 .1 .1 .2 .2 .2
    # .3 2; indices ⌊q·7⌋ = 1, 3, 5 → Q₁ = .1, median = .2, Q₃ = .2; fence .2 + 1.5·.1 = .35
    # (times KL): only the 2.0 is kept
    out = merge_tensor("arcee_fusion", base, [base + delta])
    assert_close(out, T([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0]))
    p, q = F.softmax(delta, dim=0), F.softmax(base, dim=0)
    kl = ((p + 1e-8) * ((p + 1e-8) / (q + 1e-8)).log()).sum()
    assert_close(importance(base, delta), delta * kl)
    assert [float(x) for x in quantiles(delta)] == pytest.approx([0.1, 0.2, 0.2])
    assert float(fusion_threshold(delta)) == pytest.approx(0.35)
    # the same model: nothing changed, the base
    assert torch.equal(merge_tensor("arcee_fusion", base, [base.clone()]), base)


def test_arcee_fusion_rows():
    base = torch.zeros(4, 8)
    delta = torch.zeros(4, 8)
    delta[0] = 5.0  # a row shifted by a constant has the same softmax: KL 0, importance 0
    delta[1, 3] = 1.0
    scores = importance(base, delta)
    assert_close(scores[0], torch.zeros(8))
    assert scores[1, 3] > 0
    # over ¾ of the scores are 0, so Q₁ = median = Q₃ = 0 and the fence is 0: every entry is
    # "an outlier" and the other model is taken whole (as in mergekit)
    assert float(fusion_threshold(scores)) == 0.0
    assert torch.equal(merge_tensor("arcee_fusion", base, [delta]), delta)


@pytest.mark.mergekit
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("name", "shared"), [("nearswap", {"t": 0.05}), ("nearswap", {"t": 0.3}),
                                              ("arcee_fusion", {})])  # fmt: skip
def test_same_as_mergekit(name, shared, shape):
    base, (x,) = experts(shape, n=1)
    theirs = mergekit_tensor(name, base, [x], shared)
    ours = merge_tensor(name, base, [x], shared)
    assert (ours - theirs).abs().max().item() <= 1e-6
