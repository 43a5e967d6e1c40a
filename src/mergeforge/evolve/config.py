"""The ``mergeforge evolve`` config: genome (what is searched), fitness (how a candidate is
scored), search (CMA-ES and Ray settings). See the README's "Evolutionary merge search".

``genome`` is a superset of mergekit-evolve's ``genome:`` section (mergekit 0.1.5,
``mergekit/evo/genome.py``: ``models``, ``merge_method``, ``base_model``, ``layer_granularity``,
``normalize``, ``allow_negative_weights``, ``filters``, ``smooth``, ``tokenizer_source``); the
mergeforge additions are ``layer_groups``, ``merge_method`` as a list (a method gene),
``per_model`` (which per-model parameters are genes), ``shared`` (shared parameters searched in
a range), ``ranges``, ``init``, ``parameters`` / ``model_parameters`` (fixed values), ``dtype``,
``seed``. mergekit-evolve's ``tasks:`` (lm-eval tasks) becomes ``fitness:`` (task pools).
``space: dataflow`` searches the paper's other space instead (:class:`DataFlowSpec`: ``models``,
``repeats``, ``start_model``, ``dtype``).

Everything a config can get wrong by itself is checked here, before any model is opened: keys
(with "did you mean"), method names against the registry, parameter names against the methods,
ranges, an empty search space, fitness pools without examples. What needs the models (paths,
shapes, layer counts) is checked by :func:`mergeforge.evolve.search.evolve` before Ray starts.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeforge.config import (  # _model_ref: mergekit's
    DTYPES,
    _model_ref,
    check_int,
    check_keys,
    check_number,
    check_setting,
    read_yaml,
    yaml_name,
)
from mergeforge.errors import ConfigError

TOP_KEYS = {"genome", "fitness", "search", "out"}
SPACES = ("parameters", "dataflow")
DATAFLOW_KEYS = {"space", "models", "merge_method", "repeats", "start_model", "dtype"}
GENOME_KEYS = {
    # mergekit-evolve's genome keys
    "models", "merge_method", "base_model", "layer_granularity", "normalize",
    "allow_negative_weights", "filters", "smooth", "tokenizer_source",
    # mergeforge
    "layer_groups", "per_model", "shared", "ranges", "init", "parameters", "model_parameters",
    "dtype", "seed", "space",
}  # fmt: skip
SEARCH_KEYS = {"evaluations", "population", "sigma0", "seed", "workers", "cpus_per_worker",
               "address", "in_memory", "start_timeout", "reselect"}  # fmt: skip
FITNESS_KINDS = ("suite", "tasks", "texts")
DEFAULT_GENES = ("weight", "density")  # mergekit-evolve's METHOD_PARAM_MAPS (ties, dare_ties)
DEFAULT_RANGES = {"weight": (0.0, 1.0), "density": (0.0, 1.0)}
DOCS = 'the README\'s section "Evolutionary merge search"'  # where error messages send the reader


@dataclass(frozen=True)
class GenomeSpec:
    """What the search changes, and what it holds fixed (see the module docstring)."""

    models: tuple[str, ...]
    methods: tuple[str, ...]
    base_model: str | None = None
    layer_groups: int | None = None
    """Contiguous groups of layers, each with its own genes; ``None``: from
    ``layer_granularity`` (layers per group), else 1 (whole model)."""
    layer_granularity: int | None = None
    per_model: tuple[str, ...] = ()
    shared: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    init: Mapping[str, Any] = field(default_factory=dict)
    parameters: Mapping[str, Any] = field(default_factory=dict)
    model_parameters: Mapping[str, Any] = field(default_factory=dict)
    filters: tuple[str, ...] = ()
    smooth: bool = False
    allow_negative_weights: bool = False
    tokenizer_source: str | None = None
    dtype: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class DataFlowSpec:
    """The data-flow space of the evolutionary model merge paper (arXiv 2403.13187, §3.2):
    which layers, from which models, in which order, make the merged model's stack. The layers
    of every model, model after model, repeated ``repeats`` times, form a sequence of T
    candidates; one gene each (kept when > 1/2), the kept ones in sequence order are the new
    stack (a mergekit ``passthrough`` of ``slices``). The search starts from ``start_model``'s
    own stack in the first repeat."""

    models: tuple[str, ...]
    repeats: int = 1
    start_model: str | None = None
    """``None``: the first model."""
    dtype: str | None = None
    space: str = "dataflow"

    @property
    def methods(self) -> tuple[str, ...]:
        return ("passthrough",)


@dataclass(frozen=True)
class FitnessSpec:
    """How a candidate is scored: ``kind`` is ``suite`` (the text suite's tasks on a validation
    split carved from their training texts), ``tasks`` (a user's pool: texts + labels + each
    task's head) or ``texts`` (a language model's loss on texts); ``options`` are the checked
    keys of that kind. A Python callable is given to :func:`~mergeforge.evolve.search.evolve`
    directly (never named in YAML)."""

    kind: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class SearchSpec:
    evaluations: int = 100
    """Budget: generations = evaluations // population (at least one); mergekit-evolve: 100."""
    population: int | None = None
    """``None``: CMA-ES's default 4 + ⌊3 ln N⌋ for N genes."""
    sigma0: float = 1 / 6
    """Initial step size in gene units (each gene spans [0, 1]); mergekit-evolve's 1/6."""
    seed: int = 0
    workers: int | None = None
    """Ray actors evaluating candidates at once (``None``: one per free CPU, at most the
    population); 0: in this process, without Ray (debugging, tests)."""
    cpus_per_worker: int = 1
    address: str | None = None
    """An existing Ray cluster (``HOST:PORT`` of ``ray start --head``, or ``auto``); ``None``:
    a local Ray instance started for the search and stopped after it."""
    in_memory: bool = True
    """``False``: write each candidate to disk and load it back (mergekit-evolve's default),
    for measuring what the in-memory merge saves."""
    start_timeout: float = 300.0
    """Seconds the workers may take to start (load the models, set the fitness up)."""
    reselect: int = 0
    """After the search, score its ``reselect`` best candidates (by the search's fitness) again
    on a *selection* split the search never saw, and report the best there instead of the
    search's best (whose fitness is the maximum of many noisy scores, so biased upwards);
    0: off. The text suite draws the split itself (``fitness.selection``); other fitnesses
    pass ``selection=`` to :func:`~mergeforge.evolve.search.evolve`."""


