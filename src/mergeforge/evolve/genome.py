"""The genome: a CMA-ES vector <-> a :class:`Recipe` <-> a plain mergekit YAML mapping.

Layout as mergekit-evolve's (mergekit 0.1.5, ``mergekit/evo/genome.py``): per-model genes shaped
(layer groups, models, filters + 1, parameters), flattened in C order; then the shared genes;
then one method gene when several methods are searched. Unlike mergekit-evolve (density =
clamp(|x|, 0, 1), weight = |x|), every gene spans [0, 1] (the CMA-ES bounds) and maps linearly
onto its parameter's range, so σ₀ = 1/6 means the same step for every gene and a gene never
folds back on itself. The method gene splits [0, 1] into one equal bin per method.

Decoded (:meth:`Genome.document`) as mergekit-evolve does: one layer group -> ``models:`` with
scalars; several -> ``slices:``, one per group, each source with its ``layer_range`` and
parameters (the base listed as a source too); ``smooth: true`` -> ``models:`` with one gradient
per parameter (a value per group, interpolated over depth). Filters make each value a list of
``{filter, value}`` ending in an unfiltered ``{value}``. Both mergeforge's ``load_config`` and
mergekit's ``MergeConfiguration`` read the result.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mergeforge.config import yaml_field_map
from mergeforge.errors import ConfigError
from mergeforge.evolve.config import DOCS, DataFlowSpec, GenomeSpec, param_defaults

DECIMALS = 6  # decoded values are rounded: the YAML written is exactly what was evaluated
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_LAYER = re.compile(r"^(?P<prefix>(?:[^.]+\.)*?[^.]+\.)(?P<idx>\d+)\.")


def count_layers(names: Iterable[str], config: Mapping[str, Any] | None = None) -> int:
    """Layers of a model: its config.json's count, else 1 + the largest index under the most
    common ``<prefix>.<i>.`` of its tensor names (the rule of ``engine/layout.py``)."""
    for key in NUM_LAYERS_KEYS:
        if config and isinstance(config.get(key), int):
            return int(config[key])
    counts: Counter[str] = Counter()
    top: dict[str, int] = {}
    for n in names:
        if m := _LAYER.match(n):
            counts[m["prefix"]] += 1
            top[m["prefix"]] = max(top.get(m["prefix"], -1), int(m["idx"]))
    return top[counts.most_common(1)[0][0]] + 1 if counts else 0


def layer_pattern(name: str) -> str:
    """``name`` with its layer index as ``*`` (``model.layers.3.w`` -> ``model.layers.*.w``); a
    name outside the numbered layers is returned as it is."""
    m = _LAYER.match(name)
    return f"{m['prefix']}*.{name[m.end() :]}" if m else name


def layer_groups(num_layers: int, groups: int | None, granularity: int | None) -> list[tuple]:
    """``[(start, end), ...]``: contiguous layer ranges, as equal as the count allows."""
    if granularity is not None:
        if num_layers % granularity:
            raise ConfigError(
                f"genome.layer_granularity: {granularity} does not divide the "
                f"model's {num_layers} layers; use layer_groups instead"
            )
        groups = num_layers // granularity
    groups = groups or 1
    if groups == 1:
        return [(0, num_layers)]
    if groups > num_layers:
        raise ConfigError(f"genome.layer_groups: {groups} groups for a model with {num_layers} "
                          "numbered layers; use at most one group per layer (layer_groups: 1 "
                          "for a model without numbered layers)")  # fmt: skip
    cuts = [round(i * num_layers / groups) for i in range(groups + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


@dataclass(frozen=True)
class Recipe:
    """One candidate in parameter units: the method, each per-model gene as nested tuples
    ``[group][model][filter set]``, and each shared gene."""

    method: str
    per_model: Mapping[str, tuple]
    shared: Mapping[str, float]


class Genome:
    """Encode / decode between vectors in [0, 1]^N and :class:`Recipe`; write the YAML."""

    def __init__(self, spec: GenomeSpec, *, models: Sequence[str], base_model: str | None,
                 num_layers: int) -> None:  # fmt: skip
        from mergeforge.methods import get_method

        self.spec = spec
        self.models = tuple(models)
        self.base_model = base_model
        self.groups = layer_groups(num_layers, spec.layer_groups, spec.layer_granularity)
        self.sets = len(spec.filters) + 1
        self.methods = spec.methods
        self._method = {m: get_method(m) for m in spec.methods}
        self.shape = (len(self.groups), len(self.models), self.sets, len(spec.per_model))
        self.size = int(np.prod(self.shape)) + len(spec.shared) + (len(self.methods) > 1)
        if self.size == 0:
            raise ConfigError("genome: the search space is empty (no per-model, shared or "
                              f"method gene); see {DOCS}")  # fmt: skip

    # -- gene units ---------------------------------------------------------------------------

    def _range(self, name: str) -> tuple[float, float]:
        return self.spec.ranges.get(name) or self.spec.shared[name]

    def _integer(self, name: str) -> bool:
        """A parameter whose every method's default is an int is searched in whole numbers."""
        scope = "shared" if name in self.spec.shared else "per_model"
        defaults = [param_defaults(m, scope).get(name) for m in self._method.values()]
        present = [d for d in defaults if d is not None]
        return bool(present) and all(type(d) is int for d in present)

    def _value(self, name: str, u: float) -> float:
        lo, hi = self._range(name)
        v = lo + float(u) * (hi - lo)
        return int(round(v)) if self._integer(name) else round(v, DECIMALS)

    def _unit(self, name: str, v: float) -> float:
        lo, hi = self._range(name)
        return (float(v) - lo) / (hi - lo)

    # -- vector <-> recipe --------------------------------------------------------------------

    def decode(self, x: Sequence[float]) -> Recipe:
        """The recipe of ``x`` (clipped to [0, 1]: a vector from anywhere decodes)."""
        x = np.clip(np.asarray(x, dtype=np.float64).reshape(-1), 0.0, 1.0)
        if x.size != self.size:
            raise ConfigError(f"genome: a vector of {x.size} genes for a genome of {self.size}")
        n = int(np.prod(self.shape))
        per = x[:n].reshape(self.shape)
        per_model = {
            p: tuple(tuple(tuple(self._value(p, u) for u in per[g, m, :, j])
                           for m in range(self.shape[1])) for g in range(self.shape[0]))
            for j, p in enumerate(self.spec.per_model)
        }  # fmt: skip
        shared = {k: self._value(k, x[n + i]) for i, k in enumerate(self.spec.shared)}
        k = len(self.methods)
        method = self.methods[min(k - 1, int(x[-1] * k))] if k > 1 else self.methods[0]
        return Recipe(method=method, per_model=per_model, shared=shared)

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The vector of ``recipe`` (values outside their range are clipped to it)."""
        per = np.zeros(self.shape)
        for j, p in enumerate(self.spec.per_model):
            per[..., j] = [[[self._unit(p, v) for v in sets] for sets in models]
                           for models in recipe.per_model[p]]  # fmt: skip
        genes = [*per.reshape(-1), *(self._unit(k, recipe.shared[k]) for k in self.spec.shared)]
        if len(self.methods) > 1:
            genes.append((self.methods.index(recipe.method) + 0.5) / len(self.methods))
        return np.clip(np.asarray(genes, dtype=np.float64), 0.0, 1.0)

    def initial(self) -> np.ndarray:
        """The start: ``init`` values, else weight 1/M and density 1 (mergekit-evolve), else
        the first method's default inside the range, else the range's middle."""

        def start(name: str, scope: str) -> float:
            if name in self.spec.init:
                return float(self.spec.init[name])
            if name == "weight":
                return 1.0 / len(self.models)
            if name == "density":
                return 1.0
            lo, hi = self._range(name)
            for m in self._method.values():
                d = param_defaults(m, scope).get(name)
                if isinstance(d, int | float) and not isinstance(d, bool) and lo <= d <= hi:
                    return float(d)
            return (lo + hi) / 2

        g, m, s, _ = self.shape
        per_model = {p: tuple(tuple(tuple([start(p, "per_model")] * s) for _ in range(m))
                              for _ in range(g)) for p in self.spec.per_model}  # fmt: skip
        shared = {k: start(k, "shared") for k in self.spec.shared}
        method = self.spec.init.get("method", self.methods[0])
        return self.encode(Recipe(method=method, per_model=per_model, shared=shared))

    def labels(self) -> list[str]:
        """One name per gene: ``g0/MODEL/weight[/filter]``, shared names, ``method``."""
        names = [m.rstrip("/").rsplit("/", 1)[-1] for m in self.models]
        sets = [*self.spec.filters, ""]
        out = [f"g{g}/{names[m]}/{p}" + (f"/{sets[s]}" if sets[s] else "")
               for g in range(self.shape[0]) for m in range(self.shape[1])
               for s in range(self.sets) for p in self.spec.per_model]  # fmt: skip
        return [*out, *self.spec.shared, *(["method"] if len(self.methods) > 1 else [])]

    # -- recipe -> mergekit YAML --------------------------------------------------------------

    def _setting(self, recipe: Recipe, name: str, group: int | None, model: int) -> Any:
        """One per-model value as YAML: a scalar, a gradient over the groups (``group`` None,
        smooth), with filters a list of ``{filter, value}`` ending unfiltered."""
        groups = range(self.shape[0]) if group is None else [group]

        def value(s: int):
            vals = [recipe.per_model[name][g][model][s] for g in groups]
            return vals[0] if len(vals) == 1 else vals

        if self.sets == 1:
            return value(0)
        return [*({"filter": f, "value": value(s)} for s, f in enumerate(self.spec.filters)),
                {"value": value(self.sets - 1)}]  # fmt: skip

    def document(self, recipe: Recipe) -> dict[str, Any]:
        """The merge config of ``recipe`` as a plain mergekit-style mapping (see the module
        docstring): only the parameters the recipe's method has, fixed ones included."""
        method = self._method[recipe.method]
        shared_names = yaml_field_map(method.params)
        model_names = yaml_field_map(method.model_params)
        genes = [p for p in self.spec.per_model if p in model_names]
        fixed = {k: v for k, v in self.spec.model_parameters.items() if k in model_names}
        with_base = self.base_model is not None and method.base != "none"

        def params(group: int | None, m: int) -> dict[str, Any]:
            return {**fixed, **{p: self._setting(recipe, p, group, m) for p in genes}}

        doc: dict[str, Any] = {"merge_method": method.name}
        if with_base:
            doc["base_model"] = self.base_model
        if len(self.groups) == 1 or self.spec.smooth:
            group = 0 if len(self.groups) == 1 else None
            doc["models"] = [_source(m, params(group, i)) for i, m in enumerate(self.models)]
        else:
            doc["slices"] = []
            for g, (a, b) in enumerate(self.groups):
                sources = [_source(m, params(g, i), [a, b]) for i, m in enumerate(self.models)]
                if with_base and self.base_model not in self.models:
                    sources.append(_source(self.base_model, {}, [a, b]))
                doc["slices"].append({"sources": sources})
        shared = {**{k: v for k, v in self.spec.parameters.items() if k in shared_names},
                  **{k: v for k, v in recipe.shared.items() if k in shared_names}}  # fmt: skip
        if shared:
            doc["parameters"] = shared
        for key in ("dtype", "tokenizer_source"):
            if getattr(self.spec, key) is not None:
                doc[key] = getattr(self.spec, key)
        if self.spec.seed:
            doc["seed"] = self.spec.seed
        return doc


