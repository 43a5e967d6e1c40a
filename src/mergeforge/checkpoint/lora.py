"""A PEFT LoRA adapter applied to its base model on the fly (``BASE+ADAPTER`` specs).

For an adapted module with ``lora_A`` (r, in) and ``lora_B`` (out, r) the merged weight is
``W + s * (B @ A)``, transposed for ``fan_in_fan_out`` layers (GPT-2 ``Conv1D``), and for
embeddings ``W + s * (B @ A).T`` with ``lora_embedding_A`` (r, vocab), ``lora_embedding_B``
(dim, r). ``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023), where
``rank_pattern``/``alpha_pattern`` override ``r``/``lora_alpha`` per module, matched as PEFT does.
``modules_to_save`` (and saved ``base_layer`` weights) replace the base tensor whole. LoRA
(Hu et al. 2021). The sum is taken in float32 and rounded once to the base dtype.

Everything is validated at open from the headers: every adapter tensor must map to a base tensor
of the right shape. Unsupported: DoRA, conv LoRA, trainable tokens, layer replication.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergeforge.checkpoint.base import Checkpoint, TensorInfo, TensorSource
from mergeforge.checkpoint.safetensors_file import SafetensorsFile
from mergeforge.checkpoint.torch_file import TorchFile
from mergeforge.errors import CheckpointError

_PREFIX = "base_model.model."
# ``<module>.lora_A[.<adapter name>].weight`` and ``<module>.lora_embedding_A[.<adapter name>]``
_LINEAR = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.(?P<param>weight|bias)$"
)
_EMBEDDING = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$"
)
_UNSUPPORTED = ("lora_magnitude_vector", "token_adapter", "trainable_tokens", "lora_")


@dataclass(frozen=True)
class _Delta:
    a: str
    b: str
    scale: float
    transpose: bool


def _pattern_value(pattern: dict[str, Any], module: str, default: float) -> float:
    """PEFT's rule: the first pattern key that matches the end of the module path wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{folder}: not a PEFT adapter folder (no adapter_config.json)."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); fix or re-save it.") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only); merge "
            "it into its base with peft's merge_and_unload() and pass the result."
        )
    for key in ("use_dora", "layer_replication", "trainable_token_indices"):
        if cfg.get(key):
            raise CheckpointError(
                f"{path}: {key} is not supported; merge the adapter with peft's "
                "merge_and_unload(), save the model and pass that folder instead."
            )
    return cfg


def _open_adapter_weights(folder: Path) -> TensorSource:
    if (folder / "adapter_model.safetensors").is_file():
        return SafetensorsFile(folder / "adapter_model.safetensors")
    if (folder / "adapter_model.bin").is_file():
        return TorchFile(folder / "adapter_model.bin")
    raise CheckpointError(
        f"{folder}: no adapter_model.safetensors or adapter_model.bin beside adapter_config.json."
    )


