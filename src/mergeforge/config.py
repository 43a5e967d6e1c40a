"""The merge configuration: a superset of mergekit's YAML.

Everything a mergekit YAML may say for a method both tools support means the same here:
``merge_method``, ``base_model``, ``models`` (with per-model ``parameters``), ``slices`` (with
``sources`` and ``layer_range``), global ``parameters``, ``dtype``, ``out_dtype``,
``tokenizer_source: base``. Parameter values may be scalars, gradients (lists interpolated over
depth) or filter lists (``[{filter: mlp, value: 0.5}, {value: 1}]``), with mergekit's precedence:
per-model > slice > global.

mergeforge additions (all optional):

``seed`` (int, default 0)
    Seed for stochastic methods (DARE, DELLA). Each tensor gets its own generator seeded from
    (seed, tensor name), so results do not depend on order, device threads or resumption.
``out_shard_size`` (bytes or "5GB"/"500MB", default 5 GB)
    Output shard size.
``allow_vocab_mismatch`` (bool, default false)
    Merge even when the inputs' tokenizers disagree (the default refuses: rows would not align).
``exclude`` (list of regexes)
    Output tensors whose name matches keep the base model's value (or the first model's).
``check_finite`` (bool, default true)
    Refuse inputs containing NaN/Inf (checked as each tensor is read).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergeforge.errors import ConfigError

TOP_LEVEL_KEYS = {
    # mergekit
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name", "modules",
    # mergeforge
    "seed", "out_shard_size", "allow_vocab_mismatch", "exclude", "check_finite",
}  # fmt: skip

DTYPES = {"float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16"}

Setting = Any  # scalar | list (gradient) | list of {filter, value}


@dataclass(frozen=True)
class InputModel:
    model: str
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[InputModel, ...]
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    base_model: str | None = None


@dataclass(frozen=True)
class MergeConfig:
    merge_method: str
    models: tuple[InputModel, ...] = ()
    slices: tuple[OutputSlice, ...] = ()
    base_model: str | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    seed: int = 0
    out_shard_size: int = 5_000_000_000
    allow_vocab_mismatch: bool = False
    exclude: tuple[str, ...] = ()
    check_finite: bool = True
    source_text: str = ""
    """The YAML as given (copied to the output folder)."""
    root: Path | None = None
    """Folder relative model paths are resolved against (the YAML's folder)."""

    def referenced_models(self) -> list[str]:
        """Every model path, base first, each once, in order of appearance."""
        seen: list[str] = []
        for m in [self.base_model] if self.base_model else []:
            seen.append(m)
        for src in self.models:
            if src.model not in seen:
                seen.append(src.model)
        for sl in self.slices:
            if sl.base_model and sl.base_model not in seen:
                seen.append(sl.base_model)
            for src in sl.sources:
                if src.model not in seen:
                    seen.append(src.model)
        return seen

    def to_yaml(self) -> str:
        return self.source_text


def _model_ref(value: Any, where: str) -> str:
    if isinstance(value, Mapping) and "model" in value:  # mergekit ModelReference dict form
        value = value["model"]
        if isinstance(value, Mapping) and "path" in value:
            value = value["path"]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a model path (a string), got {value!r}")
    return value.strip()


def _check_keys(d: Mapping, allowed: set[str], where: str) -> None:
    for key in d:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(
                f"{where}: unknown key {key!r}.{extra} Allowed: {', '.join(sorted(allowed))}."
            )


def _params(value: Any, where: str) -> dict[str, Setting]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: 'parameters' must be a mapping, got {type(value).__name__}")
    return dict(value)


def _input(d: Any, where: str, *, slice_source: bool = False) -> InputModel:
    if isinstance(d, str):
        return InputModel(model=d)
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'model:', got {d!r}")
    allowed = {"model", "parameters"} | ({"layer_range"} if slice_source else set())
    _check_keys(d, allowed, where)
    if "model" not in d:
        raise ConfigError(f"{where}: missing 'model:' (the path of a checkpoint folder or file)")
    lr = None
    if slice_source:
        if "layer_range" not in d:
            raise ConfigError(f"{where}: slice sources need 'layer_range: [start, end]'")
        lr_raw = d["layer_range"]
        if (
            not isinstance(lr_raw, Sequence)
            or len(lr_raw) != 2
            or not all(isinstance(x, int) for x in lr_raw)
            or lr_raw[0] < 0
            or lr_raw[1] <= lr_raw[0]
        ):
            raise ConfigError(f"{where}.layer_range: expected [start, end) with 0 <= start < end")
        lr = (int(lr_raw[0]), int(lr_raw[1]))
    return InputModel(
        model=_model_ref(d["model"], f"{where}.model"),
        parameters=_params(d.get("parameters"), f"{where}.parameters"),
        layer_range=lr,
    )


def parse_size(value: Any, where: str) -> int:
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", value, re.IGNORECASE)
        if m:
            base = 1024 if m.group(3) else 1000
            power = " KMGT".index(m.group(2).upper() or " ")
            return int(float(m.group(1)) * base**power)
    raise ConfigError(f"{where}: expected a size in bytes like 5000000000, '5GB' or '500MB'")


def load_config(source: str | Path | Mapping[str, Any]) -> MergeConfig:
    """Parse a config from a YAML file path, a YAML string or a dict. Validates structure only;
    method and parameter names are validated against the registry by the planner."""
    root: Path | None = None
    if isinstance(source, Mapping):
        raw = dict(source)
        text = yaml.safe_dump(raw, sort_keys=False)
    else:
        p = Path(source) if not (isinstance(source, str) and "\n" in source) else None
        if p is not None and p.suffix in {".yml", ".yaml"} and not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        if p is not None and p.exists():
            text = p.read_text()
            root = p.resolve().parent
            where = str(p)
        else:
            text = str(source)
            where = "config"
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: invalid YAML: {e}") from None
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a YAML mapping with 'merge_method:'")
    _check_keys(raw, TOP_LEVEL_KEYS, "config")
    if "merge_method" not in raw:
        raise ConfigError("config: missing 'merge_method:' (run `mergeforge methods` for a list)")
    if raw.get("modules"):
        raise ConfigError(
            "config: 'modules:' (multi-module architectures) is not supported yet; use "
            "'models:' or 'slices:'"
        )
    if raw.get("tokenizer"):
        raise ConfigError(
            "config: 'tokenizer:' (vocabulary alignment and added tokens) is not supported yet; "
            "merge models that share a tokenizer and use 'tokenizer_source: base'"
        )
    has_models, has_slices = bool(raw.get("models")), bool(raw.get("slices"))
    if has_models == has_slices:
        raise ConfigError("config: give exactly one of 'models:' or 'slices:'")

    models = tuple(_input(m, f"models[{i}]") for i, m in enumerate(raw.get("models") or []))
    slices = []
    for i, s in enumerate(raw.get("slices") or []):
        where = f"slices[{i}]"
        if not isinstance(s, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'sources:'")
        _check_keys(s, {"sources", "parameters", "base_model", "residual_weight"}, where)
        if s.get("residual_weight") is not None:
            raise ConfigError(f"{where}: 'residual_weight' is not supported yet")
        srcs = s.get("sources") or []
        if not srcs:
            raise ConfigError(f"{where}: 'sources:' must list at least one model")
        slices.append(
            OutputSlice(
                sources=tuple(
                    _input(x, f"{where}.sources[{j}]", slice_source=True)
                    for j, x in enumerate(srcs)
                ),
                parameters=_params(s.get("parameters"), f"{where}.parameters"),
                base_model=_model_ref(s["base_model"], f"{where}.base_model")
                if s.get("base_model")
                else None,
            )
        )

    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None and raw[key] not in DTYPES:
            raise ConfigError(
                f"config: {key}: {raw[key]!r} is not a dtype; use one of "
                "float32, bfloat16, float16, float64"
            )
    tok = raw.get("tokenizer_source")
    if tok is not None and tok != "base":
        raise ConfigError(
            f"config: tokenizer_source: {tok!r} is not supported yet (only 'base', which copies "
            "the base model's tokenizer). Vocabulary union/permutation is on the roadmap."
        )
    seed = raw.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"config: seed must be an integer, got {seed!r}")
    exclude = parse_exclude(raw.get("exclude"), "config")
    return MergeConfig(
        merge_method=str(raw["merge_method"]),
        models=models,
        slices=tuple(slices),
        base_model=_model_ref(raw["base_model"], "base_model") if raw.get("base_model") else None,
        parameters=_params(raw.get("parameters"), "parameters"),
        dtype=raw.get("dtype"),
        out_dtype=raw.get("out_dtype"),
        tokenizer_source=tok,
        chat_template=raw.get("chat_template"),
        seed=seed,
        out_shard_size=parse_size(raw.get("out_shard_size", 5_000_000_000), "out_shard_size"),
        allow_vocab_mismatch=bool(raw.get("allow_vocab_mismatch", False)),
        exclude=exclude,
        check_finite=bool(raw.get("check_finite", True)),
        source_text=text,
        root=root,
    )


# ----------------------------------------------------------------------------------------------
# Parameter settings: scalars, gradients, filters (mergekit semantics)


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Any:
    """Resolve one setting for a tensor at depth ``t`` in [0, 1]; ``None`` if no filter matches.

    * scalar -> itself;
    * list of numbers (a gradient) -> piecewise-linear interpolation at ``t``;
    * list of non-numbers -> the element at ``int(t * (len - 1))``;
    * ``{filter, value}`` or a list of them -> the first whose filter is absent, ``*`` or a
      substring of the tensor name (mergekit's rule), evaluated recursively.
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return setting
    if isinstance(setting, Sequence):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
            if not numeric:
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            if not isinstance(cond, Mapping) or "value" not in cond:
                raise ConfigError(
                    f"parameter setting {setting!r}: a list must be all scalars (a gradient) "
                    "or all {filter: ..., value: ...} mappings"
                )
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and str(flt) in tensor_name):
                return evaluate_setting(cond["value"], tensor_name, t)
        return None
    raise ConfigError(f"unexpected parameter setting {setting!r}")


def parse_exclude(value: Any, where: str) -> tuple[str, ...]:
    """An ``exclude:`` value (a regex, a list of them, or nothing) as a tuple of checked
    regexes; anything else is a :class:`ConfigError` prefixed with ``where``."""
    if not value:
        return ()
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{where}: exclude must be a regex or a list of regexes, got {value!r}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{where}: exclude: {pattern!r} is not a valid regex: {e}") from None
    return tuple(patterns)
