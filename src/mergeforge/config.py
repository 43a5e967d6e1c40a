"""The merge configuration: a superset of mergekit's YAML.

Everything a mergekit YAML may say for a method both tools support means the same here:
``merge_method``, ``base_model``, ``models`` (with per-model ``parameters``), ``slices`` (with
``sources`` and ``layer_range``), ``modules`` (per-module ``slices`` / ``models`` of multi-module
architectures; :class:`ModuleConfig`, planned by ``engine/modules.py``), global ``parameters``,
``dtype``, ``out_dtype``, ``tokenizer_source`` (``union`` | ``base`` | a model), the
``tokenizer:`` block (``source``, per-token ``tokens``, ``pad_to_multiple_of``) and
``chat_template`` (parsed here into :class:`TokenizerSpec`; the realignment is
``engine/vocab.py``'s). A multi-document YAML is a multi-stage recipe (``engine/multi.py``).
Parameter values may be scalars, gradients (lists interpolated over depth) or filter lists
(``[{filter: mlp, value: 0.5}, {value: 1}]``), with mergekit's precedence: per-model > slice >
global. A parameter name the chosen method does not use but some method (ours or mergekit's)
knows is ignored with one warning, as mergekit ignores it; mergekit features mergeforge lacks
raise :func:`not_implemented`'s one message with the closest alternative.

mergeforge additions (all optional):

``seed`` (int, default 0)
    Seed for stochastic methods (DARE, DELLA). Each tensor gets its own generator seeded from
    (seed, tensor name), so results do not depend on order, device threads or resumption.
``out_shard_size`` (bytes or "5GB"/"500MB", default 5 GB)
    Output shard size.
``allow_vocab_mismatch`` (bool, default false)
    Merge embedding rows by id even when the inputs' tokenizers disagree (the default refuses:
    rows would not align; a tokenizer option realigns them instead, so the two are exclusive).
``exclude`` (list of regexes)
    Output tensors whose name matches keep the base model's value (or the first model's).
``check_finite`` (bool, default true)
    Refuse inputs containing NaN/Inf (checked as each tensor is read).

One constructor, one rule, two layers of checks:

* :func:`load_config` is the only way to make a :class:`MergeConfig` (from a YAML file, a YAML
  string, a mapping, or an existing config, returned as it is); the CLI, the Python API
  (``mergeforge.merge``, ``merge_state_dicts``), the bench and the quick start all go through
  it. Code that builds a config writes the mergekit-style mapping with :func:`merge_document`.
* YAML names are parameter field names without a trailing ``_`` (``lambda`` <-> ``lambda_``):
  :func:`yaml_name`, used everywhere a parameter is read or shown.
* Everything a config can get wrong by itself is checked here, in one pass, before any model is
  opened: keys, structure, settings, dtypes, the method, every parameter name against it (with
  the warnings), the base-model rule. What needs the models (tensors present with one shape,
  architectures and vocabularies, layer ranges against the model's depth, model counts per
  slice, parameter *values* per tensor, statistics files) is the planner's
  (``mergeforge.engine.plan``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mergeforge.errors import ConfigError, not_implemented

if TYPE_CHECKING:
    from mergeforge.methods import Method

TOP_LEVEL_KEYS = {
    # mergekit
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name", "modules",
    # mergeforge
    "seed", "out_shard_size", "allow_vocab_mismatch", "exclude", "check_finite",
}  # fmt: skip

DTYPES = {"float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16"}

Setting = Any  # scalar | list (gradient) | list of {filter, value}

# ----------------------------------------------------------------------------------------------
# mergekit 0.1.5, as facts: mergekit is a test-only dependency, so what we need to know about it
# is written here and checked against its registry by tests/test_mergekit_params.py.

MERGEKIT_METHOD_PARAMETERS: dict[str, tuple[str, ...]] = {
    "arcee_fusion": (),
    "breadcrumbs": ("int8_mask", "normalize", "rescale", "lambda", "weight", "density", "gamma"),
    "breadcrumbs_ties": (
        "int8_mask", "normalize", "rescale", "lambda", "weight", "density", "gamma",
    ),
    "dare_linear": ("int8_mask", "normalize", "rescale", "lambda", "weight", "density"),
    "dare_ties": ("int8_mask", "normalize", "rescale", "lambda", "weight", "density"),
    "della": ("int8_mask", "normalize", "rescale", "lambda", "weight", "density", "epsilon"),
    "della_linear": (
        "int8_mask", "normalize", "rescale", "lambda", "weight", "density", "epsilon",
    ),
    "karcher": ("max_iter", "tol"),
    "linear": ("weight", "normalize"),
    "model_stock": ("filter_wise",),
    "multislerp": ("weight", "normalize_weights", "eps"),
    "nearswap": ("t",),
    "nuslerp": ("weight", "nuslerp_row_wise", "nuslerp_flatten"),
    "passthrough": ("scale",),
    "ram": ("epsilon",),
    "ramplus_tl": ("r", "alpha", "epsilon"),
    "sce": ("int8_mask", "select_topk"),
    "slerp": ("t",),
    "task_arithmetic": ("int8_mask", "normalize", "rescale", "lambda", "weight", "density"),
    "ties": ("int8_mask", "normalize", "rescale", "lambda", "weight", "density"),
}  # fmt: skip
"""Every merge method mergekit 0.1.5 registers, with the parameter names it declares. mergekit
resolves only the chosen method's names and silently ignores any other; mergeforge ignores a
name some method of either tool knows with one warning, and refuses one no method knows."""


MERGEKIT_MODULES: dict[str, dict[str, tuple[tuple[str, ...], str | None]]] = {
    "Gemma3ForConditionalGeneration": {
        "text_decoder": (("language_model.",), "text_config.num_hidden_layers"),
        "multi_modal_projector": (("multi_modal_projector.",), None),
        "vision_tower": (("vision_tower.vision_model.",), "vision_config.num_hidden_layers"),
    },
    "Llama4ForConditionalGeneration": {
        "text_decoder": (("language_model.",), "text_config.num_hidden_layers"),
        "multi_modal_projector": (("multi_modal_projector.",), None),
        "vision_model": (("vision_model.",), "vision_config.num_hidden_layers"),
    },
    "Mistral3ForConditionalGeneration": {
        "text_decoder": (("language_model.",), "text_config.num_hidden_layers"),
        "multi_modal_projector": (("multi_modal_projector.",), None),
        "vision_tower": (("vision_tower.",), "vision_config.num_hidden_layers"),
    },
    "Qwen2VLForConditionalGeneration": {
        "text_decoder": (("model.", "lm_head."), "num_hidden_layers"),
        "multi_modal_projector": (("visual.merger.",), None),
        "vision_tower": (("visual.",), "vision_config.depth"),
    },
    "Qwen2_5_VLForConditionalGeneration": {
        "text_decoder": (("model.", "lm_head."), "text_config.num_hidden_layers"),
        "multi_modal_projector": (("visual.merger.",), None),
        "vision_tower": (("visual.",), "vision_config.depth"),
    },
    "Qwen3VLForConditionalGeneration": {
        "text_decoder": (("model.language_model.", "lm_head."), "text_config.num_hidden_layers"),
        "multi_modal_projector": (
            ("model.visual.merger.", "model.visual.deepstack_merger_list."), None,
        ),
        "vision_tower": (("model.visual.",), "vision_config.depth"),
    },
    "Qwen3VLMoeForConditionalGeneration": {
        "text_decoder": (("model.language_model.", "lm_head."), "text_config.num_hidden_layers"),
        "multi_modal_projector": (
            ("model.visual.merger.", "model.visual.deepstack_merger_list."), None,
        ),
        "vision_tower": (("model.visual.",), "vision_config.depth"),
    },
    "T5ForConditionalGeneration": {
        "decoder": (("decoder.",), "num_decoder_layers"),
        "encoder": (("encoder.",), "num_hidden_layers"),
        "shared": (("shared.", "lm_head."), None),
    },
    "WhisperForConditionalGeneration": {
        "decoder": (("model.decoder.",), "decoder_layers"),
        "encoder": (("model.encoder.",), "encoder_layers"),
    },
}  # fmt: skip
"""The multi-module architectures of mergekit 0.1.5 (its modular architecture tables), as
facts: architecture (``config.json`` ``architectures[0]``) -> module name -> (the tensor-name
prefixes of its weights, the model-config key of its layer count or ``None``). A tensor belongs
to the module with the longest matching prefix (``visual.merger.`` is the projector, the rest of
``visual.`` the vision tower). Every other architecture has one module, ``default``: the whole
model. Checked against mergekit's tables by tests/test_modules_config.py."""