@dataclass(frozen=True)
class EvolveConfig:
    genome: GenomeSpec | DataFlowSpec
    fitness: FitnessSpec | None
    search: SearchSpec = SearchSpec()
    out: str | None = None
    root: Path | None = None
    """The YAML's folder: relative paths (models, pool files) are read against it."""
    text: str = ""


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def _range(value: Any, where: str) -> tuple[float, float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ConfigError(f"{where}: expected [low, high], got {value!r}")
    lo, hi = check_number(value[0], f"{where}[0]"), check_number(value[1], f"{where}[1]")
    if not lo < hi:
        raise ConfigError(f"{where}: low {lo} must be below high {hi}")
    return lo, hi


def _model_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of models (paths or Hugging Face ids)")
    out = []
    for i, m in enumerate(value):
        ref = _model_ref(m, f"{where}[{i}]")  # a path, or {model: PATH, lora: PATH}
        if ref in out:
            raise ConfigError(f"{where}[{i}]: {ref!r} is listed twice; list each model once")
        out.append(ref)
    return tuple(out)


def _methods(value: Any) -> tuple[str, ...]:
    from mergeforge.methods import get_method

    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError("genome.merge_method: expected a method name or a list of them "
                          "(run `mergeforge methods`)")  # fmt: skip
    out = []
    for n in names:
        method = get_method(n)  # an unknown name: ConfigError with "did you mean"
        if method.sidecar_inputs is not None:
            raise ConfigError(
                f"genome.merge_method: {n!r} reads per-model statistics files (sidecars), which "
                "in-memory candidates do not have; search a method without them (ties, "
                "dare_ties, task_arithmetic, linear, della, breadcrumbs ...)"
            )
        if method.name in out:
            raise ConfigError(f"genome.merge_method: {n!r} is listed twice")
        out.append(method.name)
    return tuple(out)


def param_defaults(method, scope: str) -> dict[str, Any]:
    """YAML name -> default of a method's ``shared`` or ``per_model`` parameters."""
    return {yaml_name(k): v for k, v in method.param_fields()[scope].items()}


def _fields(methods: Sequence[str], scope: str) -> dict[str, dict[str, Any]]:
    """Parameter name -> {method: default} over ``methods``, for ``scope`` shared / per_model."""
    from mergeforge.methods import get_method

    out: dict[str, dict[str, Any]] = {}
    for name in methods:
        for key, default in param_defaults(get_method(name), scope).items():
            out.setdefault(key, {})[name] = default
    return out


def _numeric(defaults: Mapping[str, Any]) -> bool:
    return all(isinstance(d, int | float) and not isinstance(d, bool) for d in defaults.values())


def _check_names(names, known: dict, where: str, scope: str, methods, searched: bool) -> None:
    for key in names:
        if key not in known:
            hint = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise ConfigError(
                f"{where}: {key!r} is not a {scope} parameter of {', '.join(methods)}."
                + (f" Did you mean {hint[0]!r}?" if hint else "")
                + f" Their {scope} parameters: {', '.join(sorted(known)) or '(none)'}."
            )
        if searched and not _numeric(known[key]):
            raise ConfigError(f"{where}: {key!r} is not numeric ({known[key]}); give it a fixed "
                              "value under genome.parameters instead")  # fmt: skip


def _dtype_and_tokenizer(g: Mapping[str, Any]) -> tuple[str | None, str | None]:
    dtype = g.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"genome.dtype: {dtype!r} is not a dtype; use float32, bfloat16, "
                          "float16 or float64")  # fmt: skip
    tok = g.get("tokenizer_source")
    if tok is not None and tok != "base":
        raise ConfigError("genome.tokenizer_source: only 'base' is supported (as in `mergeforge "
                          "merge`)")  # fmt: skip
    return dtype, tok


