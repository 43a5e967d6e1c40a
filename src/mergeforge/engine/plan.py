"""Planning: turn a config plus opened checkpoints into one job per output tensor.

What a config can get wrong by itself (structure, the method, parameter names, the base-model
rule) was checked by ``config.load_config``. Everything else that can be checked without
merging is checked here, before any heavy work: every input tensor's presence, shape and dtype,
architectures and vocabularies, layer ranges, model counts, each tensor's parameter values,
the sidecars of data-using methods. Each error names the file/model and tensor.

The plan is complete when :func:`build_plan` returns: jobs with resolved parameters, opened
sidecars, and the random stream names of stochastic methods, so every way of running
it (``run_merge``, ``merge_state_dicts``, or ``prepare`` then ``run_jobs``) merges the same.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergeforge.checkpoint import Checkpoint
from mergeforge.config import MergeConfig, build_params, evaluate_setting, yaml_field_map
from mergeforge.engine.layout import (
    NUM_LAYERS_KEYS,
    Layout,
    heads_to_add,
    infer_layout,
    tied_source,
)
from mergeforge.engine.vocab import VocabPlan, check_ids_agree, plan_vocabulary
from mergeforge.errors import ConfigError, ValidationError
from mergeforge.methods import Method, get_method
from mergeforge.methods.base import MethodCall

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
    "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64,
}  # fmt: skip


@dataclass(frozen=True)
class Ref:
    """One input tensor: model index into ``MergePlan.models`` and tensor name there."""

    model: int
    name: str


@dataclass(frozen=True)
class Job:
    out_name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    base: Ref | None
    inputs: tuple[Ref, ...]
    call: MethodCall | None
    """``None`` means copy ``base`` (or the first input) unchanged (excluded/non-float)."""
    sidecars: tuple[Any, ...] = ()
    """Per-input statistics (:class:`~mergeforge.engine.sidecars.SidecarRef` or ``None``) for
    methods with ``sidecar_inputs``; ``()`` when the job reads none."""

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.out_dtype).element_size()


@dataclass
class MergePlan:
    config: MergeConfig
    method: Method
    models: list[str]
    checkpoints: list[Checkpoint]
    jobs: list[Job]
    compute_dtype: torch.dtype
    num_out_layers: int | None
    reference: int
    """Index of the model whose tensor names, config.json and tokenizer the output takes (the
    base, else the first model; the first non-base model for ``Method.output_like: first``)."""
    warnings: list[str] = field(default_factory=list)
    sidecars: dict[tuple[int, str], Any] = field(default_factory=dict)
    """Opened sidecars (or statistics given in memory), by (model index, kind) (methods with
    ``sidecar_inputs``)."""
    untied: tuple[str, ...] = ()
    """Tied weights (``lm_head.weight``) the reference model leaves out but the output has,
    because another input stores its own: the output's config is then untied."""
    module_layers: Mapping[str, int] = field(default_factory=dict)
    """Layer counts of modules merged from slices (``modules:``), by their model-config key
    (``text_config.num_hidden_layers``): set in the output's config.json."""
    stream_names: tuple[str, ...] | None = None
    """Per model, the name its random stream is seeded with: a fingerprint of its weights
    (:func:`model_fingerprint`; ``""`` for a model no job merges, e.g. a base), set by the
    planner when the method is stochastic; ``None`` when it draws no random numbers."""
    vocab: VocabPlan | None = None
    """The vocabulary realignment and output tokenizer (``engine/vocab.py``): set when the
    config has a tokenizer option or ``chat_template``."""

    @property
    def total_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)

    def close(self) -> None:
        """Close the checkpoints and sidecars the plan opened."""
        for ck in self.checkpoints:
            ck.close()
        for f in self.sidecars.values():
            f.close()