MERGEKIT_MOE_KEYS = {"experts", "gate_mode", "experts_per_token", "shared_experts"}
"""Top-level keys of mergekit-moe's config format (a different tool's YAML)."""

CONFIG_DOCS = "README, 'Config: mergekit's YAML, plus a little'"


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
class ModuleConfig:
    """One entry of mergekit's ``modules:``: the merge of one module of a multi-module
    architecture (a VLM's text decoder, vision tower, projector), with its own ``models`` or
    ``slices`` (layer ranges count that module's layers) and ``parameters`` (precedence:
    per-model > slice > module > global). See :data:`MERGEKIT_MODULES`."""

    name: str
    models: tuple[InputModel, ...] = ()
    slices: tuple[OutputSlice, ...] = ()
    parameters: Mapping[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenSource:
    """Where the embedding row of one token comes from (mergekit's per-token ``source``):
    ``kind="model"``: the token's own row in ``model``; ``"zero"``: zeros; ``"model_token"``:
    the row of another token of ``model``, named by ``token`` (a string of that model's
    tokenizer) or ``token_id`` (a row of its embedding)."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenSetting:
    """One entry of ``tokenizer.tokens``: its ``source``, used for a token some input lacks,
    or for every input with ``force``."""

    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """mergekit's ``tokenizer:`` block: the output vocabulary (``source``: ``union`` (the
    default), ``base`` or a model), per-token embedding sources (``tokens``; a token not in the
    vocabulary is added to it) and ``pad_to_multiple_of`` (rows padded with each input's mean
    row)."""

    source: str = "union"
    tokens: Mapping[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class MergeConfig:
    """A parsed, checked merge config. Made by :func:`load_config` (the one constructor; its
    checks do not run again later), changed with ``dataclasses.replace``."""

    merge_method: str
    models: tuple[InputModel, ...] = ()
    slices: tuple[OutputSlice, ...] = ()
    modules: tuple[ModuleConfig, ...] = ()
    """mergekit's ``modules:`` (instead of ``models``/``slices``): one merge per module."""
    base_model: str | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    """``union``, ``base`` or a model reference; ``None`` without one (see ``tokenizer``)."""
    tokenizer: TokenizerSpec | None = None
    """mergekit's ``tokenizer:`` block (exclusive with ``tokenizer_source``)."""
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
    warnings: tuple[str, ...] = ()
    """What was accepted but is ignored (e.g. mergekit's unused ``residual_weight``); the
    planner passes these on to the plan's warnings."""

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
        for mod in self.modules:  # each module's models or slices, in the order given
            for m in [*mod.models, *(x for sl in mod.slices for x in sl.sources)]:
                if m.model not in seen:
                    seen.append(m.model)
            for sl in mod.slices:
                if sl.base_model and sl.base_model not in seen:
                    seen.append(sl.base_model)
        return seen

    def to_yaml(self) -> str:
        return self.source_text