def parse_dataflow(g: Mapping[str, Any], *, suite_models: bool) -> DataFlowSpec:
    """``genome:`` with ``space: dataflow`` as :class:`DataFlowSpec`."""
    check_keys(g, DATAFLOW_KEYS, "genome (space: dataflow)", see=DOCS)
    method = g.get("merge_method", "passthrough")
    if method != "passthrough":
        raise ConfigError(
            f"genome.merge_method: {method!r} with space: dataflow; the data-flow space stacks "
            "whole layers (passthrough): leave merge_method out, or search the parameters "
            "(space: parameters, the default) to blend them"
        )
    models = _model_list(g.get("models"), "genome.models")
    if not models and not suite_models:
        raise ConfigError("genome: missing 'models:' (the models whose layers are stacked), "
                          "e.g. models: [./expert1, ./expert2]")  # fmt: skip
    repeats = check_int(g.get("repeats", 1), "genome.repeats", 1)
    start = g.get("start_model")
    if start is not None:
        start = _model_ref(start, "genome.start_model")
        if models and start not in models:
            raise ConfigError(f"genome.start_model: {start!r} is not one of genome.models "
                              f"{list(models)}")  # fmt: skip
    dtype, _ = _dtype_and_tokenizer(g)
    return DataFlowSpec(models=models, repeats=repeats, start_model=start, dtype=dtype)


