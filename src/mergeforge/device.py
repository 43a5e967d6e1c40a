"""Device resolution, on the ground floor: the engine, the statistics passes and training all
turn a user's ``--device`` into a :class:`torch.device` the same way."""

from __future__ import annotations

import torch

from mergeforge.errors import ConfigError

VALID = "cpu, cuda (or cuda:N), mps, or auto (cuda when torch sees a GPU, else cpu)"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` (``None`` = cpu) as a :class:`torch.device`; ``"auto"``: cuda when a CUDA GPU
    is visible to torch, else cpu. :class:`ConfigError` (naming the valid values) for CUDA
    without a GPU visible to torch, a name torch does not parse (``"gpu"``, ``"tpu"``) or a
    device type other than cpu, cuda or mps."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError, ValueError):  # torch's parse error: a traceback otherwise
        raise ConfigError(f"unsupported device {device!r}; use {VALID}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is available to torch")
    if dev.type not in {"cpu", "cuda", "mps"}:
        raise ConfigError(f"unsupported device {str(dev)!r}; use {VALID}")
    return dev