def _model_path(value: Any, where: str) -> str:
    """mergekit's ``ModelPath``: a string ``PATH`` / ``PATH@REVISION``, or a mapping ``{path,
    revision}``; returned as the string form."""
    if isinstance(value, Mapping):
        check_keys(value, {"path", "revision"}, where)
        if "path" not in value:
            raise ConfigError(f"{where}: missing 'path:' (a local path or a Hugging Face id)")
        rev = value.get("revision")
        if rev is not None and (not isinstance(rev, str) or not re.fullmatch(r"[^@+\s]+", rev)):
            raise ConfigError(
                f"{where}.revision: expected a branch, tag or commit hash, got {rev!r}"
            )
        path = _model_path(value["path"], f"{where}.path")
        return f"{path}@{rev}" if rev is not None else path
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a model path (a string), got {value!r}")
    return value.strip()


def _model_ref(value: Any, where: str) -> str:
    """A model reference as mergekit's ``ModelReference`` reads it, as one string
    ``MODEL[@REV][+ADAPTER[@REV]]``: a string as it is, or a mapping ``{model: PATH, lora:
    PATH}`` whose PATHs are strings or ``{path, revision}`` mappings."""
    if not isinstance(value, Mapping):
        return _model_path(value, where)
    check_keys(value, {"model", "lora", "override_architecture"}, where)
    if value.get("override_architecture") is not None:
        raise ConfigError(
            f"{where}.override_architecture: not supported yet; mergeforge reads each model's "
            "architecture from its config.json and tensors: remove the key"
        )
    if "model" not in value:
        raise ConfigError(f"{where}: missing 'model:' (a local path or a Hugging Face id)")
    ref = _model_path(value["model"], f"{where}.model")
    if value.get("lora") is not None:
        ref += "+" + _model_path(value["lora"], f"{where}.lora")
    return ref


def check_number(value: Any, where: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:  # fmt: skip
    """A finite int or float (not a bool) within the optional bounds, as a float; shared by the
    scenario configs (evolve, federated). The error names ``where`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{where}: must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{where}: must be <= {high}, got {value}")
    return float(value)


def check_int(value: Any, where: str, low: int) -> int:
    """An int (not a bool) >= ``low``; shared by the scenario configs."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where}: expected an integer >= {low}, got {value!r}")
    return value


def check_keys(d: Mapping, allowed: set[str], where: str, *, see: str | None = None) -> None:
    """Raise :class:`ConfigError` on the first key of ``d`` not in ``allowed``, with the closest
    allowed name and the full list (and ``See {see}.`` when given). Shared by every config."""
    for key in d:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(
                f"{where}: unknown key {key!r}.{extra} Allowed: {', '.join(sorted(allowed))}."
                + (f" See {see}." if see else "")
            )


def read_yaml(
    source: str | Path | Mapping[str, Any], expected: str
) -> tuple[dict, str, Path | None, str]:
    """``(mapping, YAML text, folder, name for errors)`` of a path, a YAML string or a mapping;
    a document that is not a mapping raises "expected a YAML mapping with {expected}"."""
    if isinstance(source, Mapping):
        return dict(source), yaml.safe_dump(dict(source), sort_keys=False), None, "config"
    p = Path(source) if not (isinstance(source, str) and "\n" in source) else None
    if p is not None and p.suffix in {".yml", ".yaml"} and not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    root, where, text = None, "config", str(source)
    if p is not None and p.exists():
        text, root, where = p.read_text(encoding="utf-8"), p.resolve().parent, str(p)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a YAML mapping with {expected}")
    return dict(raw), text, root, where


def _params(value: Any, where: str) -> dict[str, Setting]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: 'parameters' must be a mapping, got {type(value).__name__}")
    for name, setting in value.items():
        check_setting(setting, f"{where}.{name}")
    return dict(value)


def _input(d: Any, where: str, *, slice_source: bool = False) -> InputModel:
    if isinstance(d, str):
        return InputModel(model=d)
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'model:', got {d!r}")
    allowed = {"model", "parameters"} | ({"layer_range"} if slice_source else set())
    check_keys(d, allowed, where)
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


