"""The MoE config: mergekit-moe's YAML, read unchanged (mergekit 0.1.5, ``mergekit/moe/config.py``).

Keys (mergekit's): ``base_model`` (embeddings, attention, norms, head, and the hidden states the
gates are taken from), ``experts`` (each ``source_model``, ``positive_prompts``,
``negative_prompts``, and the undocumented ``noise_scale`` / ``residual_scale``), ``gate_mode``
(``hidden`` = ``hidden_last``, ``hidden_avg``, ``cheap_embed``, ``random``, ``uniform_random``),
``experts_per_token`` (default 2), ``shared_experts``, ``dtype``, ``architecture`` (a prefix of
``mixtral``, ``qwen``, ``qwen3``, ``deepseek``; unset: the first that fits, Mixtral preferred).

mergeforge additions (optional): ``gate_mode: router_input`` / ``router_input_avg`` (the gate from
the normalised input the router really sees, see ``gates.py``), ``gate_mode: router_fit`` (each
layer's router fitted to tell the experts' prompt tokens apart, see ``gates.py``), ``seed``
(random gates and ``noise_scale``, default 0), ``gate_dtype`` (the base model's dtype while it
runs the prompts, default bfloat16 as mergekit), ``out_shard_size``.

Checked here, before any model is opened (ALGORITHMS.md §6.1): keys (mergekit ignores unknown
keys; a typo such as ``postive_prompts`` is an error here), types, the gate mode, prompts for
every expert when the mode uses them, prompts that differ between experts, ``experts_per_token``
within ``1..len(experts)``, all experts the same model (unless allowed). Warnings: an expert count
that is not a power of two (llama.cpp cannot load it), two experts with identical prompts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeforge.config import (  # mergekit's model reference, one reader
    _model_ref,
    check_keys,
    parse_size,
    read_yaml,
)
from mergeforge.errors import ConfigError

MERGEKIT_GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")
GATE_MODES = (*MERGEKIT_GATE_MODES, "router_input", "router_input_avg", "router_fit")
RANDOM_MODES = ("random", "uniform_random")
GATE_ALIASES = {"hidden_last": "hidden"}
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64",
          "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # fmt: skip
TOP_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts",
            "architecture", "seed", "gate_dtype", "out_shard_size"}  # fmt: skip
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale",
               "residual_scale"}  # fmt: skip


@dataclass(frozen=True)
class Expert:
    """One dense model whose MLPs become an expert (or a shared expert) in every layer."""

    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    """Gaussian noise of this std added to the expert's MLP weights (mergekit's; seeded here)."""
    residual_scale: float | None = None
    """Factor on the expert's ``down_proj`` (its contribution to the residual stream)."""

    def prompts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return self.positive_prompts, self.negative_prompts