@dataclass(frozen=True)
class LayerRecipe:
    """One data-flow candidate: the merged stack, as ``(model index, layer index)`` in order."""

    method: str
    layers: tuple[tuple[int, int], ...]


class DataFlowGenome:
    """The data-flow space (:class:`~mergeforge.evolve.config.DataFlowSpec`; arXiv 2403.13187
    §3.2): gene t of T = repeats × Σ layers says whether the t-th layer of the sequence
    "model 0's layers, model 1's layers, ..." (repeated) is kept; kept layers, in sequence
    order, are the new stack. A gene > 1/2 keeps its layer; a vector that keeps none keeps the
    layer of its largest gene (the search never proposes an empty model). Decoded as a mergekit
    ``passthrough`` of ``slices``, one slice per run of consecutive layers of one model; the
    tensors before the layers (embeddings) come from the first slice's model, those after them
    (final norm, heads) from the last slice's (the engine's rule for slices, as mergekit's).

    Not searched: the paper's scaling matrix W (the input of a layer reached from another
    model's layer multiplied by a learnt scalar): a checkpoint cannot hold it without a custom
    architecture, and the merged model must load as its own architecture."""

    THRESHOLD = 0.5

    def __init__(self, spec: DataFlowSpec, *, models: Sequence[str],
                 num_layers: Sequence[int]) -> None:  # fmt: skip
        self.spec = spec
        self.models = tuple(models)
        self.base_model = None
        self.methods = spec.methods
        self.num_layers = tuple(int(n) for n in num_layers)
        if len(self.num_layers) != len(self.models):
            raise ValueError("one layer count per model")
        empty = [m for m, n in zip(self.models, self.num_layers, strict=True) if n < 1]
        if empty:
            raise ConfigError(f"genome (space: dataflow): {empty[0]} has no numbered layers "
                              "(<prefix>.<i>.) to stack")  # fmt: skip
        self.sequence = tuple((m, layer) for _ in range(spec.repeats)
                              for m, n in enumerate(self.num_layers)
                              for layer in range(n))  # fmt: skip
        self.size = len(self.sequence)
        self.start = self.models.index(spec.start_model) if spec.start_model else 0

    def decode(self, x: Sequence[float]) -> LayerRecipe:
        x = np.clip(np.asarray(x, dtype=np.float64).reshape(-1), 0.0, 1.0)
        if x.size != self.size:
            raise ConfigError(f"genome: a vector of {x.size} genes for a genome of {self.size}")
        kept = [t for t in range(self.size) if x[t] > self.THRESHOLD] or [int(np.argmax(x))]
        return LayerRecipe("passthrough", tuple(self.sequence[t] for t in kept))

    def encode(self, recipe: LayerRecipe) -> np.ndarray:
        """The vector of ``recipe``: its layers matched to the sequence in order (first
        occurrence after the previous one), kept genes at 3/4, the others at 1/4."""
        x, t = np.full(self.size, 0.25), 0
        for layer in recipe.layers:
            while t < self.size and self.sequence[t] != tuple(layer):
                t += 1
            if t == self.size:
                raise ConfigError(f"genome: the stack {list(recipe.layers)} is not a "
                                  "subsequence of the data-flow sequence")  # fmt: skip
            x[t], t = 0.75, t + 1
        return x

    def initial(self) -> np.ndarray:
        """``start_model``'s own stack (its layers in the first repeat), encoded as
        :meth:`encode` does: 1.5 σ₀ from the threshold (σ₀ = 1/6), so each gene of a
        first-generation candidate flips with probability ≈ 7 %."""
        n = self.num_layers[self.start]
        return self.encode(LayerRecipe("passthrough", tuple((self.start, i) for i in range(n))))

    def _names(self) -> list[str]:
        return [m.rstrip("/").rsplit("/", 1)[-1] for m in self.models]

    def labels(self) -> list[str]:
        """One name per gene: ``r0/MODEL/L3`` (repeat, model, layer)."""
        names, per = self._names(), sum(self.num_layers)
        return [f"r{t // per}/{names[m]}/L{layer}" for t, (m, layer) in enumerate(self.sequence)]

    def document(self, recipe: LayerRecipe) -> dict[str, Any]:
        runs: list[list[int]] = []  # [model, start, end)
        for m, layer in recipe.layers:
            if runs and runs[-1][0] == m and runs[-1][2] == layer:
                runs[-1][2] += 1
            else:
                runs.append([m, layer, layer + 1])
        doc: dict[str, Any] = {
            "merge_method": "passthrough",
            "slices": [{"sources": [_source(self.models[m], {}, [a, b])]} for m, a, b in runs],
        }
        if self.spec.dtype is not None:
            doc["dtype"] = self.spec.dtype
        return doc


def _source(model: str, parameters: dict, layer_range: list[int] | None = None) -> dict:
    out: dict[str, Any] = {"model": model}
    if layer_range is not None:
        out["layer_range"] = list(layer_range)
    if parameters:
        out["parameters"] = parameters
    return out