def _slices(items: Sequence[Any], where_list: str, warnings: list[str]) -> tuple[OutputSlice, ...]:
    """A ``slices:`` list (top level or a module's), checked; ``residual_weight`` (read but
    never used by mergekit 0.1.5) adds a warning."""
    slices = []
    for i, s in enumerate(items):
        where = f"{where_list}[{i}]"
        if not isinstance(s, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'sources:'")
        check_keys(s, {"sources", "parameters", "base_model", "residual_weight"}, where)
        if s.get("residual_weight") is not None:
            # mergekit 0.1.5 parses it but no code reads it: accepted and ignored, said once
            warnings.append(
                f"{where}.residual_weight is ignored: mergekit 0.1.5 reads it but never uses "
                "it, so a mergekit merge of this config ignores it too"
            )
        srcs = s.get("sources") or []
        if not srcs:
            raise ConfigError(f"{where}: 'sources:' must list at least one model")
        sources = tuple(
            _input(x, f"{where}.sources[{j}]", slice_source=True) for j, x in enumerate(srcs)
        )
        _check_listed_once(sources, f"{where}.sources")
        slices.append(
            OutputSlice(
                sources=sources,
                parameters=_params(s.get("parameters"), f"{where}.parameters"),
                base_model=_model_ref(s["base_model"], f"{where}.base_model")
                if s.get("base_model")
                else None,
            )
        )
    return tuple(slices)


def load_config(source: str | Path | Mapping[str, Any] | MergeConfig) -> MergeConfig:
    """The one constructor of a :class:`MergeConfig`: from a YAML file path, a YAML string, a
    mapping (as YAML would load it, see :func:`merge_document`), or a ``MergeConfig`` (returned
    unchanged). Checks everything a config can get wrong by itself (see the module docstring)
    and raises :class:`ConfigError` naming the key and the fix; what is accepted but ignored
    is in ``warnings``."""
    if isinstance(source, MergeConfig):
        return source
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
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: invalid YAML: {e}") from None
        if len(docs) > 1:
            raise ConfigError(
                f"{where}: a multi-stage recipe ({len(docs)} documents separated by '---', "
                "mergekit-multi's format of named merges): run it with `mergeforge merge "
                "CONFIG OUT` or `mergeforge multi`, or mergeforge.merge / "
                "mergeforge.engine.run_multimerge from Python; load_config reads one merge "
                "(see the README, 'Multi-stage recipes')"
            )
        raw = docs[0] if docs else None
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a YAML mapping with 'merge_method:'")
    _check_mergekit_only_keys(raw)
    _check_other_tool_keys(raw)
    check_keys(raw, TOP_LEVEL_KEYS, "config")
    if "merge_method" not in raw:
        raise ConfigError("config: missing 'merge_method:' (run `mergeforge methods` for a list)")
    warnings: list[str] = []
    modules = _modules(raw, warnings)  # mergekit's third way to give the inputs
    if not modules:
        _check_inputs_given(raw)

    models = tuple(_input(m, f"models[{i}]") for i, m in enumerate(raw.get("models") or []))
    _check_listed_once(models, "models")
    slices = _slices(raw.get("slices") or [], "slices", warnings)

    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None and raw[key] not in DTYPES:
            raise ConfigError(
                f"config: {key}: {raw[key]!r} is not a dtype; use one of "
                "float32, bfloat16, float16, float64"
            )
    tok, tokenizer, chat_template = _tokenizer_options(raw)
    seed = raw.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"config: seed must be an integer, got {seed!r}")
    exclude = parse_exclude(raw.get("exclude"), "config")
    cfg = MergeConfig(
        merge_method=str(raw["merge_method"]),
        models=models,
        slices=slices,
        modules=modules,
        base_model=_model_ref(raw["base_model"], "base_model") if raw.get("base_model") else None,
        parameters=_params(raw.get("parameters"), "parameters"),
        dtype=raw.get("dtype"),
        out_dtype=raw.get("out_dtype"),
        tokenizer_source=tok,
        tokenizer=tokenizer,
        chat_template=chat_template,
        seed=seed,
        out_shard_size=parse_size(raw.get("out_shard_size", 5_000_000_000), "out_shard_size"),
        allow_vocab_mismatch=bool(raw.get("allow_vocab_mismatch", False)),
        exclude=exclude,
        check_finite=bool(raw.get("check_finite", True)),
        source_text=text,
        root=root,
        warnings=tuple(warnings),
    )
    return dataclasses.replace(cfg, warnings=(*cfg.warnings, *check_method(cfg)))


def merge_document(
    method: str,
    models: Sequence[str | os.PathLike[str]],
    *,
    base_model: str | os.PathLike[str] | None = None,
    parameters: Mapping[str, Setting] | None = None,
    model_parameters: Mapping[str, Setting] | None = None,
    exclude: Sequence[str] = (),
    dtype: str | None = None,
) -> dict[str, Any]:
    """The mapping a mergekit-style YAML of a whole-model merge loads as, for code that makes
    configs (the bench, the quick start): ``models`` each get ``model_parameters``; empty
    blocks are left out. Pass it to :func:`load_config` or anything that takes a config."""
    doc: dict[str, Any] = {
        "merge_method": method,
        "models": [
            {"model": os.fspath(m), "parameters": dict(model_parameters or {})} for m in models
        ],
    }
    if dtype is not None:
        doc["dtype"] = dtype
    if base_model is not None:
        doc["base_model"] = os.fspath(base_model)
    if parameters:
        doc["parameters"] = dict(parameters)
    if exclude:
        doc["exclude"] = list(exclude)
    return doc


OTHER_TOOL_KEYS: dict[str, str] = {
    "genome": "a mergekit-evolve config (genome:, tasks:), not a merge: run it with `mergeforge "
    "evolve CONFIG`, which reads mergekit-evolve's genome: section (tasks: becomes fitness:)",
    "tasks": "a mergekit-evolve config (genome:, tasks:), not a merge: run it with `mergeforge "
    "evolve CONFIG`, which reads mergekit-evolve's genome: section (tasks: becomes fitness:)",
    "align_weights": "weight alignment before merging is not a key of mergekit 0.1.5 (it ignores "
    "it and merges without aligning); mergeforge aligns and fuses models with `mergeforge fuse` "
    "(zipit, Git Re-Basin, OT fusion); remove the key for a plain merge",
    "out_path": "the output folder is given on the command line: `mergeforge merge CONFIG OUT`",
    "low_cpu_memory": "a command-line option of mergekit-yaml, accepted by `mergeforge merge` "
    "as --low-cpu-memory, not a config key",
    "copy_tokenizer": "a command-line option of mergekit-yaml, accepted by `mergeforge merge` "
    "as --copy-tokenizer / --no-copy-tokenizer, not a config key",
    "metric_method": "model metrics (a mergekit branch, not mergekit 0.1.5, which refuses this "
    "config: no merge_method) are not a merge; mergeforge has no metrics config, `mergeforge "
    "bench` scores merged models",
}
"""Top-level keys of other tools' YAMLs found in mergekit's examples (mergekit-evolve, later or
unmerged mergekit features, mergekit-yaml's command-line options written as keys), with what to
do instead; mergekit 0.1.5 refuses these configs or silently drops the key."""


