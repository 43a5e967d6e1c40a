"""PyTorch ``.bin``/``.pt`` files, loaded with ``torch.load(weights_only=True)`` only.

A pickle can run arbitrary code when it is loaded; ``weights_only=True`` restricts unpickling to
tensors and plain containers and refuses everything else *before* running it. We never fall back
to a full unpickle.

Memory: a pickle cannot be read one tensor at a time, so each file is loaded once, at open (the
shapes are needed up front), and kept until ``close()``. Zip-format files (``torch.save`` since
1.6) are memory-mapped: they cost address space equal to the file size but RAM only for the pages
touched. Legacy (non-zip) files cannot be mapped and are read whole into RAM. Convert either to
safetensors for bounded memory.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from mergeforge.checkpoint.base import TensorInfo, lookup_info
from mergeforge.errors import CheckpointError


def _convert_hint(path: Path) -> str:
    return (
        "If you trust the file, convert it once in a separate Python session: "
        f"`import torch, safetensors.torch as st; sd = torch.load({str(path)!r}, "
        "weights_only=False); st.save_file({k: v.contiguous().clone() for k, v in sd.items()}, "
        "'model.safetensors')`"
    )


def _tensors(path: Path, obj: object) -> dict[str, Tensor]:
    if isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model"):  # training checkpoints nest the weights
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (name -> tensor). "
            "Save `model.state_dict()` instead."
        )
    # Non-tensor entries (step counters, version tags) carry no weights.
    out = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not out:
        raise CheckpointError(f"{path}: contains no tensors. Save `model.state_dict()` instead.")
    return out


def load_torch_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    p = Path(path)
    try:
        mmap = zipfile.is_zipfile(p)
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not parse
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(p, weights_only=True, mmap=mmap, map_location="cpu")
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines()]
        why = next((ln for ln in lines if ln.startswith(("Unsupported", "Trying to load"))), "")
        raise CheckpointError(
            f"{p}: refused to load: unpickling it needs more than plain tensors and containers "
            f"({why or 'not a weights-only pickle'}), and such a pickle can run arbitrary code. "
            "It was not executed: mergeforge only uses torch.load(weights_only=True). "
            f"{_convert_hint(p)}"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e}).") from e
    except Exception as e:  # torch raises RuntimeError/EOFError/ValueError for corrupt files
        raise CheckpointError(
            f"{p}: not a readable PyTorch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); re-download or re-save it."
        ) from None
    return _tensors(p, obj)


class TorchFile:
    """A :class:`~mergeforge.checkpoint.base.TensorSource` over one torch pickle file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._sd: dict[str, Tensor] | None = load_torch_file(path)
        self._infos = {
            k: TensorInfo(k, tuple(v.shape), v.dtype, self.path) for k, v in self._sd.items()
        }

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return lookup_info(self._infos, self.path, name)

    def get(self, name: str) -> Tensor:
        self.info(name)
        if self._sd is None:
            self._sd = load_torch_file(self.path)
        return self._sd[name]

    def close(self) -> None:
        self._sd = None  # drops the mapping/RAM; a later get reloads the file
