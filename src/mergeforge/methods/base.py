"""The method contract and the one registry.

A merge method is a *pure tensor function* plus two frozen parameter dataclasses:

* ``params``: parameters shared by all inputs (mergekit's "shared" scope: ``lambda``,
  ``normalize``, ``t`` …);
* ``model_params``: parameters given per input model (mergekit's "non-base" scope:
  ``weight``, ``density`` …).

The engine resolves every parameter to a plain scalar for the tensor at hand (gradients over
depth, ``filter:`` conditions, per-model overrides) *before* calling the method, so a method
never sees YAML, never opens a file and never mutates its inputs.

Signature of ``Method.fn``::

    fn(base: Tensor | None, tensors: Sequence[Tensor], params: P,
       model_params: Sequence[M], ctx: TensorContext) -> Tensor

``base`` is the base model's tensor (``None`` for methods without a base), ``tensors`` are the
other inputs in config order, all already in the compute dtype and on the compute device.
The return value has the shape of the inputs; the engine casts it to the output dtype.

Methods that need a statistics pass over the whole model first (model-wide top-k, RegMean
Grams, curvature statistics) declare ``statistic``: a factory of :class:`Statistic` objects
that the engine feeds tensor by tensor (possibly in several passes) before merging; the
finished statistic is given to ``fn`` as ``ctx.fitted``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

BasePolicy = Literal["required", "optional", "none"]


@dataclass(frozen=True)
class NoParams:
    """For methods with no parameters in a scope."""


@dataclass(frozen=True)
class TensorContext:
    """What a method may know about the tensor it merges, besides the tensors themselves."""

    key: str
    """Output tensor name, e.g. ``model.layers.3.mlp.up_proj.weight``."""
    generator: torch.Generator | None = None
    """Seeded RNG for stochastic methods (DARE, DELLA). Seeded per tensor by the engine from
    the config ``seed`` and the tensor name, so results do not depend on tensor order."""
    fitted: Any = None
    """Result of the method's statistics pass for this merge (``None`` if it has none)."""
    model_names: tuple[str, ...] = ()
    """Names of the non-base inputs, for error messages."""
    sidecars: tuple[Any, ...] = ()
    """Per-model statistics for this tensor (methods with ``sidecar_inputs``), one per non-base
    input in input order, fp32 on the compute device; ``()`` or ``None`` entries where the tensor
    has none (biases, norms). E.g. RegMean's input Gram (in, in), Fisher's diagonal (shape of
    the tensor); for a sidecar of several statistics per tensor (``SidecarInputs.shape`` gives
    ``{suffix: shape}``) a mapping ``{suffix: tensor}`` of those the file holds, e.g. curvature's
    ``{":R": (m,), ":C": (n,)}``."""
    sidecar_meta: tuple[Mapping[str, str], ...] = ()
    """Metadata of each non-base input's statistics file (e.g. Fisher's whole-model norm)."""


@dataclass(frozen=True)
class SidecarInputs:
    """What per-model statistics a data-using method reads (see ``mergeforge.stats``).

    Made from the method's shared parameters by ``Method.sidecar_inputs``; the planner finds
    ``<model>/mergeforge-stats/<kind>.safetensors`` for every non-base model and checks it
    before any tensor is merged.
    """

    kind: str
    """File stem: ``regmean``, ``fisher-empirical``, ``fisher-sampled``."""
    num_examples: int | None
    """Examples the statistics must have been computed on (``None``: whatever was used)."""
    shape: Callable[[str, tuple[int, ...]], tuple[int, ...] | Mapping[str, tuple[int, ...]] | None]
    """``(output tensor name, its shape) -> shape of its statistic``, ``None`` if it takes none.
    A sidecar holding several statistics per tensor (``curvature``: ``P:R``, ``P:C`` …) gives
    ``{suffix: shape}`` instead: the file names them ``<tensor name><suffix>`` and the method
    gets ``{suffix: tensor}`` (see ``optional``)."""
    required: bool
    """Every tensor with a statistic shape must have one (Fisher). ``False``: a tensor may have
    none in every file (merged without), but not in some files only (RegMean)."""
    command: str
    """How to create the file (``{model}``: the model's path): a ``mergeforge stats ...``
    command, or for statistics only training records, how to record them."""
    optional: tuple[str, ...] = ()
    """Suffixes of a several-statistics sidecar that a file may leave out (curvature's ``:S``,
    ``:v``): handed over where the file has them, left out of the mapping where not."""


