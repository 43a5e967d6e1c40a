"""Our WUDI against FusionBench's ``wudi_merging`` (fusion-bench 0.2.33, an oracle only).

FusionBench treats every 2-D tensor as a matrix (``skip: ''`` on our side), runs
``torch.optim.Adam`` (lr 1e-5) with autograd on the loss from the sum of the task vectors,
and averages everything else. fusion-bench ships no SWUDI, SWUDI-A or ACE (checked in
0.2.33: no ``swudi``/``ace`` module), so those are tested against their formulas in
``test_covariance.py``.
"""

from __future__ import annotations

import pytest
import torch
from tests.methods._engine import merge_model
from torch.testing import assert_close

fb_wudi = pytest.importorskip("fusion_bench.method.wudi.wudi")

SHAPES = {"attn.q.weight": (12, 16), "mlp.up.weight": (24, 16), "mlp.down.weight": (16, 24)}
SHAPES |= {"mlp.up.bias": (24,), "norm.weight": (16,)}


def task_vectors(n=4, seed=0, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    return [
        {k: scale * (i + 1) * torch.randn(s, generator=g) for k, s in SHAPES.items()}
        for i in range(n)
    ]


def ours(tvs, iterations, exclude=()):
    # base = 0, experts = task vectors: our θ − θ₀ is then the merged task vector itself
    model = {k: (torch.zeros(s), [tv[k] for tv in tvs]) for k, s in SHAPES.items()}
    skip = "|".join(exclude).replace(".", r"\.")
    return merge_model("wudi", model, {"iterations": iterations, "skip": skip})


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("iterations", [1, 20])
def test_wudi_matches_fusion_bench(iterations):
    tvs = task_vectors()
    ref = fb_wudi.wudi_merging([dict(tv) for tv in tvs], accelerator="cpu", iter_num=iterations)
    out = ours(tvs, iterations)
    for key in SHAPES:
        assert relative(out[key], ref[key].detach()) < 1e-6, key
    # the 2-D tensors really moved away from the starting sum
    start = sum(tv["attn.q.weight"] for tv in tvs)
    assert relative(out["attn.q.weight"], start) > 1e-5


def test_excluded_matrices_are_averaged_on_both_sides():
    tvs = task_vectors(n=3, seed=1)
    ref = fb_wudi.wudi_merging(
        [dict(tv) for tv in tvs], accelerator="cpu", iter_num=5, exclude_keys=["mlp.up.weight"]
    )
    out = ours(tvs, 5, exclude=["mlp.up.weight"])
    for key in SHAPES:
        assert_close(out[key], ref[key].detach(), rtol=1e-6, atol=1e-9)