def _check_other_tool_keys(raw: Mapping[str, Any]) -> None:
    """A key of another tool's YAML (:data:`OTHER_TOOL_KEYS`): named, with the alternative."""
    for key in raw:
        if key in OTHER_TOOL_KEYS:
            raise ConfigError(f"config: {key!r} is not a merge config key: "
                              f"{OTHER_TOOL_KEYS[key]}. See {CONFIG_DOCS}.")  # fmt: skip


def _check_mergekit_only_keys(raw: Mapping[str, Any]) -> None:
    """mergekit keys whose feature mergeforge lacks: the one "not implemented yet" message
    instead of silently dropping them (mergekit would act on each)."""
    moe = sorted(MERGEKIT_MOE_KEYS & set(raw))
    if moe:
        raise not_implemented(
            f"config: {', '.join(repr(k) for k in moe)}: a mergekit-moe config (mixture of "
            "experts built from dense models)",
            "none for mixtures of experts; merge the experts into one dense model with "
            "'merge_method: ties' or 'task_arithmetic'",
        )


def _modules(raw: Mapping[str, Any], warnings: list[str]) -> tuple[ModuleConfig, ...]:
    """mergekit's ``modules:`` (module name -> ``{models | slices, parameters}``), checked; ``()``
    when absent or empty. Which names a model has is the planner's to check (it needs the
    model's architecture, :data:`MERGEKIT_MODULES`)."""
    value = raw.get("modules")
    if not value:
        return ()
    example = "e.g. 'modules: {text_decoder: {models: [...]}, vision_tower: {models: [...]}}'"
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"config: 'modules:' must be a mapping of module name -> {{models: ...}} or "
            f"{{slices: ...}}, got {type(value).__name__}; {example}"
        )
    both = [k for k in ("models", "slices") if raw.get(k)]
    if both:
        raise ConfigError(
            f"config: give only one of 'modules:' and '{both[0]}:' (mergekit's rule: exactly "
            "one of models, slices and modules); put the inputs under each module instead"
        )
    out = []
    for name, d in value.items():
        where = f"modules.{name}"
        if not isinstance(name, str) or not name:
            raise ConfigError(f"config: modules: {name!r} is not a module name")
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'models:' or 'slices:', got {d!r}")
        check_keys(d, {"models", "slices", "parameters"}, where, see=CONFIG_DOCS)
        for key in ("models", "slices"):
            if d.get(key) is not None and not isinstance(d[key], list):
                raise ConfigError(f"{where}.{key}: must be a list, got {type(d[key]).__name__}")
        if bool(d.get("models")) == bool(d.get("slices")):
            raise ConfigError(
                f"{where}: give exactly one of 'models:' (merge the whole module) and "
                "'slices:' (layer ranges of this module), not "
                + ("both" if d.get("models") else "neither")
            )
        models = tuple(
            _input(m, f"{where}.models[{i}]") for i, m in enumerate(d.get("models") or [])
        )
        _check_listed_once(models, f"{where}.models")
        out.append(
            ModuleConfig(
                name=name,
                models=models,
                slices=_slices(d.get("slices") or [], f"{where}.slices", warnings),
                parameters=_params(d.get("parameters"), f"{where}.parameters"),
            )
        )
    return tuple(out)


CHAT_TEMPLATE_NAMES = ("chatml", "llama3", "mistral")
"""Chat template names (``chat_template: chatml``): mergeforge's own templates, which render
every conversation as mergekit 0.1.5's templates of those names do (tests/test_vocab.py)."""

REFUSED_CHAT_TEMPLATE_NAMES = ("alpaca", "exaone")
"""mergekit 0.1.5's other names: its templates render stray whitespace (exaone indents every
turn by 4 or 8 spaces, alpaca glues '### Response:' to the last instruction), so they are
refused with the advice to give the Jinja text."""

VOCAB_DOCS = "README, 'Config: mergekit's YAML, plus a little', 'Vocabularies'"


def _tokenizer_source(value: Any, where: str) -> str:
    if value in ("union", "base"):
        return value
    if isinstance(value, str | Mapping):
        return _model_ref(value, where)
    raise ConfigError(
        f"{where}: expected 'union', 'base' or a model path, got {value!r}. See {VOCAB_DOCS}."
    )


