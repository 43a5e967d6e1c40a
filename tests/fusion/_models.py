"""Small vision models for the fusion tests (not a test file): the archs by name, a seeded
build, a permuted copy (the same function, other neuron order), fusion inputs, and the checks
that a fused state is the same function and that parents keep every module's train/eval flag."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mergeforge.evaluate.vision.models import MLP, ResNetSmall, VGGSmall, ViTSmall
from mergeforge.fusion.base import FusionData
from mergeforge.fusion.permspec import PermutationSpec, permute, spec_for

Builders = dict[str, Callable[[], nn.Module]]


def _chain() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(4 * 7 * 7, 10),
        nn.ReLU(),
        nn.Linear(10, 3),
    )


def builders(
    *, vgg: tuple[int, ...] = (4, 6, 8), chain: Callable[[], nn.Module] = _chain
) -> Builders:
    """Arch name -> a constructor: an MLP, a VGG (``vgg``: its widths), a ResNet, a ViT and a
    plain ``nn.Sequential`` (``chain``)."""
    return {
        "mlp": lambda: MLP(hidden=(12, 10)),
        "vgg": lambda: VGGSmall(widths=vgg),
        "resnet": lambda: ResNetSmall(widths=(4, 6, 8)),
        "vit": lambda: ViTSmall(dim=16, depth=2, heads=2, mlp_dim=12),
        "chain": chain,
    }


BUILDERS = builders()


def build(arch: str, seed: int, builders: Builders = BUILDERS) -> nn.Module:
    torch.manual_seed(seed)
    return builders[arch]().eval()


def random_perms(spec: PermutationSpec, model: nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {grp: torch.randperm(w, generator=g) for grp, w in spec.widths(model).items()}


def permuted_copy(model: nn.Module, arch: str, seed: int, builders: Builders = BUILDERS):
    spec = spec_for(model)
    other = build(arch, 99, builders)
    other.load_state_dict(permute(model.state_dict(), spec, random_perms(spec, model, seed)))
    return other


def fusion_data(n: int = 24, seed: int = 5) -> FusionData:
    return FusionData(
        inputs=torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    )


def mix_flags(model: nn.Module) -> list[bool]:
    """One affine leaf in training mode under an eval-mode model; returns every module's flag.
    A method that restores only the top-level flag (``model.train(was)``) resets the leaf."""
    leaf = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    leaf.train()
    return [m.training for m in model.modules()]


def same_function(
    state: dict, model: nn.Module, arch: str, atol: float = 1e-5, builders: Builders = BUILDERS
) -> None:
    """``state`` loaded into a fresh ``arch`` gives ``model``'s outputs."""
    fused = build(arch, 123, builders)
    fused.load_state_dict(state)
    x = fusion_data(8, seed=11).inputs
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=atol)
