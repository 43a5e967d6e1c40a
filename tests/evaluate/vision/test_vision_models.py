"""Vision models: output shapes, and the levels contract (running the levels in order = forward)."""

from __future__ import annotations

import pytest
import torch

from mergeforge.evaluate.vision.models import ARCHS, build_model, level_modules


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_forward_shape_and_levels(arch):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        logits = model(x)
        h = x
        for _, module in level_modules(model):  # fusion walks these one level at a time
            h = module(h)
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    torch.testing.assert_close(h, logits, rtol=0, atol=0)
    # every parameter belongs to exactly one level
    owned = [n for name, m in level_modules(model) for n, _ in m.named_parameters(prefix=name)]
    assert sorted(owned) == sorted(n for n, _ in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) < 300_000  # trains on CPU in about a minute


def test_resnet_blocks_have_skip_connections():
    model = build_model("resnet")
    block = model.block1
    torch.nn.init.zeros_(block.conv2.weight)
    torch.nn.init.zeros_(block.conv2.bias)
    x = torch.rand(2, 16, 14, 14)  # non-negative, as after the stem's ReLU
    torch.testing.assert_close(block(x), x)  # residual branch zeroed: identity shortcut remains


def test_build_model_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown architecture 'alexnet'"):
        build_model("alexnet")