@dataclass(frozen=True)
class MoEConfig:
    base_model: str
    experts: tuple[Expert, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: tuple[Expert, ...] = ()
    architecture: str | None = None
    seed: int = 0
    gate_dtype: str = "bfloat16"
    out_shard_size: int = 5_000_000_000
    root: Path | None = None
    """The YAML's folder: relative model paths not found from the current folder are read here."""
    text: str = ""
    """The YAML as given (written to the output as ``mergeforge_config.yml``)."""
    warnings: tuple[str, ...] = ()

    @property
    def uses_prompts(self) -> bool:
        return self.gate_mode not in RANDOM_MODES

    def expert_name(self, i: int) -> str:
        """``experts[i] (path)`` / ``shared_experts[i - n] (path)``: how errors name an expert."""
        n = len(self.experts)
        e = self.experts[i] if i < n else self.shared_experts[i - n]
        where = f"experts[{i}]" if i < n else f"shared_experts[{i - n}]"
        return f"{where} ({e.source_model})"


def _prompts(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{where}: expected a list of strings (prompts), got {value!r}")
    return tuple(value)


def _scale(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _expert(d: Any, where: str) -> Expert:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'source_model:', got {d!r}")
    check_keys(d, EXPERT_KEYS, where)
    if "source_model" not in d:
        raise ConfigError(f"{where}: missing 'source_model:' (a model folder or Hugging Face id)")
    return Expert(
        source_model=_model_ref(d["source_model"], f"{where}.source_model"),
        positive_prompts=_prompts(d.get("positive_prompts"), f"{where}.positive_prompts"),
        negative_prompts=_prompts(d.get("negative_prompts"), f"{where}.negative_prompts"),
        noise_scale=_scale(d.get("noise_scale"), f"{where}.noise_scale"),
        residual_scale=_scale(d.get("residual_scale"), f"{where}.residual_scale"),
    )


def _int(raw: Mapping, key: str, default: int, where: str) -> int:
    v = raw.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where}: {key}: expected an integer, got {v!r}")
    return v


def _dtype(raw: Mapping, key: str, default: str | None, where: str) -> str | None:
    v = raw.get(key)
    if v is None:
        return default
    name = str(v).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"{where}: {key}: {v!r} is not a dtype; use one of "
                          "bfloat16, float16, float32, float64")  # fmt: skip
    return DTYPES[name]


def load_moe_config(
    source: str | Path | Mapping[str, Any] | MoEConfig, *, allow_same_experts: bool = False
) -> MoEConfig:
    """The one constructor of a :class:`MoEConfig`: a YAML path, a YAML string or a mapping in
    mergekit-moe's format (or a ``MoEConfig``, returned as it is). Raises :class:`ConfigError`
    naming the key or expert and the fix; warnings are in ``MoEConfig.warnings``.
    ``allow_same_experts``: accept every expert being the same model (mergekit's
    ``--i-understand-this-is-not-useful-without-training``)."""
    if isinstance(source, MoEConfig):
        return source
    raw, text, root, where = read_yaml(source, "'base_model:' and 'experts:'")
    check_keys(raw, TOP_KEYS, where)
    if "base_model" not in raw:
        raise ConfigError(f"{where}: missing 'base_model:' (it gives attention, embeddings, "
                          "norms and the hidden states of the gates)")  # fmt: skip
    experts_raw = raw.get("experts")
    if not isinstance(experts_raw, list) or not experts_raw:
        raise ConfigError(f"{where}: 'experts:' must be a non-empty list of "
                          "{source_model, positive_prompts, ...}")  # fmt: skip
    shared_raw = raw.get("shared_experts") or []
    if not isinstance(shared_raw, list):
        raise ConfigError(f"{where}: 'shared_experts:' must be a list like 'experts:'")
    mode = raw.get("gate_mode", "hidden")
    mode = GATE_ALIASES.get(mode, mode)
    if mode not in GATE_MODES:
        raise ConfigError(f"{where}: gate_mode: {raw.get('gate_mode')!r} is not a gate mode; "
                          f"use one of {', '.join(GATE_MODES)}")  # fmt: skip
    arch = raw.get("architecture")
    if arch is not None and (not isinstance(arch, str) or not arch.strip()):
        raise ConfigError(f"{where}: architecture: expected a name such as 'mixtral' or 'qwen'")
    seed = _int(raw, "seed", 0, where)
    cfg = MoEConfig(
        base_model=_model_ref(raw["base_model"], "base_model"),
        experts=tuple(_expert(e, f"experts[{i}]") for i, e in enumerate(experts_raw)),
        gate_mode=mode,
        dtype=_dtype(raw, "dtype", None, where),
        experts_per_token=_int(raw, "experts_per_token", 2, where),
        shared_experts=tuple(_expert(e, f"shared_experts[{i}]") for i, e in enumerate(shared_raw)),
        architecture=arch,
        seed=seed,
        gate_dtype=_dtype(raw, "gate_dtype", "bfloat16", where) or "bfloat16",
        out_shard_size=parse_size(raw["out_shard_size"], f"{where}: out_shard_size")
        if raw.get("out_shard_size") is not None
        else 5_000_000_000,
        root=root,
        text=text,
    )
    warnings = _check(cfg, where, allow_same_experts)
    return MoEConfig(**{**cfg.__dict__, "warnings": tuple(warnings)})


def _check(cfg: MoEConfig, where: str, allow_same_experts: bool) -> list[str]:
    """Everything a MoE config can get wrong by itself; returns the warnings."""
    n, k = len(cfg.experts), cfg.experts_per_token
    if not 1 <= k <= n:
        raise ConfigError(
            f"{where}: experts_per_token: {k} with {n} expert(s); each token is sent to "
            f"experts_per_token experts, so it must be between 1 and {n}: lower it or add experts"
        )
    if cfg.uses_prompts:
        for i, e in enumerate((*cfg.experts, *cfg.shared_experts)):
            if not e.positive_prompts:
                raise ConfigError(
                    f"{where}: {cfg.expert_name(i)} has no positive_prompts, but gate_mode "
                    f"{cfg.gate_mode!r} builds each gate from its expert's prompts; give it a "
                    "few prompts that should go to it, or use gate_mode: random"
                )
        first = cfg.experts[0].prompts()
        if n > 1 and all(e.prompts() == first for e in cfg.experts[1:]):
            raise ConfigError(
                f"{where}: every expert has the same positive and negative prompts, so every "
                "gate would be the same vector and the router could not tell the experts apart "
                "(mergekit refuses this too); give each expert prompts of what it should get"
            )
    warnings = []
    if cfg.gate_mode == "router_fit" and any(e.negative_prompts for e in cfg.experts):
        warnings.append("gate_mode router_fit fits each router to the experts' positive prompts; "
                        "negative_prompts are not used")  # fmt: skip
    if cfg.uses_prompts:
        seen: dict[tuple, int] = {}
        for i, e in enumerate(cfg.experts):
            if (j := seen.setdefault(e.prompts(), i)) != i:
                warnings.append(f"{cfg.expert_name(j)} and {cfg.expert_name(i)} have the same "
                                "prompts: their gates are equal and they always tie")  # fmt: skip
    if n > 1 and not allow_same_experts:
        if all(e.source_model == cfg.experts[0].source_model for e in cfg.experts[1:]):
            raise ConfigError(
                f"{where}: all {n} experts are the same model ({cfg.experts[0].source_model}): "
                "the MoE would cost more and compute the same thing. To train it afterwards "
                "anyway, pass --i-understand-this-is-not-useful-without-training "
                "(allow_same_experts=True)"
            )
    if n & (n - 1):
        warnings.append(f"{n} experts is not a power of two: llama.cpp cannot load the model "
                        "(transformers and vLLM can)")  # fmt: skip
    return warnings
