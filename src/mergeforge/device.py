"""Device resolution, on the ground floor: the engine, the statistics passes and training all
turn a user's ``--device`` into a :class:`torch.device` the same way."""

from __future__ import annotations

import torch

from mergeforge.errors import ConfigError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` (``None`` = cpu) as a :class:`torch.device`; :class:`ConfigError` for CUDA
    without a GPU visible to torch or a device type other than cpu, cuda or mps."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is available to torch")
    if dev.type not in {"cpu", "cuda", "mps"}:
        raise ConfigError(f"unsupported device {str(dev)!r}; use cpu or cuda")
    return dev
