"""Models and merge outputs in memory: the engine's second source and sink besides files.

:class:`MemorySource` is a :class:`~mergeforge.checkpoint.base.TensorSource` over a mapping
``name -> Tensor`` (a state dict, or any lazy mapping that loads a tensor when it is looked
up); :func:`memory_checkpoint` wraps it as the :class:`~mergeforge.checkpoint.base.Checkpoint`
the planner opens for a model named in a config. The same class holds a model's per-model
statistics in memory (with the ``metadata`` a statistics file would carry).

:class:`MemorySink` has the writer's interface the executor uses (``write(name, tensor)``,
declared names, shapes and dtypes, any order, any thread) and collects the tensors instead of
writing them to a file.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from mergeforge.checkpoint.base import Checkpoint, TensorInfo
from mergeforge.errors import CheckpointError


class MemorySource:
    """A lazy mapping name -> tensor, kept in memory by its owner.

    ``get`` returns the mapping's tensor detached (no autograd history), never a copy: the
    engine never writes into an input. ``info`` looks the tensor up too (a lazy mapping loads
    it then, for its shape and dtype, and again when it is merged). ``metadata``: what a
    safetensors header's ``__metadata__`` would hold (read by methods that read sidecars, e.g.
    Fisher's ``fisher_norm``). ``close`` does nothing: the tensors belong to the caller.
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        *,
        path: str = "(in memory)",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(tensors, Mapping):
            raise CheckpointError(
                f"{path}: expected a mapping of tensor name -> torch.Tensor (a state dict), got "
                f"{type(tensors).__name__}."
            )
        self._tensors = tensors
        self.path = path
        self.metadata: dict[str, str] = dict(metadata or {})

    def keys(self) -> list[str]:
        return list(self._tensors.keys())

    def _lookup(self, name: str) -> Tensor:
        try:
            t = self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}.") from None
        if not isinstance(t, Tensor):
            raise CheckpointError(
                f"{self.path}: {name!r} is a {type(t).__name__}, not a torch.Tensor; give the "
                "model as a state dict (name -> tensor)."
            )
        return t

    def info(self, name: str) -> TensorInfo:
        t = self._lookup(name)
        return TensorInfo(name, tuple(t.shape), t.dtype, self.path)

    def get(self, name: str) -> Tensor:
        return self._lookup(name).detach()

    def close(self) -> None:
        pass


def memory_checkpoint(name: str, tensors: Mapping[str, Tensor]) -> Checkpoint:
    """The checkpoint of an in-memory model named ``name`` in a config: no folder, no
    ``config.json`` (so no architecture or tokenizer checks and nothing carried along)."""
    return Checkpoint(source=MemorySource(tensors, path=f"{name} (in memory)"))


class MemorySink:
    """Collects a merge's output tensors, with the interface of the files' writer.

    ``tensors`` declares every output as ``(name, shape, dtype)``; ``write`` refuses an
    undeclared, mis-shaped or repeated tensor as the files' writer does. Each written tensor
    is copied into the sink's own memory, so the result never shares storage with an input (a
    tensor copied unchanged, or a method that returns one of its inputs), nor with a memory map
    of a file. :meth:`result` returns them in declaration order once all are written.
    """

    def __init__(self, tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name, shape, dtype in tensors:
            if name in self._specs:
                raise CheckpointError(f"tensor {name!r} is declared twice; names must be unique.")
            self._specs[name] = (tuple(int(s) for s in shape), dtype)
        self._out: dict[str, Tensor] = {}
        self._lock = threading.Lock()

    def write(self, name: str, tensor: Tensor) -> None:
        """Store one declared tensor (any order, any thread); it must match its declaration."""
        spec = self._specs.get(name)
        if spec is None:
            raise CheckpointError(f"(in memory): tensor {name!r} was not declared.")
        if (tuple(tensor.shape), tensor.dtype) != spec:
            raise CheckpointError(
                f"(in memory): tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype} but was "
                f"declared {spec[0]} {spec[1]}; cast/reshape it before writing."
            )
        copy = tensor.detach().clone(memory_format=torch.contiguous_format)
        with self._lock:
            if name in self._out:
                raise CheckpointError(f"(in memory): tensor {name!r} was written twice.")
            self._out[name] = copy

    def __enter__(self) -> MemorySink:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def result(self) -> dict[str, Tensor]:
        """Every declared tensor, in declaration order; a CheckpointError names one missing."""
        missing = [n for n in self._specs if n not in self._out]
        if missing:
            raise CheckpointError(
                f"(in memory): {len(missing)} declared tensor(s) were never written, e.g. "
                f"{missing[0]!r} (a bug in the engine: please report it)."
            )
        return {name: self._out[name] for name in self._specs}
