"""Streaming, atomic, sharded safetensors output.

Names, shapes and dtypes are known before any tensor is computed, so the whole layout is fixed
at construction: shards are filled greedily in the given order (a new shard starts when the next
tensor would push the current one past ``max_shard_bytes``; a tensor larger than that gets a shard
of its own), each shard's header is written first, and ``write`` puts a tensor's bytes at its
precomputed offset with ``os.pwrite``. Tensors can therefore arrive in any order, from several
threads, with only the tensors in flight in memory, and no second pass.

Inside a shard tensors are laid out by element size, largest first (stable), so every tensor
starts at a multiple of its element size (the header is padded to 8 bytes): readers that map the
file can view the data without copies.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import Tensor

from mergeforge.checkpoint._dtypes import TORCH_TO_SAFETENSORS, itemsize, numel
from mergeforge.checkpoint._staging import Staging, fsync_path
from mergeforge.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
_MAX_IO = 1 << 30


@dataclass(frozen=True)
class _Slot:
    shard: int
    offset: int  # absolute, in the shard file
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _spec(t: Any) -> tuple[str, tuple[int, ...], torch.dtype]:
    name, shape, dtype = t if isinstance(t, tuple) else (t.name, t.shape, t.dtype)
    shape = tuple(int(s) for s in shape)
    if not isinstance(name, str) or name == "__metadata__" or not name:
        raise CheckpointError(f"cannot write a tensor named {name!r}; rename it.")
    if any(s < 0 for s in shape):
        raise CheckpointError(f"tensor {name!r}: negative dimension in shape {shape}.")
    if dtype not in TORCH_TO_SAFETENSORS:
        raise CheckpointError(
            f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors; cast it to one of "
            f"{', '.join(str(d).removeprefix('torch.') for d in TORCH_TO_SAFETENSORS)}."
        )
    return name, shape, dtype


def _plan(specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(specs):
        n = numel(shape) * itemsize(dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


class ShardedWriter:
    """Write a model folder of safetensors shards plus ``model.safetensors.index.json``.

    Use as a context manager: leaving the block normally commits, an exception aborts. Nothing
    appears at ``out_dir`` before :meth:`commit`; see :mod:`mergeforge.checkpoint._staging`.

    ``overwrite``: replace an existing non-empty ``out_dir`` at commit (only if
    ``replaceable(out_dir)`` is true, when given; checked at construction and at commit).
    Every file-system failure (permissions, a full disk) is a :class:`CheckpointError` naming
    the output, and the partial folder is removed.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        tensors: Iterable[Any],
        *,
        max_shard_bytes: int = 5_000_000_000,
        metadata: dict[str, str] | None = None,
        overwrite: bool = False,
        durable: bool = True,
        replaceable: Callable[[Path], bool] | None = None,
    ) -> None:
        # durable: fsync the shards before the rename, so the output survives a power loss or
        # OS crash too (a killed process can never leave a partial output either way: the
        # rename is atomic). Costs the disk write-back of the whole model inside the call.
        self._durable = durable
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        meta = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise CheckpointError("safetensors metadata must map str to str; convert the values.")
        meta["format"] = "pt"
        specs = [_spec(t) for t in tensors]
        seen: set[str] = set()
        for name, _, _ in specs:
            if name in seen:
                raise CheckpointError(f"tensor {name!r} is declared twice; names must be unique.")
            seen.add(name)
        plan = _plan(specs, max_shard_bytes)
        n = len(plan)
        self.shard_names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.out_dir = Path(out_dir)
        self.total_size = sum(numel(s) * itemsize(d) for _, s, d in specs)
        self._slots: dict[str, _Slot] = {}
        self._written: set[str] = set()
        self._inflight: set[str] = set()
        self._lock = threading.Condition()
        self._fds: list[int] = []
        self._state = "open"
        self._staging = Staging(self.out_dir, overwrite=overwrite, replaceable=replaceable)
        try:
            for shard, members in enumerate(plan):
                self._start_shard(shard, [specs[i] for i in members], meta)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise self._os_error("creating the shard files", e) from None
            raise

    def _os_error(self, doing: str, e: OSError) -> CheckpointError:
        return CheckpointError(
            f"{self.out_dir}: {doing} failed ({e.strerror or e}"
            + (f": {e.filename}" if e.filename else "")
            + "); check free disk space and permissions. Nothing was written at the output path."
        )

    def _start_shard(self, shard: int, specs: list[Any], meta: dict[str, str]) -> None:
        specs = sorted(specs, key=lambda s: -itemsize(s[2]))  # stable: keeps given order
        header: dict[str, Any] = {"__metadata__": meta}
        pos = 0
        for name, shape, dtype in specs:
            nbytes = numel(shape) * itemsize(dtype)
            header[name] = {
                "dtype": TORCH_TO_SAFETENSORS[dtype],
                "shape": list(shape),
                "data_offsets": [pos, pos + nbytes],
            }
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        start = 8 + len(raw)
        for name, shape, dtype in specs:
            begin, end = header[name]["data_offsets"]
            self._slots[name] = _Slot(shard, start + begin, end - begin, shape, dtype)
        path = self._staging.path / self.shard_names[shard]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._fds.append(fd)
        _pwrite_all(fd, memoryview(struct.pack("<Q", len(raw)) + raw), 0)
        os.ftruncate(fd, start + pos)  # sparse until the tensors arrive

    @property
    def weight_map(self) -> dict[str, str]:
        return {k: self.shard_names[s.shard] for k, s in sorted(self._slots.items())}

    def write(self, name: str, tensor: Tensor) -> None:
        """Store one declared tensor (any order, any thread). It must match the declared
        shape and dtype exactly: cast before writing."""
        slot = self._slots.get(name)
        if slot is None:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r} was not declared.")
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise CheckpointError(
                f"{self.out_dir}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype} but "
                f"was declared {slot.shape} {slot.dtype}; cast/reshape it before writing."
            )
        with self._lock:
            self._check_open()
            if name in self._written or name in self._inflight:
                raise CheckpointError(f"{self.out_dir}: tensor {name!r} was written twice.")
            self._inflight.add(name)
        ok = False
        try:
            if slot.nbytes:
                t = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
                data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                _pwrite_all(self._fds[slot.shard], data, slot.offset)  # no GIL, no lock held
            ok = True
        except OSError as e:
            raise CheckpointError(
                f"{self.out_dir}: writing tensor {name!r} to {self.shard_names[slot.shard]} "
                f"failed ({e.strerror}); check free disk space and permissions."
            ) from e
        finally:
            with self._lock:
                self._inflight.discard(name)
                if ok:
                    self._written.add(name)
                self._lock.notify_all()

    def write_text(self, relpath: str, text: str) -> None:
        """Write a carried file (e.g. ``config.json``) into the output folder."""
        path = self._carried_path(relpath)
        try:
            path.write_text(text, encoding="utf-8")
            fsync_path(path)
        except OSError as e:
            raise self._os_error(f"writing {relpath}", e) from None

    def copy_file(self, src: str | os.PathLike[str], relpath: str | None = None) -> None:
        """Copy a carried file (tokenizer, config) into the output, by default under its name."""
        src = Path(src)
        if not src.is_file():
            raise CheckpointError(f"{src}: cannot copy it into the output, it is not a file.")
        path = self._carried_path(relpath or src.name)
        try:
            shutil.copyfile(src, path)
            fsync_path(path)
        except OSError as e:
            raise self._os_error(f"copying {src} as {relpath or src.name}", e) from None

    def _carried_path(self, relpath: str) -> Path:
        self._check_open()
        rel = PurePosixPath(relpath)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise CheckpointError(
                f"{relpath!r}: a carried file needs a relative path in the output."
            )
        if str(rel) in (*self.shard_names, INDEX_NAME):
            raise CheckpointError(f"{relpath!r} would overwrite the weights; use another name.")
        path = self._staging.path / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._os_error(f"creating {rel.parent}", e) from None
        return path

    def commit(self) -> Path:
        """Check every tensor was written, fsync, and move the folder into place."""
        with self._lock:
            self._check_open()
            self._lock.wait_for(lambda: not self._inflight)  # writes racing with commit
            missing = [k for k in self._slots if k not in self._written]
            if missing:
                shown = ", ".join(repr(k) for k in missing[:5])
                raise CheckpointError(
                    f"{self.out_dir}: {len(missing)} declared tensor(s) were never written "
                    f"({shown}{', ...' if len(missing) > 5 else ''}); write them before commit()."
                )
            self._state = "committing"
        index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
        path = self._staging.path / INDEX_NAME
        try:
            path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            fsync_path(path)
            if self._durable:
                for fd in self._fds:
                    os.fsync(fd)
            self._close_fds()
            self._staging.commit()
        except OSError as e:
            if self._staging.committed:  # failed after the rename: the output is in place
                raise CheckpointError(
                    f"{self.out_dir}: the output was written completely and is in place, but "
                    f"the clean-up after it failed ({e.strerror or e}"
                    + (f": {e.filename}" if e.filename else "")
                    + "): syncing its parent folder to disk or removing the previous output "
                    f"(.{self.out_dir.name}.mergeforge-old-*); the output is usable; check the "
                    "disk and remove such a leftover folder."
                ) from None
            raise self._os_error("putting the output in place", e) from None
        finally:  # also when a stop signal held over the rename is raised after it
            if self._staging.committed:
                self._state = "committed"
        return self.out_dir

    def abort(self) -> None:
        """Discard everything written; idempotent; a no-op after a successful commit."""
        if self._state in ("committed", "aborted"):
            return
        self._close_fds()
        self._staging.abort()
        self._state = "aborted"

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def _check_open(self) -> None:
        if self._state != "open":
            raise CheckpointError(f"{self.out_dir}: the writer is already {self._state}.")

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    pos = 0
    while pos < len(data):
        pos += os.pwrite(fd, data[pos : pos + _MAX_IO], offset + pos)