def _token_source(value: Any, where: str) -> TokenSource | None:
    """One token's ``source``: a model reference, ``{kind: zero}`` or ``{kind: model_token,
    model: M, token: T | token_id: N}``."""
    if value is None:
        return None
    if isinstance(value, Mapping) and "kind" in value:
        kind = value["kind"]
        if kind == "zero":
            check_keys(value, {"kind"}, where, see=VOCAB_DOCS)
            return TokenSource("zero")
        if kind != "model_token":
            raise ConfigError(
                f"{where}.kind: {kind!r} is not a token source kind; use 'zero' or "
                f"'model_token' (or give a model path for the token's own row). See {VOCAB_DOCS}."
            )
        check_keys(value, {"kind", "model", "token", "token_id"}, where, see=VOCAB_DOCS)
        if "model" not in value:
            raise ConfigError(f"{where}: a model_token source needs 'model:' (the model to read)")
        token, token_id = value.get("token"), value.get("token_id")
        if (token is None) == (token_id is None):
            raise ConfigError(
                f"{where}: give exactly one of 'token:' (a token of that model's tokenizer) and "
                "'token_id:' (a row of its embedding)"
            )
        if token is not None and not isinstance(token, str):
            raise ConfigError(f"{where}.token: expected a token string, got {token!r}")
        if token_id is not None:
            check_int(token_id, f"{where}.token_id", 0)
        return TokenSource("model_token", _model_ref(value["model"], f"{where}.model"), token,
                           token_id)  # fmt: skip
    return TokenSource("model", _model_ref(value, where))


def _tokenizer_options(raw: Mapping[str, Any]) -> tuple[str | None, TokenizerSpec | None,
                                                         str | None]:  # fmt: skip
    """``tokenizer_source``, the ``tokenizer:`` block and ``chat_template``, checked (mergekit's
    schema; a ``force`` without a ``source``, which mergekit accepts and then crashes on, is an
    error here)."""
    source = raw.get("tokenizer_source")
    block = raw.get("tokenizer")
    if source is not None and block is not None:
        raise ConfigError(
            "config: give only one of 'tokenizer_source:' and 'tokenizer:' (its 'source:' is "
            f"the same setting), as mergekit requires. See {VOCAB_DOCS}."
        )
    if source is not None:
        source = _tokenizer_source(source, "tokenizer_source")
    spec = None
    if block is not None:
        if not isinstance(block, Mapping):
            raise ConfigError(
                "config: 'tokenizer:' must be a mapping with 'source:', 'tokens:' and/or "
                f"'pad_to_multiple_of:', got {block!r}. See {VOCAB_DOCS}."
            )
        check_keys(block, {"source", "tokens", "pad_to_multiple_of"}, "tokenizer", see=VOCAB_DOCS)
        tokens = block.get("tokens") or {}
        if not isinstance(tokens, Mapping):
            raise ConfigError(
                f"tokenizer.tokens: expected a mapping of token -> {{source, force}}, got "
                f"{tokens!r}"
            )
        settings = {}
        for token, setting in tokens.items():
            where = f"tokenizer.tokens[{token!r}]"
            if not isinstance(token, str) or not token:
                raise ConfigError(f"tokenizer.tokens: {token!r} is not a token string")
            setting = {} if setting is None else setting
            if not isinstance(setting, Mapping):
                raise ConfigError(f"{where}: expected a mapping with 'source:' and/or 'force:'")
            check_keys(setting, {"source", "force"}, where, see=VOCAB_DOCS)
            force = setting.get("force", False)
            if not isinstance(force, bool):
                raise ConfigError(f"{where}.force: expected true or false, got {force!r}")
            src = _token_source(setting.get("source"), f"{where}.source")
            if force and src is None:
                raise ConfigError(
                    f"{where}: 'force: true' needs a 'source:' (a model, {{kind: zero}} or "
                    "{kind: model_token, ...}) to take the row from"
                )
            settings[token] = TokenSetting(src, force)
        pad = block.get("pad_to_multiple_of")
        if pad is not None:
            check_int(pad, "tokenizer.pad_to_multiple_of", 1)
        spec = TokenizerSpec(
            source=_tokenizer_source(block.get("source", "union"), "tokenizer.source"),
            tokens=settings,
            pad_to_multiple_of=pad,
        )
    if raw.get("allow_vocab_mismatch") and (source is not None or spec is not None):
        raise ConfigError(
            "config: 'allow_vocab_mismatch: true' merges embedding rows by id, a tokenizer "
            "option realigns them by token: give only one (the tokenizer option is the one "
            f"that lines rows up). See {VOCAB_DOCS}."
        )
    template = raw.get("chat_template")
    if template is not None:
        if not isinstance(template, str) or not template.strip():
            raise ConfigError(
                f"config: chat_template: expected 'auto', a template name "
                f"({', '.join(CHAT_TEMPLATE_NAMES)}) or a Jinja template, got {template!r}"
            )
        if template in REFUSED_CHAT_TEMPLATE_NAMES:
            raise ConfigError(
                f"config: chat_template: {template!r}: mergekit's template of that name renders "
                "stray whitespace, so mergeforge does not ship it; give the Jinja template "
                f"itself as the value, or one of 'auto', {', '.join(CHAT_TEMPLATE_NAMES)}. See "
                f"{VOCAB_DOCS}."
            )
        if (
            template != "auto"
            and template not in CHAT_TEMPLATE_NAMES
            and (len(template) < 20 or "{" not in template)
        ):
            raise ConfigError(
                f"config: chat_template: {template!r} is neither 'auto', a template name "
                f"({', '.join(CHAT_TEMPLATE_NAMES)}) nor a Jinja template (a string with "
                f"'{{{{ ... }}}}' or '{{% ... %}}'). See {VOCAB_DOCS}."
            )
    return source, spec, template


