"""Sidecars: the files of per-model statistics kept beside a model, what they record, and how
stale ones are refused.

Data-using methods (RegMean, Fisher) read statistics of each input model that only data can give.
They are computed once per model (``mergeforge stats``, a bench suite, later a training recorder)
and written as a *sidecar* beside its weights, so every later merge reuses them:

* a model folder ``M/`` -> ``M/mergeforge-stats/<kind>.safetensors``;
* a single weights file ``W.safetensors`` (or ``W.bin``) ->
  ``W.safetensors.mergeforge-stats/<kind>.safetensors``, a sibling folder named after the file.

``kind`` is ``regmean`` (input Grams, (in, in) per linear weight), ``fisher-empirical`` /
``fisher-sampled`` (diagonal Fisher, the shape of each parameter) or ``curvature`` (second moments
of the gradients recorded while the model was trained: ``P:R``, ``P:C`` and optional ``P:S``,
``P:v`` per parameter ``P``, written by :mod:`mergeforge.train.artifact`, which documents them;
no data pass remakes them, only training again: :data:`CURVATURE_COMMAND`). Tensors are keyed by
the parameter name in the checkpoint (``encoder.layer.0.attention.self.query.weight``), fp32.

The safetensors metadata records ``kind``, ``num_examples`` (asked for), ``examples_used``,
``source`` (what data), ``mergeforge_version`` and ``weights_fingerprint``: a hash of each weight
file's name, size, header and 16 blocks of 4 KiB spread through it. It ignores modification times
(copying a model with its statistics keeps them valid) yet changes when the weights are retrained
(every block changes), at the cost of reading ~64 KiB a file. A mismatch is refused.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from mergeforge.checkpoint.atomic import atomic_file
from mergeforge.errors import CheckpointError, ValidationError
from mergeforge.version import __version__

SIDECAR_DIR = "mergeforge-stats"
KINDS = ("regmean", "fisher-empirical", "fisher-sampled", "curvature")
# How a missing or stale ``curvature`` sidecar is made again ({model}: the model's path): the
# ``command`` that :func:`open_sidecar` and the methods reading it show. One text, used by
# mergeforge.train (which writes the file) and by the methods (which cannot import train).
CURVATURE_COMMAND = (
    "training {model} again with the curvature recorder: trainer.add_callback("
    "mergeforge.train.CurvatureCallback()) then callback.save('{model}') after "
    "trainer.save_model('{model}'), or mergeforge.train.CurvatureRecorder(model, optimizer=opt) "
    "in a plain loop then recorder.save('{model}') after model.save_pretrained('{model}') "
    "(README: Train merge-ready experts)"
)
_BLOCKS, _BLOCK = 16, 4096


def sidecar_dir(model: str | os.PathLike[str]) -> Path:
    """The folder holding ``model``'s sidecars (see the module docstring)."""
    p = Path(os.fspath(model))
    if "+" in p.name and not p.exists():
        raise CheckpointError(f"{model}: statistics of a BASE+ADAPTER spec are not supported; "
                              "merge the adapter into its base first")  # fmt: skip
    return p / SIDECAR_DIR if p.is_dir() else p.with_name(p.name + "." + SIDECAR_DIR)


def sidecar_path(model: str | os.PathLike[str], kind: str) -> Path:
    """The sidecar holding ``model``'s ``kind`` statistics (it may not exist yet)."""
    if kind not in KINDS:
        raise ValueError(f"unknown statistics kind {kind!r}; known: {KINDS}")
    return sidecar_dir(model) / f"{kind}.safetensors"


def weight_files(model: str | os.PathLike[str]) -> list[Path]:
    """The files holding ``model``'s tensors (one, or every shard), sorted."""
    from mergeforge.checkpoint import open_checkpoint

    ck = open_checkpoint(model)
    try:
        return sorted({Path(ck.info(k).file) for k in ck.keys()})
    finally:
        ck.close()


def weights_fingerprint(model: str | os.PathLike[str]) -> str:
    """A 16-hex-digit hash of the weight files' names, sizes, first 64 KiB and 16 sampled 4 KiB
    blocks (see the module docstring for why not mtimes)."""
    h = hashlib.sha256()
    for f in weight_files(model):
        size = f.stat().st_size
        h.update(f"{f.name}:{size};".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
            for i in range(_BLOCKS):
                fh.seek(max(0, (size - _BLOCK) * i // max(1, _BLOCKS - 1)))
                h.update(fh.read(_BLOCK))
    return h.hexdigest()[:16]


def save_sidecar(
    model: str | os.PathLike[str],
    kind: str,
    tensors: Mapping[str, Tensor],
    *,
    num_examples: int,
    examples_used: int,
    source: str,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` (fp32, contiguous, CPU) as ``model``'s ``kind`` sidecar, atomically
    (:func:`~mergeforge.checkpoint.atomic.atomic_file`), with the metadata of the module
    docstring. Returns the path."""
    from safetensors.torch import save_file

    path = sidecar_path(model, kind)
    meta = {
        "format": "pt",
        "kind": kind,
        "num_examples": str(num_examples),
        "examples_used": str(examples_used),
        "source": source,
        "mergeforge_version": __version__,
        "weights_fingerprint": weights_fingerprint(model),
        **{k: str(v) for k, v in (extra or {}).items()},
    }
    data = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file(data, str(tmp), metadata=meta)
    except OSError as e:
        raise CheckpointError(
            f"cannot write the {kind} statistics of {model} into {path.parent} "
            f"({e.strerror or e}" + (f": {e.filename}" if e.filename else "") + "); make that "
            "folder writable (or move away a file that is in its way) and run again."
        ) from None
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (header only)."""
    import json

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return dict(json.loads(f.read(n)).get("__metadata__") or {})


def open_sidecar(
    model: str | os.PathLike[str],
    kind: str,
    *,
    command: str,
    num_examples: int | None = None,
):
    """Open ``model``'s ``kind`` sidecar lazily (a :class:`SafetensorsFile`: positional reads,
    tensors on demand), refusing a missing, foreign, stale or differently sized one with a
    :class:`ValidationError` that names the model and ``command`` (which creates the file)."""
    from mergeforge.checkpoint.safetensors_file import SafetensorsFile

    path = sidecar_path(model, kind)
    fix = f"Create them with: {command}"
    if not path.is_file():
        raise ValidationError(f"missing statistics: {model} has no {kind} statistics "
                              f"({path} does not exist). {fix}")  # fmt: skip
    f = SafetensorsFile(path)
    meta = f.metadata
    problem = None
    try:  # weights_fingerprint reads the model and may raise: close f then too
        if meta.get("kind") != kind:
            problem = f"it holds {meta.get('kind')!r} statistics, not {kind!r}"
        elif meta.get("weights_fingerprint") != weights_fingerprint(model):
            problem = "the model's weights changed since they were computed (stale statistics)"
        elif num_examples is not None and meta.get("num_examples") != str(num_examples):
            problem = (f"they were computed on num_examples={meta.get('num_examples')}, but the "
                       f"config asks for num_examples={num_examples}")  # fmt: skip
    except BaseException:
        f.close()
        raise
    if problem is not None:
        f.close()
        raise ValidationError(f"unusable statistics: {path} for {model}: {problem}. "
                              f"Recompute them with: {command}")  # fmt: skip
    return f