class Statistic(Protocol):
    """A whole-model statistics pass (two-phase methods: ``fit`` then ``apply``).

    The engine calls ``observe`` for every tensor the method will merge, ``passes`` times in
    a row (``end_pass`` after each), then hands ``result()`` to the method as ``ctx.fitted``;
    ``sidecars`` are the tensor's per-model statistics, as ``TensorContext.sidecars`` (``()`` for
    a method that reads none). Memory held by a statistic must not grow with the model size
    beyond what it documents.
    """

    passes: int

    def observe(
        self,
        pass_index: int,
        key: str,
        base: Tensor | None,
        tensors: Sequence[Tensor],
        params: Any,
        model_params: Sequence[Any],
        sidecars: Sequence[Any] = (),
    ) -> None: ...

    def end_pass(self, pass_index: int) -> None: ...

    def result(self) -> Any: ...


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Tensor]
    summary: str
    reference: str
    """Paper (arXiv id / URL) the method follows."""
    params: type = NoParams
    model_params: type = NoParams
    base: BasePolicy = "required"
    min_models: int = 1
    """Minimum number of non-base inputs."""
    max_models: int | None = None
    stochastic: bool = False
    symmetric: bool = True
    """Permuting the non-base inputs (with their model params) leaves the result unchanged."""
    idempotent: bool = True
    """Merging N identical copies of the base returns the base (or the copy when no base)."""
    elementwise: bool = False
    """Output entry i depends only on the inputs' entries i (no norms, quantiles or RNG over
    the tensor): the engine may then run the method on cache-sized chunks of flat views."""
    statistic: Callable[[Any], Statistic] | None = None
    """Factory ``(params) -> Statistic`` when the method needs a statistics pass."""
    sidecar_inputs: Callable[[Any], SidecarInputs | None] | None = None
    """Factory ``(params) -> SidecarInputs`` for methods that read per-model statistics computed
    once per model (``mergeforge stats``: RegMean Grams, diagonal Fisher; training: curvature);
    it returns ``None`` where these parameters read none (``prune`` by magnitude)."""
    output_like: Literal["base", "first"] = "base"
    """Which input the output takes its tensor names, ``config.json`` and carried files from:
    the base (else the first model), or always the first non-base model (``prune``: the output
    is the pruned expert, with its own config and head)."""
    warm_up: Callable[[Any, int, torch.dtype, torch.device], None] | None = None
    """Optional ``(params, n_models, compute dtype, device)`` hook the engine calls once after
    planning, before any tensor: e.g. load a compiled kernel in the background (TIES)."""
    aliases: tuple[str, ...] = ()
    notes: str = ""

    def param_fields(self) -> dict[str, dict[str, Any]]:
        """``{"shared": {name: default}, "per_model": {name: default}}`` for docs and CLI."""
        out: dict[str, dict[str, Any]] = {}
        for scope, cls in (("shared", self.params), ("per_model", self.model_params)):
            out[scope] = {}
            for f in dataclasses.fields(cls):
                if f.default is not dataclasses.MISSING:
                    out[scope][f.name] = f.default
                elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                    out[scope][f.name] = f.default_factory()  # type: ignore[misc]
                else:
                    out[scope][f.name] = "required"
        return out

    def param_docs(self) -> dict[str, dict[str, str]]:
        """The docstring under each parameter's field (first paragraph, one line), by scope as
        in :meth:`param_fields`; ``""`` where a field has none."""
        out: dict[str, dict[str, str]] = {}
        for scope, cls in (("shared", self.params), ("per_model", self.model_params)):
            docs = field_docs(cls)
            out[scope] = {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}
        return out


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass and its bases, read from the source: the string
    literal right under an annotated field (base classes first, subclasses override)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (frozen app, REPL): no docs
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                first = inspect.cleandoc(nxt.value.value).split("\n\n")[0]
                docs[node.target.id] = " ".join(first.split())
    return docs


_REGISTRY: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register(method: Method) -> Method:
    """Register a method once; duplicate names are a programming error."""
    for name in (method.name, *method.aliases):
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"merge method {name!r} is already registered")
    _REGISTRY[method.name] = method
    for alias in method.aliases:
        _ALIASES[alias] = method.name
    return method


MERGEKIT_ONLY_METHODS: dict[str, str] = {}
"""mergekit methods mergeforge lacks, with the closest mergeforge methods (said instead of
"unknown method")."""


def get_method(name: str) -> Method:
    from mergeforge.errors import ConfigError, not_implemented

    name = _ALIASES.get(name, name)
    try:
        return _REGISTRY[name]
    except KeyError:
        if name in MERGEKIT_ONLY_METHODS:
            raise not_implemented(f"merge_method {name!r}", MERGEKIT_ONLY_METHODS[name]) from None
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(
            f"unknown merge method {name!r}. Known methods: {known}. "
            "Run `mergeforge methods` for their parameters."
        ) from None


def all_methods() -> tuple[Method, ...]:
    return tuple(_REGISTRY[k] for k in sorted(_REGISTRY))


@dataclass(frozen=True)
class MethodCall:
    """A fully resolved call for one output tensor (built by the engine's planner)."""

    method: Method
    params: Any
    model_params: tuple[Any, ...] = field(default_factory=tuple)
