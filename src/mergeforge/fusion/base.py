"""The shared vocabulary of fusion: the fusion set, a fusion method, the registry, :func:`fuse`.

Fusion combines *independently trained* parents (different inits, seeds or data) of one
architecture into one model of that architecture (ALGORITHMS.md §5). Unlike a merge there is no
shared base and no task vector: neurons must first be matched (alignment baselines) or the fused
model fitted to representations built from the parents' neurons (neuron-centric fusion,
2507.00037). Every method is a function ``fn(parents, data, params) -> state dict`` over
``torch.nn.Module`` parents that it never mutates; the state dict has parent 0's keys, shapes and
dtypes. :func:`fuse` checks the parents and the data before any method runs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mergeforge.errors import ConfigError, ValidationError
from mergeforge.fusion.levels import eval_mode

log = logging.getLogger("mergeforge")


@dataclass(frozen=True)
class FusionData:
    """The fusion set: inputs the parents are run on (a few hundred to a few thousand).

    ``inputs``: N×… floating tensor, what the parents' ``forward`` takes. ``labels``: N int64
    class labels, the target class the attribution-based neuron importances attribute to
    (:mod:`~mergeforge.fusion.importance`); None = each parent's own prediction (its argmax on
    the example), so each parent is scored on the class it predicts. ``class_fractions``: K×C,
    parent k's share of class c among the parents' training examples (each column sums to 1),
    the weights of a non-IID head (hf, kf, kf_gradient, last_layer_kd; the other methods
    ignore it, with a warning); None = uniform. :func:`fuse` checks K against the parents and
    C against their output width.
    """

    inputs: torch.Tensor
    labels: torch.Tensor | None = None
    class_fractions: torch.Tensor | None = None

    def __post_init__(self) -> None:
        x = self.inputs
        if not isinstance(x, torch.Tensor):
            raise ValidationError(f"fusion data: inputs must be a tensor, got {type(x).__name__}")
        if x.ndim == 0 or len(x) == 0:
            raise ValidationError(
                "fusion data: the fusion set is empty (inputs has no rows); give a few hundred "
                "examples of the parents' input distribution"
            )
        if not x.is_floating_point():
            raise ValidationError(
                f"fusion data: inputs must be floating point (the parents' input), got {x.dtype}"
                "; convert with .float()"
            )
        if not bool(torch.isfinite(x).all()):
            raise ValidationError("fusion data: inputs contain NaN or Inf")
        if self.labels is not None:
            y = self.labels
            if y.shape != (len(x),) or y.dtype != torch.int64:
                raise ValidationError(
                    f"fusion data: labels must be an int64 tensor of shape ({len(x)},), got "
                    f"{y.dtype} {tuple(y.shape)}"
                )
        if self.class_fractions is not None:
            f = self.class_fractions
            if f.ndim != 2 or not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
                raise ValidationError(
                    "fusion data: class_fractions must be a finite, non-negative K×C tensor "
                    f"(parent × class), got shape {tuple(f.shape)}"
                )

    def __len__(self) -> int:
        return len(self.inputs)


FuseFn = Callable[[Sequence[nn.Module], FusionData, object], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class FusionMethod:
    """One registered fusion method: ``fn(parents, data, params)`` and its parameter class (a
    frozen dataclass whose fields are all keyword-only with defaults)."""

    name: str
    fn: FuseFn
    params: type
    reference: str
    summary: str
    min_parents: int = 2
    max_parents: int | None = None
    aliases: tuple[str, ...] = field(default=())
    uses_class_fractions: bool = False
    """Whether ``fn`` reads ``FusionData.class_fractions`` (its head's targets); :func:`fuse`
    checks their width for such a method and warns once that any other ignores them."""

    def make_params(self, values: Mapping[str, object] | None = None) -> object:
        """The parameter object from plain values; an unknown key names the valid ones."""
        values = dict(values or {})
        names = [f.name for f in dataclasses.fields(self.params)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(
                f"fusion method {self.name!r}: unknown parameter(s) {unknown}; valid: {names}"
            )
        try:
            return self.params(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"fusion method {self.name!r}: {exc}") from None


FUSION_METHODS: dict[str, FusionMethod] = {}


def register(method: FusionMethod) -> FusionMethod:
    for name in (method.name, *method.aliases):
        if name in FUSION_METHODS:
            raise RuntimeError(f"fusion method {name!r} registered twice")
        FUSION_METHODS[name] = method
    return method


def get_method(name: str) -> FusionMethod:
    import mergeforge.fusion  # noqa: F401  (registers every method)

    if name not in FUSION_METHODS:
        raise ConfigError(
            f"unknown fusion method {name!r}; available: {sorted(FUSION_METHODS)} "
            "(`mergeforge fuse --help` lists them)"
        )
    return FUSION_METHODS[name]


def level_of(key: str, levels: Sequence[str]) -> str | None:
    """The level (module name) a parameter belongs to: the longest level name prefixing it."""
    best = None
    for name in levels:
        if (key == name or key.startswith(name + ".")) and (best is None or len(name) > len(best)):
            best = name
    return best


def check_parents(parents: Sequence[nn.Module], *, names: Sequence[str] | None = None) -> None:
    """Same class, same parameter names and shapes, every value finite; errors name the parent
    (``names[k]`` or ``parent k``), the tensor and its level."""
    if not parents:
        raise ValidationError("fusion: no parents given")
    labels = list(names) if names is not None else [f"parent {k}" for k in range(len(parents))]
    levels = tuple(getattr(parents[0], "levels", ()))
    ref = parents[0].state_dict()
    for k, parent in enumerate(parents):
        if type(parent) is not type(parents[0]):
            raise ValidationError(
                f"fusion: {labels[k]} is a {type(parent).__name__}, {labels[0]} a "
                f"{type(parents[0]).__name__}; fusion needs one architecture"
            )
        sd = parent.state_dict()
        missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
        if missing or extra:
            raise ValidationError(
                f"fusion: {labels[k]} does not have {labels[0]}'s tensors (missing {missing[:5]}, "
                f"extra {extra[:5]}); fusion needs one architecture"
            )
        for key, t in sd.items():
            where = f"tensor {key!r}" + (
                f" (level {lv!r})" if (lv := level_of(key, levels)) else ""
            )
            if t.shape != ref[key].shape:
                raise ValidationError(
                    f"fusion: {labels[k]} {where} has shape {tuple(t.shape)}, {labels[0]} "
                    f"{tuple(ref[key].shape)}; parents of different widths cannot be fused"
                )
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValidationError(f"fusion: {labels[k]} {where} contains NaN or Inf")


_WARNED: set[str] = set()  # methods already warned that they ignore class_fractions


def _check_class_fractions(spec: FusionMethod, parents: Sequence[nn.Module], data) -> None:
    """K rows (one per parent); for a method that reads them, C columns = the parents' output
    width (parent 0 run on one example, in eval mode, its flags restored), so that a wrong C
    fails now rather than at the head after every level is fitted. A method that ignores
    them says so once (per method and process)."""
    f, k = data.class_fractions, len(parents)
    if len(f) != k:
        raise ValidationError(f"fusion data: class_fractions has {len(f)} rows for {k} parents")
    if not spec.uses_class_fractions:
        if spec.name not in _WARNED:
            _WARNED.add(spec.name)
            log.warning(
                "fusion method %r ignores class_fractions (only hf, kf, kf_gradient and "
                "last_layer_kd weight their head by them)",
                spec.name,
            )
        return
    first = next(iter(parents[0].parameters()), None)
    x = data.inputs[:1] if first is None else data.inputs[:1].to(first.device)
    with eval_mode(parents[:1]), torch.no_grad():
        out = parents[0](x)
    classes = out.shape[-1] if isinstance(out, torch.Tensor) and out.ndim >= 1 else None
    if classes is not None and f.shape[1] != classes:
        raise ValidationError(
            f"fusion data: class_fractions has {f.shape[1]} columns for the parents' {classes} "
            f"classes (their output width); give a {k}×{classes} tensor (parent × class)"
        )


def fuse(
    parents: Sequence[nn.Module],
    data: FusionData,
    method: str,
    parameters: Mapping[str, object] | None = None,
    *,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Fuse ``parents`` (never modified) with a registered method; returns the fused state dict
    (parent 0's architecture). Parents and data are checked before the method runs."""
    spec = get_method(method)
    params = spec.make_params(parameters)
    k = len(parents)
    if k < spec.min_parents or (spec.max_parents is not None and k > spec.max_parents):
        most = "" if spec.max_parents is None else f" and at most {spec.max_parents}"
        raise ValidationError(
            f"fusion method {spec.name!r} needs at least {spec.min_parents}{most} parents, got {k}"
        )
    check_parents(parents, names=names)
    if data.class_fractions is not None:
        _check_class_fractions(spec, parents, data)
    out = spec.fn(parents, data, params)
    for key, t in out.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValidationError(
                f"fusion method {spec.name!r} produced NaN/Inf in {key!r} (a bug or a degenerate "
                "fusion set; try more fusion data)"
            )
    return out
