"""``open_checkpoint``: one entry point for every input a merge config can name."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mergeforge.checkpoint.base import Checkpoint, TensorInfo
from mergeforge.checkpoint.hf import find_weights, read_config
from mergeforge.checkpoint.hub import parse_hub_ref, resolve_hub
from mergeforge.checkpoint.lora import LoraSource
from mergeforge.checkpoint.sharded import ShardedSource, open_weights_file
from mergeforge.errors import CheckpointError


def _missing(path: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: no such file or folder (nor a Hugging Face id `org/name[@revision]`); check "
        "the path: relative paths are read from the current folder, then the config's folder."
    )


def _local(part: str, root: Path | None) -> str | None:
    """``part`` as an existing local path: as given (absolute, or relative to the current
    folder), else relative to ``root`` (a config's folder); ``None`` if neither exists."""
    if os.path.exists(part):
        return part
    if root is not None and not os.path.isabs(part) and (root / part).exists():
        return str(root / part)
    return None


def split_lora_spec(spec: str, root: Path | None = None) -> tuple[str, str] | None:
    """``BASE+ADAPTER`` -> ``(BASE, ADAPTER)``; ``None`` if ``spec`` exists as-is or has no ``+``.

    Each side is a local path (as given, or relative to ``root``) or a Hugging Face id
    (``org/name[@revision]``, which never contains ``+``). Paths may contain ``+``: the split
    chosen is the one where both sides exist locally; failing that, the one where each side
    exists locally or is a Hub id; failing that, the first where the base exists (so the error
    names the missing adapter), else the last.
    """
    if "+" not in spec or _local(spec, root) is not None:
        return None
    splits = [(spec[:i], spec[i + 1 :]) for i, c in enumerate(spec) if c == "+"]

    def local(side: str) -> bool:
        return _local(side, root) is not None

    def usable(side: str) -> bool:
        return local(side) or parse_hub_ref(side) is not None

    both = [s for s in splits if local(s[0]) and local(s[1])]
    if len(both) > 1:
        raise CheckpointError(
            f"{spec}: ambiguous BASE+ADAPTER spec, it splits into existing paths "
            f"{' or '.join(repr(b) + ' + ' + repr(a) for b, a in both)}; rename one of them."
        )
    return (
        both
        or [s for s in splits if usable(s[0]) and usable(s[1])]
        or [s for s in splits if local(s[0])]
        or splits[-1:]
    )[0]


def locate(spec: str, root: Path | None = None) -> tuple[str, str | None]:
    """A model reference as local paths: ``(model, adapter or None)``.

    ``spec`` is a local path (as given, then relative to ``root``; a local path always wins), a
    Hugging Face id ``org/name`` or ``org/name@revision`` (resolved to its snapshot folder in
    the local Hugging Face cache, downloaded first when the Hub may be used: see ``hub``), or
    ``BASE+ADAPTER`` with each side either of those. Raises :class:`CheckpointError` naming
    what is missing and how to get it.
    """
    if (path := _local(spec, root)) is not None:
        return path, None
    parts = split_lora_spec(spec, root)
    if parts is None:
        if (ref := parse_hub_ref(spec)) is not None:
            return str(resolve_hub(ref)), None
        raise _missing(spec)
    base_spec, adapter_spec = parts
    base, adapter = _local(base_spec, root), _local(adapter_spec, root)
    base_ref = parse_hub_ref(base_spec) if base is None else None
    adapter_ref = parse_hub_ref(adapter_spec) if adapter is None else None
    if base is None and base_ref is None:
        raise CheckpointError(
            f"{spec}: no such file or folder, nor, read as BASE+ADAPTER, the base {base_spec}"
            + ("" if adapter or adapter_ref else f" or the adapter {adapter_spec}")
            + "."
        )
    if adapter_ref is None and (adapter is None or not os.path.isdir(adapter)):
        raise CheckpointError(
            f"{spec}: read as BASE+ADAPTER, the adapter {adapter_spec} "
            + ("is not a folder" if adapter is not None else "does not exist")
            + "; it must be a PEFT adapter folder (adapter_config.json + "
            "adapter_model.safetensors) or a Hugging Face id of one."
        )
    if base_ref is not None:
        base = str(resolve_hub(base_ref))
    if adapter_ref is not None:
        adapter = str(resolve_hub(adapter_ref, adapter=True))
    return base, adapter


def resolve_model_spec(spec: str, root: Path | None = None) -> str:
    """:func:`locate` as one string that :func:`open_checkpoint` opens: the model's local path,
    or ``BASE+ADAPTER`` of local paths (Hub ids replaced by their cache snapshot folders)."""
    base, adapter = locate(spec, root)
    return base if adapter is None else f"{base}+{adapter}"


def _open_path(path: Path) -> Checkpoint:
    if not path.exists():
        raise _missing(str(path))
    if path.is_dir():
        weights = find_weights(path)
        if weights.name.endswith(".json"):
            source = ShardedSource(weights)
        else:
            source = open_weights_file(weights)
        try:
            config = read_config(path)
        except BaseException:
            source.close()
            raise
        return Checkpoint(source=source, folder=path, config=config)
    if path.name.endswith(".index.json"):
        return Checkpoint(source=ShardedSource(path))
    return Checkpoint(source=open_weights_file(path))


def open_checkpoint(spec: str | os.PathLike[str]) -> Checkpoint:
    """Open a model lazily: a safetensors/torch file, a shard index, a Hugging Face folder, a
    Hugging Face id ``org/name[@revision]`` (from the local cache, see :func:`locate`), or
    ``BASE+ADAPTER`` (a PEFT LoRA adapter folder or id applied to BASE on the fly). Only a
    ``str`` is parsed as an id or ``BASE+ADAPTER``; a ``Path`` is always a local path.

    Only headers are read here (torch pickles are loaded, see ``torch_file``); every structural
    problem raises :class:`~mergeforge.errors.CheckpointError` now, not mid-merge.
    """
    if isinstance(spec, str):
        base_spec, adapter = locate(spec)
        if adapter is None:
            return _open_path(Path(base_spec))
        base = _open_path(Path(base_spec))
        try:
            return Checkpoint(LoraSource(base, adapter), folder=base.folder, config=base.config)
        except BaseException:
            base.close()
            raise
    return _open_path(Path(os.fspath(spec)))


@dataclass(frozen=True)
class CheckpointSummary:
    num_tensors: int
    total_params: int
    total_bytes: int
    params_by_dtype: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        dtypes = ", ".join(f"{d}: {n:,}" for d, n in self.params_by_dtype.items())
        return (
            f"{self.num_tensors:,} tensors, {self.total_params:,} parameters, "
            f"{self.total_bytes / 2**20:,.1f} MiB ({dtypes})"
        )


def inspect_checkpoint(spec: str | os.PathLike[str]) -> list[TensorInfo]:
    """Names, shapes, dtypes and files of every tensor, in the checkpoint's order."""
    ckpt = open_checkpoint(spec)
    try:
        return [ckpt.info(k) for k in ckpt.keys()]
    finally:
        ckpt.close()


def summarize(infos: list[TensorInfo]) -> CheckpointSummary:
    """Totals for ``mergeforge inspect``: tensor count, parameters, bytes, parameters per dtype."""
    by_dtype: Counter[str] = Counter()
    for i in infos:
        by_dtype[str(i.dtype).removeprefix("torch.")] += i.numel
    return CheckpointSummary(
        num_tensors=len(infos),
        total_params=sum(i.numel for i in infos),
        total_bytes=sum(i.nbytes for i in infos),
        params_by_dtype=dict(by_dtype.most_common()),
    )
