"""Small image classifiers (1×28×28 → 10 logits) for fusing independently trained networks.

Plain PyTorch (no torchvision/timm). Each class lists its ``levels``: the ordered module names
that neuron-centric fusion (2507.00037) and OT-fusion (1910.05653) walk one at a time; the output
of level ℓ is the input of level ℓ+1 except across the skip connections inside a ResNet block,
which stay inside one level. No normalisation layers in the CNNs (BatchNorm running statistics
would need their own alignment), so every level is conv/linear + ReLU (+ pooling).

| arch | levels | params |
|---|---|---|
| ``mlp`` | fc1 (784→256), fc2 (256→128), head | 235k |
| ``vgg`` | block1..3 (conv 16/32/64 + pool), fc (576→128), head | 98k |
| ``resnet`` | stem (stride 2), block1..3 (basic blocks 16/32/64, skips), head | 80k |
| ``vit`` | patch_embed (7×7 patches, d=64, CLS, positions), blocks.0..1, head | 70k |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    levels = ("fc1", "fc2", "head")

    def __init__(self, *, hidden: tuple[int, int] = (256, 128), num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden[0]), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(hidden[0], hidden[1]), nn.ReLU())
        self.head = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B×1×28×28
        return self.head(self.fc2(self.fc1(x)))


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))


class VGGSmall(nn.Module):
    levels = ("block1", "block2", "block3", "fc", "head")

    def __init__(
        self, *, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10
    ) -> None:
        super().__init__()
        self.block1 = _conv_block(1, widths[0])  # 28 → 14
        self.block2 = _conv_block(widths[0], widths[1])  # 14 → 7
        self.block3 = _conv_block(widths[1], widths[2])  # 7 → 3
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(widths[2] * 3 * 3, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.block3(self.block2(self.block1(x)))))


class BasicBlock(nn.Module):
    """relu(conv2(relu(conv1(x))) + shortcut(x)); shortcut = 1×1 conv when the shape changes."""

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride)
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class ResNetSmall(nn.Module):
    levels = ("stem", "block1", "block2", "block3", "head")

    def __init__(
        self, *, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, stride=2, padding=1), nn.ReLU())  # 14
        self.block1 = BasicBlock(widths[0], widths[0])  # 14×14
        self.block2 = BasicBlock(widths[0], widths[1], stride=2)  # 7×7
        self.block3 = BasicBlock(widths[1], widths[2], stride=2)  # 4×4
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[2], num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block3(self.block2(self.block1(self.stem(x)))))


class PatchEmbed(nn.Module):
    """B×1×28×28 → B×(1+P)×d: 7×7 patches (P = 16) linearly embedded, CLS token, positions."""

    def __init__(self, *, patch: int = 7, dim: int = 64) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + (28 // patch) ** 2, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # B×P×d
        return torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B×T×d
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class ClsHead(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x[:, 0]))  # the CLS token


class ViTSmall(nn.Module):
    levels = ("patch_embed", "blocks.0", "blocks.1", "head")

    def __init__(
        self,
        *,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int = 128,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(dim=dim)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_dim) for _ in range(depth)))
        self.head = ClsHead(dim, num_classes)
        self.levels = ("patch_embed", *(f"blocks.{i}" for i in range(depth)), "head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.patch_embed(x)))


ARCHS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "vgg": VGGSmall,
    "resnet": ResNetSmall,
    "vit": ViTSmall,
}


def build_model(arch: str, *, num_classes: int = 10) -> nn.Module:
    """A freshly initialised model (seed torch beforehand for a reproducible init)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    return ARCHS[arch](num_classes=num_classes)


def level_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's levels in order, as ``(name, submodule)``."""
    return [(name, model.get_submodule(name)) for name in model.levels]
