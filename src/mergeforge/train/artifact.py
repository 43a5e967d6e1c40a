"""The curvature artifact: what training leaves beside an expert for saliency pruning and
curvature-aware merges (UMTAM, arXiv 2512.17109; OTA, 2509.11167).

One sidecar of kind ``curvature`` (:mod:`mergeforge.checkpoint.sidecar`):
``MODEL/mergeforge-stats/curvature.safetensors``, fp32, keyed by the parameter name ``P`` *as the
saved checkpoint spells it*:

* ``P:R`` (m,) and ``P:C`` (n,): row and column second moments of the gradients of a weight of
  shape (m, n); a weight of more dimensions is read as (shape[0], prod(rest));
* ``P:R`` alone, of the parameter's own shape, for a 1-D (or 0-D) parameter: the elementwise
  second moment;
* optional ``P:S``: a dense saliency (the UMTAM optimizer's running one); absent, saliency is
  :func:`saliency` of τ = W_T − W₀ (W₀ the base on disk) at prune / merge time;
* optional ``P:v``: Adam's ``exp_avg_sq`` (dense, as the optimizer holds it: no bias
  correction), for OTA.

Metadata (strings): ``kind``, ``variant`` (:data:`VARIANTS`), ``beta2`` (``none`` for ``sum``),
``steps``, ``examples`` (``unknown`` when not counted), ``source`` (``umtam-optimizer`` or
``recorder:<optimizer class>``), ``has_saliency``, ``has_exp_avg_sq``, plus what
:func:`~mergeforge.checkpoint.sidecar.save_sidecar` adds (version, ``weights_fingerprint``). The
fingerprint ties the file to the saved weights, so write it *after* the model: a file whose model
changed since is refused with :data:`~mergeforge.checkpoint.sidecar.CURVATURE_COMMAND`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mergeforge.checkpoint.sidecar import CURVATURE_COMMAND, open_sidecar, save_sidecar
from mergeforge.errors import ValidationError
from mergeforge.methods.curvature import factored, matrix_shape
from mergeforge.methods.curvature import saliency as saliency  # lives below, for the methods

KIND = "curvature"
VARIANTS = ("ema", "notebook", "sum")
"""How R and C were accumulated (../shared/ALGORITHMS.md §4): ``ema`` β₂-EMAs of the row /
column *sums* of g² (the paper), ``notebook`` β₂-EMAs of row / column *means* (the authors'
experiment notebooks, β₂ 0.999), ``sum`` the sums of row / column g² divided by the steps (their
later variant)."""
_FIELDS = ("R", "C", "S", "v")


@dataclass(frozen=True)
class Curvature:
    """One parameter's statistics (fp32). ``C`` is ``None`` for 1-D parameters; ``S`` and ``v``
    are ``None`` unless recorded."""

    R: Tensor
    C: Tensor | None = None
    S: Tensor | None = None
    v: Tensor | None = None


@dataclass(frozen=True)
class CurvatureMeta:
    """Provenance of an artifact. ``beta2`` is ``None`` for ``sum``; ``examples`` ``None`` when
    unknown."""

    variant: str
    steps: int
    source: str
    beta2: float | None = None
    examples: int | None = None


def curvature_tensors(stats: Mapping[str, Curvature]) -> dict[str, Tensor]:
    """The file's tensors: ``{"P:R": ..., "P:C": ..., "P:S": ..., "P:v": ...}`` (absent fields
    left out)."""
    out: dict[str, Tensor] = {}
    for name, c in stats.items():
        for field in _FIELDS:
            t = getattr(c, field)
            if t is not None:
                out[f"{name}:{field}"] = t
    return out


def curvature_stats(tensors: Mapping[str, Tensor]) -> dict[str, Curvature]:
    """The inverse of :func:`curvature_tensors`: ``{"P:R": ..., "P:C": ...}`` grouped into
    ``{P: Curvature}``; a key that is not ``P:<R|C|S|v>``, or a parameter without R, is a
    :class:`ValueError` naming it."""
    fields: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        name, _, field = key.rpartition(":")
        if field not in _FIELDS or not name:
            raise ValueError(f"unexpected curvature tensor {key!r}: keys are P:R, P:C, P:S, P:v")
        fields.setdefault(name, {})[field] = t
    missing = [n for n, d in fields.items() if "R" not in d]
    if missing:
        raise ValueError(f"curvature statistics of {missing[0]!r} have no R")
    return {name: Curvature(**d) for name, d in fields.items()}


def _expected(field: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape ``field`` must have for a parameter of ``shape`` (``None``: not allowed)."""
    if field in ("S", "v"):
        return shape
    if not factored(shape):
        return shape if field == "R" else None
    m, n = matrix_shape(shape)
    return (m,) if field == "R" else (n,)


