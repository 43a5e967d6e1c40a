"""One ``.safetensors`` file, read lazily with positional reads (no memory map).

Layout: 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the
data; offsets are relative to the end of the header. Opening validates the whole header against
the file size, so a truncated download fails at open, not half-way through a merge.

``get`` maps just that tensor's byte range read-only (``MAP_POPULATE``: the kernel maps the
page-cache pages in one batch) and returns a zero-copy tensor over it; the mapping is released
when the tensor dies. So the address space stays bounded by the tensors alive (a merge can run
under ``ulimit -v`` below the total input size) and nothing is copied: on a 2-core VM this read
4.3 GB in 1.7 s against 6-8 s for ``preadv`` into fresh memory, whose page faults dominate.
The tensor is READ-ONLY memory: methods must never write to their inputs (they do not: the
property tests check it). ``MERGEFORGE_READ=pread`` (or a failed mapping) uses ``os.preadv``
into a fresh, writable tensor instead; the syscall releases the GIL either way.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergeforge.checkpoint._dtypes import SAFETENSORS_DTYPES, itemsize, numel
from mergeforge.checkpoint.base import TensorInfo, lookup_info
from mergeforge.errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the limit the reference implementation enforces
_MAX_IO = 1 << 30  # one read call moves at most 1 GiB (Linux caps a call just under 2 GiB)
_FIX = "re-download or re-save it"


def read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """Return ``(header, data_start, file_size)``; raise CheckpointError if it is not sane."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(
                    f"{path}: {size} bytes is too small for a safetensors file; {_FIX}."
                )
            (n,) = struct.unpack("<Q", f.read(8))
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} is not sane for a file of {size} bytes "
                    f"(not a safetensors file, or truncated); {_FIX}."
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror}).") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: the safetensors header is not valid JSON ({e}); {_FIX}."
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; {_FIX}.")
    return header, 8 + n, size


def _parse_entry(
    path: Path, name: str, entry: Any
) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {why}; {_FIX}.")

    if not isinstance(entry, dict):
        raise bad("header entry is not an object")
    dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise bad(f"unknown dtype {entry.get('dtype')!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    expected = numel(tuple(shape)) * itemsize(dtype)
    if offsets[1] - offsets[0] != expected:
        raise bad(
            f"byte range {offsets} holds {offsets[1] - offsets[0]} bytes but shape {shape} "
            f"x {entry['dtype']} needs {expected}"
        )
    return dtype, tuple(shape), offsets[0], offsets[1]


class SafetensorsFile:
    """A :class:`~mergeforge.checkpoint.base.TensorSource` over one safetensors file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        self.path = str(p)
        header, self._data_start, size = read_header(p)
        meta = header.pop("__metadata__", None)
        if meta is not None and not isinstance(meta, dict):
            raise CheckpointError(f"{p}: __metadata__ is not a JSON object; {_FIX}.")
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (meta or {}).items()}
        parsed = {name: _parse_entry(p, name, e) for name, e in header.items()}
        # Keys in data order: reading in this order is sequential on disk.
        order = sorted(parsed, key=lambda k: (parsed[k][2], k))
        prev_end, prev_name = 0, None
        for name in order:
            _, _, begin, end = parsed[name]
            if self._data_start + end > size:
                raise CheckpointError(
                    f"{p} is truncated: tensor {name!r} needs bytes up to "
                    f"{self._data_start + end} but the file has {size}; {_FIX}."
                )
            if begin < prev_end:
                raise CheckpointError(
                    f"{p}: tensors {prev_name!r} and {name!r} overlap in the file; {_FIX}."
                )
            if end > begin:
                prev_end, prev_name = end, name
        self._entries = {k: parsed[k] for k in order}
        self._infos = {
            k: TensorInfo(k, shape, dtype, self.path) for k, (dtype, shape, _, _) in parsed.items()
        }
        self._fd: int | None = None
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        return lookup_info(self._infos, self.path, name)

    def get(self, name: str) -> Tensor:
        info = self.info(name)
        _, _, begin, end = self._entries[name]
        if end == begin:
            return torch.empty(info.shape, dtype=info.dtype)
        start = self._data_start + begin
        if _USE_MMAP and start % info.dtype.itemsize == 0:
            mapped = _map(self._open(), start, end - begin, info)
            if mapped is not None:
                return mapped
        buf = torch.empty(end - begin, dtype=torch.uint8)
        _read_into(self._open(), memoryview(buf.numpy()), start, self.path, name)
        return buf.view(info.dtype).reshape(info.shape)

    def _open(self) -> int:
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{self.path}: cannot open ({e.strerror}).") from e
            return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


_USE_MMAP = os.environ.get("MERGEFORGE_READ", "mmap") != "pread"
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _map(fd: int, start: int, nbytes: int, info: TensorInfo) -> Tensor | None:
    """A read-only zero-copy tensor over ``nbytes`` at ``start``; ``None`` if mapping fails."""
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    try:
        m = mmap.mmap(fd, nbytes + start - aligned, flags=_MAP_FLAGS, prot=mmap.PROT_READ,
                      offset=aligned)  # fmt: skip
    except (OSError, ValueError, OverflowError):
        return None
    with warnings.catch_warnings():  # "non-writable buffer": read-only on purpose, see above
        warnings.simplefilter("ignore", UserWarning)
        # frombuffer keeps a reference to the map; it is unmapped when the tensor is freed
        t = torch.frombuffer(m, dtype=info.dtype, count=info.numel, offset=start - aligned)
    return t.reshape(info.shape)


def _read_into(fd: int, buf: memoryview, offset: int, path: str, name: str) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; the syscall runs without the GIL."""
    pos = 0
    while pos < len(buf):
        chunk = buf[pos : pos + _MAX_IO]
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [chunk], offset + pos)
        else:  # platforms without preadv: one extra copy
            data = os.pread(fd, len(chunk), offset + pos)
            n = len(data)
            chunk[:n] = data
        if n == 0:
            raise CheckpointError(
                f"{path}: file ended while reading tensor {name!r} (it shrank after it was "
                f"opened?); {_FIX}."
            )
        pos += n
