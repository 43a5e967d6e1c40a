"""Sharded checkpoints described by a Hugging Face index (``*.index.json``).

The index is ``{"metadata": {...}, "weight_map": {tensor name: shard file name}}``. Every shard
is checked to exist at open and its header read (safetensors) or loaded (torch pickles, see
:mod:`mergeforge.checkpoint.torch_file`); data is read per tensor on ``get``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from torch import Tensor

from mergeforge.checkpoint.base import TensorInfo, TensorSource
from mergeforge.checkpoint.safetensors_file import SafetensorsFile
from mergeforge.checkpoint.torch_file import TorchFile
from mergeforge.errors import CheckpointError

TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def open_weights_file(path: Path) -> TensorSource:
    """A single weights file by suffix: safetensors or a torch pickle."""
    if path.name.endswith(".safetensors"):
        return SafetensorsFile(path)
    if path.suffix in TORCH_SUFFIXES:
        return TorchFile(path)
    raise CheckpointError(
        f"{path}: unknown weights format (expected .safetensors, .bin, .pt, .pth or an "
        "*.index.json of shards)."
    )


def read_weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e.strerror}).") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{index}: not valid JSON ({e}); re-download or re-save it."
        ) from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(
            f'{index}: has no "weight_map" object mapping tensor names to shard files; '
            "re-download or re-save it."
        )
    return wm


class ShardedSource:
    """A :class:`~mergeforge.checkpoint.base.TensorSource` over the shards named by an index."""

    def __init__(self, index: str | os.PathLike[str]) -> None:
        index = Path(index)
        self.path = str(index)
        weight_map = read_weight_map(index)
        shard_names = sorted(set(weight_map.values()))  # numbered names: file order
        for shard in shard_names:
            rel = PurePosixPath(shard)
            if rel.is_absolute() or ".." in rel.parts:
                raise CheckpointError(
                    f"{index}: shard {shard!r} points outside the folder; shards must be plain "
                    "file names beside the index."
                )
            if not (index.parent / shard).is_file():
                tensor = next(k for k, v in weight_map.items() if v == shard)
                raise CheckpointError(
                    f"{index}: entry {tensor!r} names shard {shard!r}, but "
                    f"{index.parent / shard} does not exist; download the missing shard or "
                    "re-save the model."
                )
        self._shards: list[TensorSource] = []
        try:
            for shard in shard_names:
                self._shards.append(open_weights_file(index.parent / shard))
        except BaseException:
            self.close()
            raise
        self._where: dict[str, TensorSource] = {}
        for shard, src in zip(shard_names, self._shards, strict=True):
            present = set(src.keys())
            for name in src.keys():  # shard order, then on-disk order: sequential reads
                if weight_map.get(name) == shard:
                    self._where[name] = src
            missing = [k for k, v in weight_map.items() if v == shard and k not in present]
            if missing:
                self.close()
                raise CheckpointError(
                    f"{index}: tensor {missing[0]!r} is mapped to {shard!r} but that shard "
                    f"does not contain it ({len(missing)} such); the index and the shards "
                    "disagree, re-download or re-save the model."
                )

    def keys(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._source(name).info(name)

    def get(self, name: str) -> Tensor:
        return self._source(name).get(name)

    def _source(self, name: str) -> TensorSource:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}.") from None

    def close(self) -> None:
        for src in self._shards:
            src.close()