class LoraSource:
    """A :class:`~mergeforge.checkpoint.base.TensorSource`: base tensors with the adapter merged."""

    def __init__(self, base: Checkpoint, adapter_dir: str | Path) -> None:
        self._folder = Path(adapter_dir)
        self._base = base
        self.path = f"{base.path}+{self._folder}"
        cfg = read_adapter_config(self._folder)
        self._adapter = _open_adapter_weights(self._folder)
        try:
            self._build(cfg)
        except BaseException:
            self._adapter.close()
            raise

    def _build(self, cfg: dict[str, Any]) -> None:
        base_keys = set(self._base.keys())
        self._deltas: dict[str, _Delta] = {}
        self._bias: dict[str, tuple[str, float]] = {}  # base bias -> (lora_B.bias key, scale)
        self._overrides: dict[str, str] = {}  # base name -> adapter key replacing it whole
        pairs: dict[str, dict[str, str]] = {}
        for key in self._adapter.keys():
            name = key.removeprefix(_PREFIX)
            m = _LINEAR.match(name) or _EMBEDDING.match(name)
            if m:
                bias = m.groupdict().get("param") == "bias"
                kind = m["kind"] + (".bias" if bias else "")
                pairs.setdefault(m["module"], {})[kind] = key
            elif any(tag in name for tag in _UNSUPPORTED):
                raise CheckpointError(
                    f"{self._folder}: adapter tensor {key!r} is of a kind mergeforge cannot "
                    "apply (DoRA, trainable tokens?); merge with peft's merge_and_unload() instead."
                )
            else:  # modules_to_save copy, or a saved base_layer weight
                name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name).replace(".base_layer.", ".")
                target = self._resolve(key, name, base_keys)
                self._check_shape(key, target, self._adapter.info(key).shape)
                self._overrides[target] = key
        rslora = bool(cfg.get("use_rslora"))
        for module, parts in pairs.items():
            emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a_key = parts.get("lora_embedding_A" if emb else "lora_A")
            b_key = parts.get("lora_embedding_B" if emb else "lora_B")
            if a_key is None or b_key is None:
                raise CheckpointError(
                    f"{self._folder}: module {module!r} has only one of lora_A/lora_B; "
                    "the adapter is incomplete, re-save it."
                )
            a, b = self._adapter.info(a_key).shape, self._adapter.info(b_key).shape
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise CheckpointError(
                    f"{self._folder}: {a_key!r} {a} and {b_key!r} {b} are not a linear LoRA pair "
                    "(conv LoRA is not supported); merge with peft's merge_and_unload() instead."
                )
            r = a[0]
            r_cfg = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", r))
            if r_cfg != r:
                raise CheckpointError(
                    f"{self._folder}: adapter_config.json gives rank {r_cfg} for {module!r} but "
                    f"{a_key!r} has rank {r}; the config does not belong to these weights."
                )
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r))
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            transpose = emb or bool(cfg.get("fan_in_fan_out"))
            shape = (b[0], a[1])[::-1] if transpose else (b[0], a[1])
            target = self._resolve(a_key, f"{module}.weight", base_keys)
            self._check_shape(a_key, target, shape)
            self._deltas[target] = _Delta(a_key, b_key, scale, transpose)
            if (bias_key := parts.get("lora_B.bias")) is not None:
                bias = self._resolve(bias_key, f"{module}.bias", base_keys)
                self._check_shape(bias_key, bias, self._adapter.info(bias_key).shape)
                self._bias[bias] = (bias_key, scale)

    def _resolve(self, key: str, name: str, base_keys: set[str]) -> str:
        """Base tensor for an adapter tensor: exact name, then dropping or adding a prefix
        (a base saved as ``LlamaModel`` lacks the ``model.`` of ``LlamaForCausalLM``)."""
        if name in base_keys:
            return name
        parts = name.split(".")
        for i in range(1, len(parts) - 1):
            if (shorter := ".".join(parts[i:])) in base_keys:
                return shorter
        hits = [k for k in base_keys if k.endswith("." + name)]
        if len(hits) == 1:
            return hits[0]
        raise CheckpointError(
            f"{self._folder}: adapter tensor {key!r} (for {name!r}) matches "
            f"{'several' if hits else 'no'} tensor{'s' if hits else ''} of the base "
            f"{self._base.path}; is this adapter for a different base model?"
        )

    def _check_shape(self, key: str, target: str, shape: tuple[int, ...]) -> None:
        want = self._base.info(target).shape
        if tuple(shape) != tuple(want):
            raise CheckpointError(
                f"{self._folder}: adapter tensor {key!r} gives shape {tuple(shape)} for "
                f"{target!r}, but the base {self._base.path} has {tuple(want)}; is this adapter "
                "for a different base model (or a resized vocabulary)?"
            )

    def keys(self) -> list[str]:
        return self._base.keys()

    def info(self, name: str) -> TensorInfo:
        return self._base.info(name)

    def get(self, name: str) -> Tensor:
        dtype = self._base.info(name).dtype
        key = self._overrides.get(name)
        w = self._base.get(name) if key is None else self._adapter.get(key)
        delta, bias = self._deltas.get(name), self._bias.get(name)
        if delta is None and bias is None:
            return w.to(dtype)
        acc = w.to(torch.promote_types(dtype, torch.float32))
        if delta is not None:
            a = self._adapter.get(delta.a).to(acc.dtype)
            b = self._adapter.get(delta.b).to(acc.dtype)
            ba = b @ a
            acc = acc + (ba.T if delta.transpose else ba) * delta.scale
        if bias is not None:
            acc = acc + self._adapter.get(bias[0]).to(acc.dtype) * bias[1]
        return acc.to(dtype)

    def close(self) -> None:
        self._adapter.close()
        self._base.close()
