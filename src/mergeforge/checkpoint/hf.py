"""Hugging Face model folders: where the weights are, ``config.json``, and the carried files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergeforge.errors import CheckpointError

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""Looked for in this order (the order ``transformers`` prefers)."""

CARRIED_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    # sentence-transformers
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)
"""Carried files: the non-weight files (paths relative to the model folder: config, tokenizer,
processor, sentence-transformers pooling) that a merged model carries over from its inputs."""


def find_weights(folder: Path) -> Path:
    """The weights file or index of a model folder; CheckpointError saying what was looked for."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    if (folder / "adapter_config.json").is_file():
        raise CheckpointError(
            f"{folder} is a PEFT adapter, not a model; name its base model too: 'BASE+{folder}'."
        )
    # Non-standard names: accept exactly one safetensors file or one index.
    for pattern in ("*.safetensors.index.json", "*.safetensors"):
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(
                f"{folder}: several {pattern} files and no index "
                f"({', '.join(f.name for f in found)}); pass the file to use, or add a "
                "model.safetensors.index.json."
            )
    raise CheckpointError(
        f"{folder}: no weights found (looked for {', '.join(WEIGHT_FILES)}); "
        "pass a model folder or a weights file."
    )


def read_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); fix or re-download it.") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object; fix or re-download it.")
    return config


def carried_files(folder: Path) -> list[Path]:
    """The :data:`CARRIED_FILES` present in ``folder`` (in that order)."""
    return [folder / rel for rel in CARRIED_FILES if (folder / rel).is_file()]