def parse_genome(raw: Any, *, suite_models: bool) -> GenomeSpec | DataFlowSpec:
    """``genome:`` as :class:`GenomeSpec` (``space: parameters``, the default) or
    :class:`DataFlowSpec` (``space: dataflow``); ``suite_models``: models and base may be left
    out (the text suite's experts and base are then used)."""
    g = _mapping(raw, "genome")
    space = g.get("space", "parameters")
    if space not in SPACES:
        raise ConfigError(f"genome.space: {space!r}; use 'parameters' (merge weights, "
                          "densities ...: the default) or 'dataflow' (which layers, in which "
                          "order)")  # fmt: skip
    if space == "dataflow":
        return parse_dataflow(g, suite_models=suite_models)
    check_keys(g, GENOME_KEYS, "genome", see=DOCS)
    if "merge_method" not in g:
        raise ConfigError("genome: missing 'merge_method:' (e.g. ties, or [ties, dare_ties] to "
                          "search the method too)")  # fmt: skip
    methods = _methods(g["merge_method"])
    models = _model_list(g.get("models"), "genome.models")
    if not models and not suite_models:
        raise ConfigError("genome: missing 'models:' (the models whose merge is searched), e.g. "
                          "models: [./expert1, ./expert2]")  # fmt: skip
    base = _model_ref(g["base_model"], "genome.base_model") if g.get("base_model") else None
    groups = g.get("layer_groups")
    gran = g.get("layer_granularity")
    if groups is not None and gran is not None:
        raise ConfigError("genome: give layer_groups (how many groups) or layer_granularity "
                          "(layers per group, mergekit-evolve's), not both")  # fmt: skip
    groups = None if groups is None else check_int(groups, "genome.layer_groups", 1)
    gran = None if gran in (None, 0) else check_int(gran, "genome.layer_granularity", 1)

    shared_fields = _fields(methods, "shared")
    model_fields = _fields(methods, "per_model")
    if "per_model" in g:
        per_model = g["per_model"] or []
        if not isinstance(per_model, list) or not all(isinstance(p, str) for p in per_model):
            raise ConfigError("genome.per_model: expected a list of parameter names, e.g. "
                              "[weight, density]")  # fmt: skip
    else:
        per_model = [p for p in DEFAULT_GENES if p in model_fields]
    _check_names(per_model, model_fields, "genome.per_model", "per-model", methods, True)
    shared = {
        k: _range(v, f"genome.shared.{k}")
        for k, v in _mapping(g.get("shared"), "genome.shared").items()
    }
    _check_names(shared, shared_fields, "genome.shared", "shared", methods, True)
    fixed = _mapping(g.get("parameters"), "genome.parameters")
    if g.get("normalize") is not None:  # mergekit-evolve's genome-level switch
        fixed.setdefault("normalize", bool(g["normalize"]))
    _check_names(fixed, shared_fields, "genome.parameters", "shared", methods, False)
    fixed_model = _mapping(g.get("model_parameters"), "genome.model_parameters")
    _check_names(fixed_model, model_fields, "genome.model_parameters", "per-model", methods,
                 False)  # fmt: skip
    for key, setting in {**fixed, **fixed_model}.items():
        check_setting(setting, f"genome.parameters.{key}")
    both = sorted(set(fixed) & set(shared)) + sorted(set(fixed_model) & set(per_model))
    if both:
        raise ConfigError(f"genome: {both[0]!r} is both searched and fixed; keep one")
    if not per_model and not shared and len(methods) == 1:
        raise ConfigError(
            "genome: the search space is empty: no per-model gene (per_model: [] or the method "
            f"{methods[0]!r} has no weight / density), no shared gene (shared:) and one method. "
            "Add per_model: [weight], shared: {lambda: [0.5, 1.5]}, or a second merge_method."
        )
    negative = bool(g.get("allow_negative_weights", False))
    ranges = {"weight": (-1.0, 1.0) if negative else DEFAULT_RANGES["weight"],
              "density": DEFAULT_RANGES["density"]}  # fmt: skip
    for k, v in _mapping(g.get("ranges"), "genome.ranges").items():
        if k not in per_model:
            raise ConfigError(
                f"genome.ranges.{k}: not a per-model gene (per_model: "
                f"{per_model}); shared genes give their range under shared:"
            )
        ranges[k] = _range(v, f"genome.ranges.{k}")
    missing = [p for p in per_model if p not in ranges]
    if missing:
        raise ConfigError(f"genome.ranges: give a range for the per-model gene {missing[0]!r}, "
                          f"e.g. ranges: {{{missing[0]}: [0, 1]}}")  # fmt: skip
    init = _mapping(g.get("init"), "genome.init")
    for k, v in init.items():
        if k == "method":
            if v not in methods:
                raise ConfigError(f"genome.init.method: {v!r} is not one of {list(methods)}")
            continue
        lo, hi = ranges.get(k) or shared.get(k) or (None, None)
        if lo is None:
            raise ConfigError(f"genome.init.{k}: not a gene (genes: "
                              f"{', '.join([*per_model, *shared]) or '(none)'})")  # fmt: skip
        if not lo <= check_number(v, f"genome.init.{k}") <= hi:
            raise ConfigError(f"genome.init.{k}: {v} is outside its range [{lo}, {hi}]")
    filters = g.get("filters") or []
    if not isinstance(filters, list) or not all(isinstance(f, str) and f for f in filters):
        raise ConfigError("genome.filters: expected a list of tensor-name substrings, e.g. "
                          "[mlp, self_attn]")  # fmt: skip
    dtype, tok = _dtype_and_tokenizer(g)
    return GenomeSpec(
        models=models, methods=methods, base_model=base, layer_groups=groups,
        layer_granularity=gran, per_model=tuple(per_model), shared=shared, ranges=ranges,
        init=init, parameters=fixed, model_parameters=fixed_model, filters=tuple(filters),
        smooth=bool(g.get("smooth", False)), allow_negative_weights=negative,
        tokenizer_source=tok, dtype=dtype, seed=check_int(g.get("seed", 0), "genome.seed", 0),
    )  # fmt: skip