def _check_inputs_given(raw: Mapping[str, Any]) -> None:
    """Exactly one non-empty list of inputs, ``models:`` or ``slices:``, each with its own
    message (mergekit's rule: exactly one of them is present and non-empty)."""
    models, slices = raw.get("models"), raw.get("slices")
    for key, value in (("models", models), ("slices", slices)):
        if value is not None and not isinstance(value, list):
            raise ConfigError(
                f"config: '{key}:' must be a list (one '- model: PATH' entry per model), got "
                f"{type(value).__name__}"
            )
    if models and slices:
        raise ConfigError(
            "config: give only one of 'models:' (merge whole models) and 'slices:' (merge layer "
            "ranges), not both"
        )
    if not models and not slices:
        if "models" in raw:
            raise ConfigError(
                "config: 'models:' is empty; list the models to merge, e.g. "
                "'models: [{model: ./expert1}, {model: ./expert2}]'"
            )
        if "slices" in raw:
            raise ConfigError("config: 'slices:' is empty; list at least one slice with 'sources:'")
        raise ConfigError(
            "config: missing 'models:' (the models to merge) or 'slices:' (layer ranges to merge)"
        )


def _check_listed_once(inputs: Sequence[InputModel], where: str) -> None:
    """The same model twice in one list would count it twice (mergekit refuses it too)."""
    seen: dict[str, int] = {}
    for i, m in enumerate(inputs):
        key = os.path.normpath(m.model)
        if key in seen:
            raise ConfigError(
                f"{where}[{i}]: {m.model!r} is already listed as {where}[{seen[key]}]; list each "
                "model once (to give it more influence, raise its 'weight')"
            )
        seen[key] = i


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
            _check_condition(cond, f"parameter setting {setting!r}")
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and str(flt) in tensor_name):
                return evaluate_setting(cond["value"], tensor_name, t)
        return None
    raise ConfigError(f"unexpected parameter setting {setting!r}")


CONDITION_KEYS = ("filter", "value")


def _check_condition(cond: Any, where: str) -> None:
    """One ``{filter, value}`` mapping of a filter list. Any other key is an error: mergekit
    drops unknown keys silently (``{pattern: mlp, value: 0.5}``, as in one of its own examples,
    becomes an unfiltered 0.5 for *every* tensor), which loses what the user meant."""
    if not isinstance(cond, Mapping):
        raise ConfigError(
            f"{where}: a list must be all scalars (a gradient) or all "
            "{filter: ..., value: ...} mappings"
        )
    unknown = [k for k in cond if k not in CONDITION_KEYS]
    if unknown:
        key = unknown[0]
        hint = difflib.get_close_matches(str(key), CONDITION_KEYS, n=1)
        guess = hint[0] if hint else ("filter" if "filter" not in cond else "value")
        raise ConfigError(
            f"{where}: unknown key {key!r} in a filter setting; did you mean {guess!r}? A filter "
            "setting is {filter: SUBSTRING, value: V} (the first whose filter occurs in the "
            "tensor name wins; no filter matches every tensor). mergekit would silently drop "
            f"{key!r} and apply the value to every tensor."
        )
    if "value" not in cond:
        raise ConfigError(f"{where}: a filter setting needs 'value:' ({{filter: ..., value: V}})")
    flt = cond.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise ConfigError(
            f"{where}: filter {flt!r} must be a string (a substring of tensor names, or '*')"
        )


def check_setting(setting: Setting, where: str) -> None:
    """Structure of one parameter setting, checked when the config is read so that a mistake
    is reported with its place (``models[1].parameters.weight[0]``) before any model is
    opened: a scalar, a gradient (a list of scalars), or filter mappings (one or a list)."""
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return
    if isinstance(setting, Mapping):
        _check_condition(setting, where)
        check_setting(setting["value"], f"{where}.value")
        return
    if isinstance(setting, Sequence):
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            return
        for i, cond in enumerate(setting):
            _check_condition(cond, f"{where}[{i}]")
            check_setting(cond["value"], f"{where}[{i}].value")
        return
    raise ConfigError(
        f"{where}: {setting!r} is not a parameter setting; give a number, a list of numbers "
        "(a gradient over depth) or {filter: ..., value: ...} mappings"
    )


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


# ----------------------------------------------------------------------------------------------
# Parameter names: one rule for YAML names, checked against the chosen method


def yaml_name(field_name: str) -> str:
    """The YAML name of a parameter field: without a trailing ``_`` (``lambda_`` -> ``lambda``,
    a Python keyword as a field name)."""
    return field_name.rstrip("_")


def yaml_field_map(cls: type) -> dict[str, str]:
    """YAML name -> dataclass field of a parameters class (``lambda`` -> ``lambda_``)."""
    return {yaml_name(f.name): f.name for f in dataclasses.fields(cls)}


def build_params(
    cls: type, values: Mapping[str, Any], where: str = "", fmap: Mapping[str, str] | None = None
) -> Any:
    """A parameters dataclass from YAML-named ``values``; a bad value or name is a
    :class:`ConfigError` prefixed with ``where``."""
    fmap = fmap if fmap is not None else yaml_field_map(cls)
    try:
        return cls(**{fmap.get(k, k): v for k, v in values.items()})
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def check_method(cfg: MergeConfig) -> list[str]:
    """The config against its method: the method exists (or the one message for a mergekit
    method mergeforge lacks), every parameter name (:func:`check_parameter_names`), slerp's
    ``t`` (:func:`check_slerp_t`), and a base model where the method needs one. Returns the
    warnings."""
    from mergeforge.methods import get_method

    method = get_method(cfg.merge_method)
    warnings = [*check_parameter_names(method, cfg), *check_slerp_t(method, cfg)]
    if (
        method.base == "required"
        and not cfg.base_model
        and not any(
            s.base_model for s in (*cfg.slices, *(x for m in cfg.modules for x in m.slices))
        )
    ):
        raise ConfigError(
            f"merge method {method.name!r} needs 'base_model:' (the model the task vectors are "
            "taken against)"
        )
    return warnings