def model_fingerprint(ck: Checkpoint, samples: int = 8, entries: int = 1024) -> str:
    """A short hash of a model's *weights* (``entries`` values from the middle of each of up to
    ``samples`` tensors spread over its sorted names): stochastic methods name each model's
    random stream with it, so a DARE merge depends on the models, not on where their folders
    are or how the YAML spells their paths. Identical models get the same name (the stream
    labels then tell them apart by occurrence)."""
    import hashlib

    names = sorted(ck.keys())
    step = max(1, len(names) // samples)
    h = hashlib.blake2b(digest_size=8)
    for name in names[::step][:samples]:
        flat = ck.get(name).reshape(-1)
        mid = max(0, flat.numel() // 2 - entries // 2)
        part = flat[mid : mid + entries].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(part.view(torch.uint8).numpy().tobytes() if part.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# parameters


class ParamResolver:
    """Resolve and build (cached) parameter dataclasses for one tensor."""

    def __init__(self, method: Method):
        self.method = method
        self._shared = yaml_field_map(method.params)
        self._model = yaml_field_map(method.model_params)
        self._cache: dict[tuple, Any] = {}

    def _build(self, cls: type, fmap: dict[str, str], values: dict[str, Any], where: str) -> Any:
        key = (cls, tuple(sorted(values.items())))
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = build_params(cls, values, where, fmap)
        return hit

    @staticmethod
    def _resolve(names, scopes: Sequence[Mapping[str, Any]], tensor: str, t: float) -> dict:
        out: dict[str, Any] = {}
        for name in names:
            for scope in scopes:
                if name in scope:
                    v = evaluate_setting(scope[name], tensor, t)
                    if v is not None:
                        out[name] = v
                        break
        return out

    def call(
        self,
        tensor: str,
        t: float,
        shared_scopes: Sequence[Mapping[str, Any]],
        model_scopes: Sequence[Sequence[Mapping[str, Any]]],
        where: str,
    ) -> MethodCall:
        shared = self._resolve(self._shared, shared_scopes, tensor, t)
        per_model = tuple(
            self._build(
                self.method.model_params,
                self._model,
                self._resolve(self._model, scopes, tensor, t),
                f"{where} (tensor {tensor})",
            )
            for scopes in model_scopes
        )
        params = self._build(self.method.params, self._shared, shared, f"{where} (tensor {tensor})")
        return MethodCall(self.method, params, per_model)


# ----------------------------------------------------------------------------------------------
# checks on opened checkpoints


def _config_of(ck: Checkpoint) -> Mapping[str, Any]:
    return ck.config or {}


def check_compatible(
    models: list[str], cks: list[Checkpoint], ref: int, allow_vocab: bool
) -> list[str]:
    """Same architecture family and, unless ``allow_vocab`` (rows realigned by a tokenizer
    option, or ``allow_vocab_mismatch``), the same vocabulary, judged from config.json and
    tokenizer.json (:func:`~mergeforge.engine.vocab.check_ids_agree`). Returns warnings."""
    rc = _config_of(cks[ref])
    for i, ck in enumerate(cks):
        c = _config_of(ck)
        if not c or not rc or i == ref:
            continue
        a, b = rc.get("model_type"), c.get("model_type")
        if a and b and a != b:
            raise ValidationError(
                f"different architectures: {models[ref]} is {a!r} but {models[i]} is {b!r} "
                "(config.json model_type). Only models of one architecture can be merged."
            )
        va, vb = rc.get("vocab_size"), c.get("vocab_size")
        if va and vb and va != vb and not allow_vocab:
            raise ValidationError(
                f"vocabularies differ: {models[ref]} has vocab_size {va} but {models[i]} has "
                f"{vb} (config.json), so their embedding rows cannot be merged by id. Set "
                "'tokenizer_source: union' (or 'base', or a 'tokenizer:' block) to realign the "
                "rows by token, as mergekit does (README, 'Vocabularies'); "
                "'allow_vocab_mismatch: true' only if the rows really correspond."
            )
    if allow_vocab:
        return []
    return check_ids_agree(models, cks, ref)


def _input_info(models, cks, keysets, ref: Ref, out_name: str, where: str, shape=None):
    """The TensorInfo of one input, or a ValidationError naming model, file and tensor."""
    if ref.name not in keysets[ref.model]:
        close = difflib.get_close_matches(ref.name, keysets[ref.model], n=1)
        raise ValidationError(
            f"missing tensor: {models[ref.model]} has no tensor {ref.name!r} "
            f"(needed for output {out_name!r}, {where})."
            + (f" Closest name there: {close[0]!r}." if close else "")
            + " Check that all models share one architecture and layer count."
        )
    info = cks[ref.model].info(ref.name)
    if shape is not None and tuple(info.shape) != tuple(shape):
        raise ValidationError(
            f"shape mismatch for tensor {ref.name!r}: {models[ref.model]} ({info.file}) has "
            f"{list(info.shape)} but the reference model has {list(shape)}. Models with different "
            "sizes (hidden size, vocabulary) cannot be merged element-wise."
        )
    return info


# ----------------------------------------------------------------------------------------------
# the planner


def _first_inputs(cfg: MergeConfig) -> Sequence[Any]:
    """The inputs the reference model is chosen from: ``models``, else the first slice's
    sources; with ``modules:``, those of the first module."""
    if cfg.models or cfg.slices:
        return cfg.models or cfg.slices[0].sources
    mod = cfg.modules[0]
    return mod.models or mod.slices[0].sources


def build_plan(
    cfg: MergeConfig,
    models: list[str],
    cks: list[Checkpoint],
    *,
    stats: Mapping[str, Mapping[str, Any]] | None = None,
) -> MergePlan:
    """The complete plan of merging ``cks`` (opened ``models``, the config's references in
    :meth:`MergeConfig.referenced_models` order) as ``cfg`` says. ``stats``: in-memory
    statistics of data-using methods, ``{model: {kind: tensors}}`` (see
    ``engine.sidecars.plan_sidecars``); models without them read their sidecars. On
    failure the sidecars opened so far are closed (the checkpoints are the caller's)."""
    method = get_method(cfg.merge_method)
    warnings = list(cfg.warnings)
    index = {m: i for i, m in enumerate(models)}
    base = index[cfg.base_model] if cfg.base_model else None
    listed = [index[s.model] for s in _first_inputs(cfg)]
    if base is not None and method.output_like == "base":
        ref = base
    else:  # the first model that is not the base (Method.output_like)
        ref = next((m for m in listed if m != base), listed[0])
    vocab = plan_vocabulary(cfg, models, cks, ref, warnings)  # tokenizer options: engine/vocab
    realigned = vocab is not None and vocab.size is not None
    warnings += check_compatible(models, cks, ref, cfg.allow_vocab_mismatch or realigned)

    compute = DTYPE_NAMES[cfg.dtype] if cfg.dtype else torch.float32
    out_dt = DTYPE_NAMES.get(cfg.out_dtype or cfg.dtype or "", None)
    resolver = ParamResolver(method)
    excl = [re.compile(p) for p in cfg.exclude]
    ref_ck = cks[ref]
    layout = infer_layout(ref_ck.keys())

    jobs: list[Job] = []
    keysets = [set(ck.keys()) for ck in cks]
    tied_inputs: dict[str, dict[int, str]] = {}  # tied weight -> {model: name used instead}

    def stored(m: int, name: str) -> str:
        """The name model ``m`` stores input tensor ``name`` under: itself or, for a tied
        weight the file leaves out (no ``lm_head.weight``), the embedding it is tied to."""
        if name in keysets[m]:
            return name
        tied = tied_source(name, keysets[m])
        if tied is None:
            return name  # reported as missing, with the closest name, by _input_info
        if (cks[m].config or {}).get("tie_word_embeddings") is False:
            raise ValidationError(
                f"missing tensor: {models[m]} has no {name!r} and its config.json says "
                "tie_word_embeddings: false, so it is not tied to "
                f"{tied!r} either; the checkpoint is incomplete. Re-save it with "
                "save_pretrained, or set tie_word_embeddings: true if the head is tied."
            )
        tied_inputs.setdefault(name, {})[m] = tied
        return tied

    def add(out_name, in_name_for, sources, slice_params, slice_base, t, where, layer=None,
            module_params=None):  # fmt: skip
        """sources: list of (model index, per-model params); in_name_for(model) -> input name;
        module_params: the ``parameters`` of the module (``modules:``), between slice and
        global in precedence."""
        b = index[slice_base] if slice_base else base
        if method.base == "none":
            b_ref = None
            non_base = list(sources)
        else:
            non_base = [(m, p) for m, p in sources if m != b]
            b_ref = Ref(b, stored(b, in_name_for(b))) if b is not None else None
        if len(non_base) < method.min_models or (
            method.max_models is not None and len(non_base) > method.max_models
        ):
            want = (
                f"exactly {method.min_models}"
                if method.max_models == method.min_models
                else f"at least {method.min_models}"
                + (f" and at most {method.max_models}" if method.max_models else "")
            )
            raise ConfigError(
                f"{where}: merge method {method.name!r} takes {want} model(s) besides the base; "
                f"got {len(non_base)}."
            )
        refs = tuple(Ref(m, stored(m, in_name_for(m))) for m, _ in non_base)
        all_refs = (*([b_ref] if b_ref else []), *refs)
        info = _input_info(models, cks, keysets, all_refs[0], out_name, where)
        realign = vocab is not None and vocab.realigns(out_name)  # rows differ: realigned
        infos = [
            _input_info(models, cks, keysets, r, out_name, where, None if realign else info.shape)
            for r in all_refs
        ]
        shape = vocab.job_shape(out_name, all_refs, infos, b, where) if realign else info.shape
        dt = out_dt or info.dtype
        floating = all(i.dtype.is_floating_point for i in infos)
        if not floating or any(p.search(out_name) for p in excl):
            jobs.append(Job(out_name, tuple(shape), info.dtype if not floating else dt,
                            b_ref or refs[0], refs, None))  # fmt: skip
            return
        scopes = [slice_params, *([module_params] if module_params else []), cfg.parameters]
        call = resolver.call(
            out_name,
            t,
            shared_scopes=scopes,
            model_scopes=[[p, *scopes] for _, p in non_base],
            where=where,
        )
        jobs.append(Job(out_name, tuple(shape), dt, b_ref, refs, call))

    num_out_layers = None
    module_layers: dict[str, int] = {}
    if cfg.modules:  # mergekit's modules: one merge per module of the architecture
        from mergeforge.engine.modules import plan_modules

        num_out_layers, module_layers, added = plan_modules(cfg, models, cks, index, ref, add)
    elif cfg.models:
        sources = [(index[m.model], m.parameters) for m in cfg.models]
        if base is not None and method.base != "none" and base not in [s[0] for s in sources]:
            sources.append((base, {}))
        if method.base == "none" and base is not None and base not in [s[0] for s in sources]:
            warnings.append(
                f"base_model is not used by {method.name!r} unless listed under models:"
            )
        added = heads_to_add(keysets[ref], [keysets[m] for m, _ in sources])
        from mergeforge.engine.modules import stack_depth

        depth = stack_depth(ref_ck.keys())  # each layer stack its own depth, as mergekit
        for name in [*ref_ck.keys(), *added]:
            add(name, lambda m, n=name: n, sources, {}, None, depth(name), "models")
    else:
        ends = [*cfg.slices[0].sources, *cfg.slices[-1].sources]
        added = heads_to_add(keysets[ref], [keysets[index[s.model]] for s in ends])
        num_out_layers = _plan_slices(cfg, models, cks, index, layout, ref_ck, add, added)
    warnings += _tied_warnings(models, ref, tied_inputs, added)
    if vocab is not None and realigned:  # a vocabulary-sized tensor of unknown kind: refused
        vocab.check_unknown_rows(jobs, cks, excl)

    plan = MergePlan(
        config=cfg, method=method, models=models, checkpoints=cks, jobs=jobs,
        compute_dtype=compute, num_out_layers=num_out_layers, reference=ref, warnings=warnings,
        untied=tuple(added), module_layers=module_layers,
    )  # fmt: skip
    plan.vocab = vocab
    if method.sidecar_inputs is not None or stats:  # statistics for a method reading none: refused
        from mergeforge.engine.sidecars import close_sidecars, plan_sidecars

        try:
            plan_sidecars(plan, stats or {})
            if vocab is not None:
                vocab.check_sidecars(plan.jobs)
        except BaseException:
            close_sidecars(plan)
            raise
    if method.stochastic and any(j.call is not None for j in jobs):
        # only the models that are merged inputs draw random numbers (not a base-only model)
        inputs = {r.model for j in jobs for r in j.inputs}
        plan.stream_names = tuple(
            model_fingerprint(ck) if i in inputs else "" for i, ck in enumerate(cks)
        )
    return plan


def _tied_warnings(models, ref: int, tied_inputs: dict[str, dict[int, str]], added) -> list[str]:
    """What the tied-embeddings rule did, once per tied weight."""
    out = []
    for name, used in tied_inputs.items():
        who = ", ".join(f"{models[m]} (its {t!r})" for m, t in sorted(used.items()))
        out.append(
            f"{name!r}: tied embeddings, not stored by {who}; the tensor it is tied to is used "
            "in its place, as mergekit does."
        )
    if added:
        out.append(
            f"the reference model {models[ref]} has tied embeddings but another input stores its "
            f"own {', '.join(repr(n) for n in added)}: the output gets one too, and its "
            "config.json says tie_word_embeddings: false so that it is used (mergekit writes the "
            "same tensors but keeps the reference's config)."
        )
    return out


def _plan_slices(cfg, models, cks, index, layout: Layout, ref_ck, add, added=(), *,
                 slices=None, names=None, member=None, where="slices") -> int:  # fmt: skip
    """mergekit slices: output layers are numbered consecutively across slices; embeddings come
    from the first slice's sources, final norm/head from the last slice's; t runs 0..1 within
    each slice. ``added``: tied weights the reference leaves out but the output gets.
    A module's slices (``modules:``): ``slices``, the reference's tensor ``names`` of the
    module, ``member(name)`` (a tensor of the module) and ``where`` (``modules.NAME.slices``)."""
    slices = cfg.slices if slices is None else slices
    names = list(ref_ck.keys()) if names is None else names
    if layout.prefix is None:
        raise ConfigError(f"{where}: the reference model has no numbered layers to slice")
    per_layer = sorted({s[1] for n in names if (s := layout.split(n)) and s[0] == 0})
    non_layer = [n for n in [*names, *added] if layout.split(n) is None]
    pre = [n for n in non_layer if Layout.is_pre(n)]
    post = [n for n in non_layer if not Layout.is_pre(n)]

    def srcs(sl):
        return [(index[s.model], s.parameters) for s in sl.sources]

    first, last = slices[0], slices[-1]
    for n in pre:
        add(n, lambda m, n=n: n, srcs(first), first.parameters, first.base_model, 0.0,
            f"{where}[0]")  # fmt: skip
    out_layer = 0
    for si, sl in enumerate(slices):
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) != 1:
            raise ConfigError(f"{where}[{si}]: all sources must span the same number of layers")
        n = lengths.pop()
        for s in sl.sources:
            keys = cks[index[s.model]].keys()
            have = infer_layout(k for k in keys if member is None or member(k)).num_layers
            if s.layer_range[1] > have:
                raise ConfigError(
                    f"{where}[{si}]: layer_range {list(s.layer_range)} is past the end of "
                    f"{s.model}, which has {have} layers"
                )
        starts = {index[s.model]: s.layer_range[0] for s in sl.sources}
        for k in range(n):
            t = k / (n - 1) if n > 1 else 1.0
            for rest in per_layer:

                def name_for(m, k=k, rest=rest, starts=starts):
                    return layout.name(starts.get(m, next(iter(starts.values()))) + k, rest)

                add(layout.name(out_layer, rest), name_for, srcs(sl), sl.parameters,
                    sl.base_model, t, f"{where}[{si}]")  # fmt: skip
            out_layer += 1
    for n in post:
        add(n, lambda m, n=n: n, srcs(last), last.parameters, last.base_model, 0.0,
            f"{where}[-1]")  # fmt: skip
    return out_layer


def output_config(plan: MergePlan) -> dict | None:
    """config.json for the output: the reference model's, with the layer count and dtype set."""
    c = plan.checkpoints[plan.reference].config
    if not c:
        return None
    out = dict(c)
    if plan.num_out_layers is not None:
        for k in NUM_LAYERS_KEYS:
            if k in out:
                out[k] = plan.num_out_layers
    for key, n in plan.module_layers.items():  # modules: "text_config.num_hidden_layers"
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            if not isinstance(node.get(p), Mapping):
                break
            node[p] = node = dict(node[p])
        else:
            node[leaf] = n
    if plan.vocab is not None:
        plan.vocab.update_config(out)  # the rows of the realigned embeddings
    if plan.untied:
        # the output stores its own merged head: a tied config would make transformers drop
        # it (older versions) or warn and untie it (newer ones)
        out["tie_word_embeddings"] = False
        if (
            isinstance(out.get("text_config"), Mapping)
            and "tie_word_embeddings" in out["text_config"]
        ):
            out["text_config"] = {**out["text_config"], "tie_word_embeddings": False}
    dts = {j.out_dtype for j in plan.jobs if j.out_dtype.is_floating_point}
    if len(dts) == 1:
        name = str(next(iter(dts))).removeprefix("torch.")
        for k in ("torch_dtype", "dtype"):
            if k in out:
                out[k] = name
    return out