def parse_search(raw: Any) -> SearchSpec:
    s = _mapping(raw, "search")
    check_keys(s, SEARCH_KEYS, "search", see=DOCS)
    pop = s.get("population")
    sigma = check_number(s.get("sigma0", 1 / 6), "search.sigma0")
    if sigma <= 0:
        raise ConfigError(f"search.sigma0: {sigma} must be > 0 (gene units; default 1/6)")
    workers = s.get("workers")
    address = s.get("address")
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise ConfigError("search.address: expected HOST:PORT of a Ray head (or 'auto')")
    timeout = check_number(s.get("start_timeout", 300.0), "search.start_timeout")
    if timeout <= 0:
        raise ConfigError("search.start_timeout: must be > 0 seconds")
    return SearchSpec(
        evaluations=check_int(s.get("evaluations", 100), "search.evaluations", 1),
        population=None if pop is None else check_int(pop, "search.population", 2),
        sigma0=sigma, seed=check_int(s.get("seed", 0), "search.seed", 0),
        workers=None if workers is None else check_int(workers, "search.workers", 0),
        cpus_per_worker=check_int(s.get("cpus_per_worker", 1), "search.cpus_per_worker", 1),
        address=address, in_memory=bool(s.get("in_memory", True)), start_timeout=timeout,
        reselect=check_int(s.get("reselect", 0), "search.reselect", 0),
    )  # fmt: skip


def parse_fitness(raw: Any) -> FitnessSpec | None:
    """``fitness:`` (see :mod:`mergeforge.evolve.fitness` for each kind's keys); ``None`` when
    absent (a Python callable must then be given to ``evolve``)."""
    from mergeforge.evolve.fitness import check_fitness_options

    if raw is None:
        return None
    f = _mapping(raw, "fitness")
    # beside 'suite: text', 'tasks:' is the suite's task subset, not a pool of your own
    kinds = [k for k in FITNESS_KINDS if k in f and not (k == "tasks" and "suite" in f)]
    if len(kinds) != 1:
        raise ConfigError(
            "fitness: give exactly one of 'suite: text' (the text suite's tasks), 'tasks:' (your "
            "pool: each task's examples file and head folder) or 'texts:' (a language model's "
            f"loss on texts); got {kinds or 'none of them'}. See {DOCS}."
        )
    return FitnessSpec(kinds[0], check_fitness_options(kinds[0], f))


def load_evolve_config(source: str | Path | Mapping[str, Any] | EvolveConfig) -> EvolveConfig:
    """The one constructor of an :class:`EvolveConfig`: a YAML path, a YAML string or a mapping
    (an ``EvolveConfig`` is returned as it is). Raises :class:`ConfigError` naming the key and
    the fix."""
    if isinstance(source, EvolveConfig):
        return source
    raw, text, root, where = read_yaml(source, "'genome:' and 'fitness:'")
    if "tasks" in raw and "fitness" not in raw:
        raise ConfigError(
            f"{where}: 'tasks:' (mergekit-evolve's lm-eval tasks) is not read by "
            f"mergeforge; score candidates with 'fitness:' (see {DOCS})"
        )
    check_keys(raw, TOP_KEYS, where, see=DOCS)
    if "genome" not in raw:
        raise ConfigError(f"{where}: missing 'genome:' (models, merge_method, ...; see {DOCS})")
    fitness = parse_fitness(raw.get("fitness"))
    genome = parse_genome(raw["genome"], suite_models=fitness is not None and
                          fitness.kind == "suite")  # fmt: skip
    out = raw.get("out")
    if out is not None and not isinstance(out, str):
        raise ConfigError(f"{where}: out: expected a folder path, got {out!r}")
    return EvolveConfig(genome=genome, fitness=fitness, search=parse_search(raw.get("search")),
                        out=out, root=root, text=text)  # fmt: skip


__all__ = [
    "DataFlowSpec",
    "EvolveConfig",
    "FitnessSpec",
    "GenomeSpec",
    "SearchSpec",
    "load_evolve_config",
]
