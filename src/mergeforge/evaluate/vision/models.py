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

    def permutation_spec(self) -> dict:
        """Neuron permutation groups (``mergeforge.fusion.permspec``): fc1's and fc2's units."""
        axes = {
            "fc1.1.weight": ("fc1", None),
            "fc1.1.bias": ("fc1",),
            "fc2.0.weight": ("fc2", "fc1"),
            "fc2.0.bias": ("fc2",),
            "head.weight": (None, "fc2"),
            "head.bias": (None,),
        }
        return {"axes": axes, "points": {"fc1": (("fc1", -1),), "fc2": (("fc2", -1),)}}


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

    def permutation_spec(self) -> dict:
        """Groups: each conv block's channels and fc's units; fc reads block3's 3×3 map
        flattened channel-major, so its input axis is (block3, 9)."""
        axes: dict = {}
        prev = None
        for b in ("block1", "block2", "block3"):
            axes[f"{b}.0.weight"] = (b, prev, None, None)
            axes[f"{b}.0.bias"] = (b,)
            prev = b
        axes["fc.1.weight"] = ("fc", ("block3", 9))
        axes["fc.1.bias"] = ("fc",)
        axes["head.weight"] = (None, "fc")
        axes["head.bias"] = (None,)
        points = {g: ((g, 1),) for g in ("block1", "block2", "block3")} | {"fc": (("fc", -1),)}
        return {"axes": axes, "points": points}


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

    def permutation_spec(self) -> dict:
        """Groups: the residual streams and each block's inner conv1 channels. block1's
        identity shortcut ties its output to the stem's (one stream, ``res1``); block2/3 have
        1×1 conv shortcuts, so their outputs start new streams (``res2``, ``res3``)."""
        axes: dict = {"stem.0.weight": ("res1", None, None, None), "stem.0.bias": ("res1",)}
        points: dict = {"res1": (("stem", 1), ("block1", 1))}
        stream_in = "res1"
        for i, b in enumerate(("block1", "block2", "block3"), start=1):
            inner = f"{b}.inner"
            out = stream_in if i == 1 else f"res{i}"
            axes[f"{b}.conv1.weight"] = (inner, stream_in, None, None)
            axes[f"{b}.conv1.bias"] = (inner,)
            axes[f"{b}.conv2.weight"] = (out, inner, None, None)
            axes[f"{b}.conv2.bias"] = (out,)
            if i > 1:
                axes[f"{b}.shortcut.weight"] = (out, stream_in, None, None)
                axes[f"{b}.shortcut.bias"] = (out,)
                points[out] = ((b, 1),)
            points[inner] = ((f"{b}.conv1", 1),)
            stream_in = out
        axes["head.2.weight"] = (None, stream_in)
        axes["head.2.bias"] = (None,)
        return {"axes": axes, "points": points}


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

    def permutation_spec(self) -> dict:
        """Groups: the residual stream ``res`` (every token's d features: patch projection,
        CLS, positions, every LayerNorm, what qkv / the MLP read, what proj / the MLP write)
        and each block's MLP hidden units; attention internals (q, k, v, heads) stay in
        place. The CLS token and position table carry the stream on their last axis."""
        axes: dict = {
            "patch_embed.cls": (None, None, "res"),
            "patch_embed.pos": (None, None, "res"),
            "patch_embed.proj.weight": ("res", None, None, None),
            "patch_embed.proj.bias": ("res",),
        }
        points: dict = {"res": (("patch_embed", -1),)}
        for i in range(len(self.blocks)):
            b, hidden = f"blocks.{i}", f"blocks.{i}.mlp"
            for ln in ("ln1", "ln2"):
                axes[f"{b}.{ln}.weight"] = ("res",)
                axes[f"{b}.{ln}.bias"] = ("res",)
            axes[f"{b}.qkv.weight"] = (None, "res")
            axes[f"{b}.qkv.bias"] = (None,)
            axes[f"{b}.proj.weight"] = ("res", None)
            axes[f"{b}.proj.bias"] = ("res",)
            axes[f"{b}.mlp.0.weight"] = (hidden, "res")
            axes[f"{b}.mlp.0.bias"] = (hidden,)
            axes[f"{b}.mlp.2.weight"] = ("res", hidden)
            axes[f"{b}.mlp.2.bias"] = ("res",)
            points["res"] += ((b, -1),)
            points[hidden] = ((f"{b}.mlp.1", -1),)
        axes |= {"head.norm.weight": ("res",), "head.norm.bias": ("res",)}
        axes |= {"head.fc.weight": (None, "res"), "head.fc.bias": (None,)}
        output_axis = {"patch_embed.cls": 2, "patch_embed.pos": 2}
        return {"axes": axes, "points": points, "output_axis": output_axis}


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
