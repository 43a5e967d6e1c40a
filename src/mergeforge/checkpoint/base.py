"""What the engine needs from a checkpoint: names, shapes and dtypes up front, tensors on demand.

Every reader is lazy: opening a checkpoint reads headers only; ``get`` loads one tensor. Errors
are :class:`mergeforge.errors.CheckpointError` naming the file (and tensor) and the fix.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    """The file that holds the tensor (for error messages)."""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def lookup_info(infos: Mapping[str, TensorInfo], path: str, name: str) -> TensorInfo:
    """``infos[name]``, or a CheckpointError naming the file and the tensor."""
    from mergeforge.errors import CheckpointError

    try:
        return infos[name]
    except KeyError:
        raise CheckpointError(f"{path}: no tensor named {name!r}.") from None


class TensorSource(Protocol):
    """A lazy mapping name -> tensor."""

    path: str
    """Human-readable location (folder, file or ``base+adapter``) used in errors."""

    def keys(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def get(self, name: str) -> Tensor:
        """Load one tensor. It may be a read-only view of a memory map: never mutate it."""
        ...

    def close(self) -> None: ...


@dataclass
class Checkpoint:
    """An opened model: its tensors plus its carried files (config, tokenizer), if any."""

    source: TensorSource
    folder: Path | None = None
    """Model folder (config.json, tokenizer files live here) or ``None`` for a bare file."""
    config: Mapping[str, Any] | None = None
    """Parsed ``config.json`` when present."""

    @property
    def path(self) -> str:
        return self.source.path

    def keys(self) -> list[str]:
        return self.source.keys()

    @property
    def carried_files(self) -> list[Path]:
        """Files of ``folder`` a merged output carries (the ``CARRIED_FILES`` that exist)."""
        from mergeforge.checkpoint.hf import carried_files

        return carried_files(self.folder) if self.folder is not None else []

    def info(self, name: str) -> TensorInfo:
        return self.source.info(name)

    def get(self, name: str) -> Tensor:
        return self.source.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def close(self) -> None:
        self.source.close()
