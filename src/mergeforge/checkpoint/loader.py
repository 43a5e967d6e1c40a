"""``open_checkpoint``: one entry point for every input a merge config can name."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mergeforge.checkpoint.base import Checkpoint, TensorInfo
from mergeforge.checkpoint.hf import find_weights, read_config
from mergeforge.checkpoint.lora import LoraSource
from mergeforge.checkpoint.sharded import ShardedSource, open_weights_file
from mergeforge.errors import CheckpointError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _missing(path: str) -> CheckpointError:
    msg = f"{path}: no such file or folder."
    if _HUB_ID.fullmatch(path):
        msg += (
            " It looks like a Hugging Face Hub id, but mergeforge works offline: download it "
            f"first (`hf download {path} --local-dir DIR`) and pass the local folder."
        )
    return CheckpointError(msg)


def split_lora_spec(spec: str) -> tuple[str, str] | None:
    """``BASE+ADAPTER`` -> ``(BASE, ADAPTER)``; ``None`` if ``spec`` exists as-is or has no ``+``.

    Paths may contain ``+``: the split chosen is the one where both sides exist; failing that,
    the first where the base exists (so the error names the missing adapter), else the last.
    """
    if "+" not in spec or os.path.exists(spec):
        return None
    splits = [(spec[:i], spec[i + 1 :]) for i, c in enumerate(spec) if c == "+"]
    both = [s for s in splits if os.path.exists(s[0]) and os.path.exists(s[1])]
    if len(both) > 1:
        raise CheckpointError(
            f"{spec}: ambiguous BASE+ADAPTER spec, it splits into existing paths "
            f"{' or '.join(repr(b) + ' + ' + repr(a) for b, a in both)}; rename one of them."
        )
    return (both or [s for s in splits if os.path.exists(s[0])] or splits[-1:])[0]


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
    """Open a model lazily: a safetensors/torch file, a shard index, a Hugging Face folder, or
    ``BASE+ADAPTER`` (a PEFT LoRA adapter folder applied to BASE on the fly).

    Only headers are read here (torch pickles are loaded, see ``torch_file``); every structural
    problem raises :class:`~mergeforge.errors.CheckpointError` now, not mid-merge.
    """
    if isinstance(spec, str) and (parts := split_lora_spec(spec)) is not None:
        base_spec, adapter = parts
        if not os.path.exists(base_spec):
            raise CheckpointError(
                f"{spec}: no such file or folder, nor, read as BASE+ADAPTER, the base {base_spec}"
                + ("" if os.path.exists(adapter) else f" or the adapter {adapter}")
                + "."
            )
        if not os.path.isdir(adapter):
            raise CheckpointError(
                f"{spec}: read as BASE+ADAPTER, the adapter {adapter} "
                + ("is not a folder" if os.path.exists(adapter) else "does not exist")
                + "; it must be a PEFT adapter folder (adapter_config.json + "
                "adapter_model.safetensors)."
            )
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