def _parameter_blocks(cfg: MergeConfig) -> list[tuple[str, Mapping[str, Any], bool]]:
    """Every ``parameters:`` block of a config: (where, block, is it a per-model block)."""
    blocks: list[tuple[str, Mapping[str, Any], bool]] = [("parameters", cfg.parameters, False)]
    blocks += [(f"models[{i}].parameters", m.parameters, True) for i, m in enumerate(cfg.models)]
    for where, slices in [
        ("slices", cfg.slices),
        *((f"modules.{m.name}.slices", m.slices) for m in cfg.modules),
    ]:
        for i, sl in enumerate(slices):
            blocks.append((f"{where}[{i}].parameters", sl.parameters, False))
            blocks += [
                (f"{where}[{i}].sources[{j}].parameters", s.parameters, True)
                for j, s in enumerate(sl.sources)
            ]
    for mod in cfg.modules:
        blocks.append((f"modules.{mod.name}.parameters", mod.parameters, False))
        blocks += [
            (f"modules.{mod.name}.models[{i}].parameters", m.parameters, True)
            for i, m in enumerate(mod.models)
        ]
    return blocks


def parameter_users() -> dict[str, list[str]]:
    """Parameter name -> the methods that declare it, ours and mergekit 0.1.5's (sorted)."""
    from mergeforge.methods import all_methods

    users: dict[str, set[str]] = {}
    for m in all_methods():
        for name in {*yaml_field_map(m.params), *yaml_field_map(m.model_params)}:
            users.setdefault(name, set()).add(m.name)
    for method, names in MERGEKIT_METHOD_PARAMETERS.items():
        for name in names:
            users.setdefault(name, set()).add(method)
    return {k: sorted(v) for k, v in users.items()}


def _places(wheres: list[str]) -> str:
    return ", ".join(wheres[:3]) + (f" and {len(wheres) - 3} more" if len(wheres) > 3 else "")


def check_parameter_names(method: Method, cfg: MergeConfig) -> list[str]:
    """Check every parameter name against the chosen method; return the warnings.

    * a name the method has: used (a shared one given per model is ignored, as mergekit does,
      with a warning);
    * a name some other method knows, ours or mergekit's (``density`` on ``task_arithmetic``,
      ``gamma`` on ``ties``): ignored, as mergekit ignores it, with ONE warning per name that
      lists where it was given;
    * a name no method knows: a :class:`ConfigError` with "did you mean".
    """
    shared, per_model = yaml_field_map(method.params), yaml_field_map(method.model_params)
    known = sorted(set(shared) | set(per_model))
    users = parameter_users()
    unused: dict[str, list[str]] = {}
    per_model_shared: dict[str, list[str]] = {}
    for where, block, is_model in _parameter_blocks(cfg):
        for key in block:
            if key not in shared and key not in per_model:
                if key in users:
                    unused.setdefault(key, []).append(where)
                    continue
                hint = difflib.get_close_matches(key, known, n=1) or difflib.get_close_matches(
                    key, sorted(users), n=1
                )
                raise ConfigError(
                    f"{where}: unknown parameter {key!r}: no merge method (of mergeforge or "
                    "mergekit) has it."
                    + (f" Did you mean {hint[0]!r}?" if hint else "")
                    + f" {method.name!r} takes: {', '.join(known) or '(none)'}"
                    " (see `mergeforge methods " + method.name + "`)."
                )
            if is_model and key in shared and key not in per_model:
                per_model_shared.setdefault(key, []).append(where)
    warnings = [
        f"{key!r} is not a parameter of {method.name!r} and is ignored, as mergekit ignores it "
        f"(given in {_places(wheres)}; used by "
        f"{', '.join(u for u in users[key] if u != method.name)})."
        for key, wheres in unused.items()
    ]
    warnings += [
        f"{key!r} is a shared parameter of {method.name!r}; per-model values are ignored (as in "
        f"mergekit): given in {_places(wheres)}. Put it under the top-level 'parameters:'."
        for key, wheres in per_model_shared.items()
    ]
    return warnings


def check_slerp_t(method: Method, cfg: MergeConfig) -> list[str]:
    """slerp's ``t`` outside [0, 1] extrapolates beyond the two models (mergekit accepts it
    too, so it is not refused): one warning naming every such value and where it was given."""
    if method.name != "slerp":
        return []
    outside: list[str] = []

    def leaves(setting: Any, where: str) -> None:
        if isinstance(setting, Mapping):
            leaves(setting.get("value"), f"{where}.value")
        elif isinstance(setting, list):
            for i, e in enumerate(setting):
                leaves(e, f"{where}[{i}]")
        elif isinstance(setting, int | float) and not isinstance(setting, bool):
            if not 0 <= setting <= 1:
                outside.append(f"{setting} ({where})")

    for where, block, is_model in _parameter_blocks(cfg):
        if "t" in block and not is_model:  # a per-model t is ignored (warned about above)
            leaves(block["t"], f"{where}.t")
    if not outside:
        return []
    return [
        f"slerp t outside [0, 1]: {_places(outside)}. t = 0 is the base and t = 1 the other "
        "model; a value outside extrapolates past them (as mergekit does). Use t in [0, 1] to "
        "interpolate."
    ]