def _check_meta(meta: CurvatureMeta) -> None:
    if meta.variant not in VARIANTS:
        raise ValueError(f"curvature variant must be one of {VARIANTS}, got {meta.variant!r}")
    if (meta.beta2 is None) != (meta.variant == "sum"):
        raise ValueError(f"beta2 is given for the {meta.variant!r} variant exactly when it is an "
                         f"EMA (ema, notebook); got beta2={meta.beta2}")  # fmt: skip
    if meta.steps < 1:
        raise ValueError(f"no training steps were recorded (steps={meta.steps})")
    if meta.examples is not None and meta.examples < 0:
        raise ValueError(f"examples must be >= 0, got {meta.examples}")


def check_against_model(model_dir: str | os.PathLike[str], stats: Mapping[str, Curvature]) -> None:
    """Every parameter of ``stats`` is a tensor of the saved model and every field has the shape
    the module docstring gives (read from the checkpoint's headers), and every value is finite
    and non-negative; else a :class:`ValidationError` naming the parameter."""
    from mergeforge.checkpoint import open_checkpoint

    if not stats:
        raise ValidationError(f"no curvature statistics to save for {model_dir}")
    ck = open_checkpoint(Path(os.fspath(model_dir)))
    try:
        keys = set(ck.keys())
        for name, c in stats.items():
            if name not in keys:
                raise ValidationError(
                    f"curvature statistics for {name!r}, but the model saved in {model_dir} has "
                    "no such tensor: save the model first (save_pretrained / save_model) and key "
                    "the statistics by its tensor names"
                )
            shape = tuple(ck.info(name).shape)
            for field in _FIELDS:
                t = getattr(c, field)
                if t is None:
                    if field == "C" and factored(shape):
                        raise ValidationError(f"curvature statistics for {name!r} {list(shape)} "
                                              "lack the column moment C")  # fmt: skip
                    continue
                want = _expected(field, shape)
                if want is None or tuple(t.shape) != want:
                    raise ValidationError(
                        f"curvature statistic {name}:{field} has shape {list(t.shape)}, but "
                        f"{name} is {list(shape)} in {model_dir}"
                        + (f": {field} must be {list(want)}" if want is not None else
                           f": a {len(shape)}-D parameter has no {field}")
                    )  # fmt: skip
                if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                    raise ValidationError(f"curvature statistic {name}:{field} holds negative, "
                                          "NaN or infinite values")  # fmt: skip
    finally:
        ck.close()


def save_curvature(
    model_dir: str | os.PathLike[str], stats: Mapping[str, Curvature], meta: CurvatureMeta
) -> Path:
    """Write ``stats`` (``{parameter name in the saved checkpoint: Curvature}``) as
    ``model_dir``'s curvature sidecar, atomically, after checking them against the saved model
    (:func:`check_against_model`); the model must be saved first (its fingerprint goes into the
    file). Returns the path."""
    _check_meta(meta)
    check_against_model(model_dir, stats)
    examples = "unknown" if meta.examples is None else str(meta.examples)
    extra = {
        "variant": meta.variant,
        "beta2": "none" if meta.beta2 is None else repr(meta.beta2),
        "steps": str(meta.steps),
        "examples": examples,
        "has_saliency": str(any(c.S is not None for c in stats.values())).lower(),
        "has_exp_avg_sq": str(any(c.v is not None for c in stats.values())).lower(),
    }
    # save_sidecar's generic count fields (ints there; extra overrides them): "asked for" and
    # "used" are both the examples training saw, "unknown" when nobody counted them.
    extra |= {"num_examples": examples, "examples_used": examples}
    return save_sidecar(model_dir, KIND, curvature_tensors(stats), num_examples=0,
                        examples_used=0, source=meta.source, extra=extra)  # fmt: skip


def load_curvature(
    model_dir: str | os.PathLike[str],
) -> tuple[dict[str, Curvature], CurvatureMeta]:
    """``({parameter name: Curvature}, CurvatureMeta)`` from ``model_dir``'s curvature sidecar,
    fp32 on the CPU. A missing file, or one whose model changed since (fingerprint), is refused
    with a :class:`ValidationError` giving :data:`CURVATURE_COMMAND`."""
    command = CURVATURE_COMMAND.format(model=os.fspath(model_dir))
    f = open_sidecar(model_dir, KIND, command=command)
    try:
        m = f.metadata
        stats = curvature_stats({k: f.get(k).float().clone() for k in f.keys()})
        meta = CurvatureMeta(
            variant=m["variant"],
            steps=int(m["steps"]),
            source=m["source"],
            beta2=None if m["beta2"] == "none" else float(m["beta2"]),
            examples=None if m["examples"] == "unknown" else int(m["examples"]),
        )
    except (KeyError, ValueError) as e:
        raise ValidationError(f"{f.path}: unreadable curvature statistics ({e}). "
                              f"Recompute them with: {command}") from e  # fmt: skip
    finally:
        f.close()
    return stats, meta
