"""Open the base and the experts (headers only) and check they can form one MoE.

Everything that needs the models but not their weights is checked here, before any tensor is
read or a model is run (ALGORITHMS.md §6.1; mergekit checks only the ``model_type``): each input
has a ``config.json`` of the same architecture as the base, the same hidden size, intermediate
size and depth; every expert stores the dense MLP weights of every layer with the base's shapes;
the base stores embeddings, attention, norms; prompt modes find the base's tokenizer. Errors name
the expert (``experts[1] (path)``), the file or tensor, and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergeforge.checkpoint import Checkpoint, open_checkpoint
from mergeforge.checkpoint.loader import resolve_model_spec
from mergeforge.errors import CheckpointError, ValidationError
from mergeforge.moe.config import MoEConfig
from mergeforge.moe.layout import EMBED, NORM, PROJ, attention_names, mlp_name

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def open_inputs(cfg: MoEConfig) -> tuple[list[str], list[Checkpoint], list[int]]:
    """``(models, checkpoints, roles)``: each distinct model reference once (the base first),
    its opened checkpoint, and for each expert then shared expert the index of its checkpoint.
    Closes what it opened if one fails; the error names the role."""
    specs = [("base_model", cfg.base_model)]
    specs += [(cfg.expert_name(i), e.source_model)
              for i, e in enumerate((*cfg.experts, *cfg.shared_experts))]  # fmt: skip
    models: list[str] = []
    cks: list[Checkpoint] = []
    try:
        for role, spec in specs:
            if spec in models:
                continue
            try:
                cks.append(open_checkpoint(resolve_model_spec(spec, cfg.root)))
            except CheckpointError as e:
                raise CheckpointError(f"{role}: {e}") from None
            models.append(spec)
    except BaseException:
        for ck in cks:
            ck.close()
        raise
    return models, cks, [models.index(spec) for _, spec in specs[1:]]


def _config(ck: Checkpoint, role: str, *, sizes: bool = True) -> dict[str, Any]:
    if ck.config is None or "model_type" not in ck.config:
        raise ValidationError(
            f"{role}: no config.json with a model_type beside the weights ({ck.path}); the MoE "
            "needs each model's architecture and sizes: pass the model's Hugging Face folder"
        )
    missing = [k for k in SHAPE_KEYS if not isinstance(ck.config.get(k), int)]
    if missing and sizes:
        raise ValidationError(f"{role}: {Path(str(ck.folder)) / 'config.json'} has no "
                              f"{', '.join(missing)}; pass a complete model folder")  # fmt: skip
    return dict(ck.config)


def check_inputs(cfg: MoEConfig, cks: Sequence[Checkpoint], roles: Sequence[int]) -> dict:
    """Check architectures, sizes and tensors; returns the base's ``config.json`` mapping."""
    base_cfg = _config(cks[0], "base_model")
    mtype = base_cfg["model_type"]
    for i, r in enumerate(roles):
        name = cfg.expert_name(i)
        c = _config(cks[r], name, sizes=False)
        if c["model_type"] != mtype:
            raise ValidationError(
                f"{name}: model_type {c['model_type']!r}, but the base model is {mtype!r}; "
                "every expert must be a fine-tune of the base's architecture (its MLPs go "
                "behind the base's attention)"
            )
        for k in SHAPE_KEYS:
            if c.get(k) != base_cfg[k]:
                raise ValidationError(
                    f"{name}: {k} = {c.get(k)}, but the base model's is {base_cfg[k]} "
                    f"({cks[0].path}); experts must have the base's sizes: use fine-tunes of "
                    "the same base model"
                )
    for key in ("attention_bias", "mlp_bias"):
        if base_cfg.get(key):
            raise ValidationError(
                f"base_model: config.json has {key}: true; the MoE layouts hold no such bias, "
                "and dropping it would change the model. Use a base without it."
            )
    _check_tensors(cfg, cks, roles, base_cfg)
    if cfg.uses_prompts:
        folder = cks[0].folder
        if folder is None or not any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):
            raise ValidationError(
                f"base_model: no tokenizer in {folder or cks[0].path}; gate_mode "
                f"{cfg.gate_mode!r} tokenizes the prompts with the base's tokenizer: add its "
                "tokenizer files, or use gate_mode: random"
            )
    return base_cfg


def _need(ck: Checkpoint, names: set[str], role: str, name: str, shape=None) -> None:
    if name not in names:
        raise ValidationError(f"{role}: {ck.path} has no tensor {name!r}; a dense llama-style "
                              "checkpoint of the base's architecture is needed")  # fmt: skip
    got = ck.info(name).shape
    if shape is not None and got != shape:
        raise ValidationError(f"{role}: tensor {name!r} in {ck.info(name).file} is {list(got)}, "
                              f"expected {list(shape)} (the base's sizes)")  # fmt: skip


def _check_tensors(cfg: MoEConfig, cks, roles, base_cfg: dict) -> None:
    H, inter, layers = (base_cfg[k] for k in SHAPE_KEYS)
    base, keys = cks[0], [set(ck.keys()) for ck in cks]
    _need(base, keys[0], "base_model", EMBED)
    if base.info(EMBED).shape[-1] != H:
        raise ValidationError(f"base_model: {EMBED} is {list(base.info(EMBED).shape)}, but "
                              f"hidden_size is {H}; check the base's config.json")  # fmt: skip
    _need(base, keys[0], "base_model", NORM, (H,))
    for i in range(layers):
        for n in attention_names(i):
            _need(base, keys[0], "base_model", n)
    for e, r in enumerate(roles):
        for i in range(layers):
            for proj in PROJ:
                shape = (H, inter) if proj == "down_proj" else (inter, H)
                _need(cks[r], keys[r], cfg.expert_name(e), mlp_name(i, proj), shape)
