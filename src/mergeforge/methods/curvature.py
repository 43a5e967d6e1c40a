"""Curvature recorded while an expert trained, as the merge methods read it (UMTAM, arXiv
2512.17109; OTA, 2509.11167): the one place of the formulas that ``mergeforge.train`` (which
writes the statistics) and the methods (which read them) share.

Per parameter P of shape (m, n) (more dimensions read as (shape[0], prod(rest))) the
``curvature`` sidecar holds ``P:R`` (m,) and ``P:C`` (n,), the row and column second moments of
its gradients; a 1-D (or 0-D) parameter holds ``P:R`` of its own shape, the elementwise moment;
optional ``P:S`` (a dense saliency) and ``P:v`` (Adam's ``exp_avg_sq``). The file's layout and
metadata are documented in :mod:`mergeforge.train.artifact`. From them:

* the curvature K = √(R ⊗ C) (m, n), taken as √R ⊗ √C (the same numbers, no (m, n) product of
  the moments); √R for a 1-D parameter (:func:`curvature`);
* the saliency of a task vector τ = W_T − W₀, S = τ² ⊙ K (:func:`saliency`);
* the rank-1 (Adafactor) estimate of the elementwise second moment, v̂ = R Cᵀ / ΣR for moments
  that are row / column *sums* (variants ``ema``, ``sum``) and R Cᵀ / mean(R) for *means*
  (``notebook``): both are the same v̂ (:func:`second_moment`); ΣR = ΣC = Σv when R, C are the
  row / column sums of v, OTA's "Lemma 1".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mergeforge.checkpoint.sidecar import CURVATURE_COMMAND
from mergeforge.errors import ValidationError
from mergeforge.methods.base import SidecarInputs

KIND = "curvature"
MEAN_VARIANTS = ("notebook",)
"""Variants whose R, C are row / column means (``mergeforge.train.artifact.VARIANTS``)."""


def factored(shape: tuple[int, ...] | torch.Size) -> bool:
    """Whether a parameter of ``shape`` has row / column moments (2-D and more) rather than an
    elementwise one."""
    return len(shape) >= 2


def matrix_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """(m, n) that a parameter of two or more dimensions is read as: (shape[0], prod(rest))."""
    return shape[0], math.prod(shape[1:])


def _check(R: Tensor, C: Tensor | None, shape: tuple[int, ...], what: str) -> None:
    """R, C fit a parameter of ``shape`` (``what`` names it in the message)."""
    if C is None:
        if tuple(R.shape) != shape:
            raise ValueError(f"R has shape {list(R.shape)}, {what} {list(shape)}")
        return
    m, n = matrix_shape(shape)
    if tuple(R.shape) != (m,) or tuple(C.shape) != (n,):
        raise ValueError(f"R {list(R.shape)} and C {list(C.shape)} do not fit {what} of shape "
                         f"{list(shape)} read as ({m}, {n})")  # fmt: skip


def curvature(
    R: Tensor, C: Tensor | None, shape: tuple[int, ...] | torch.Size, what: str = "a parameter"
) -> Tensor:
    """K = √(R ⊗ C) as √R ⊗ √C, fp32, of ``shape`` (R (m,), C (n,) for ``shape`` read as (m, n));
    √R for a 1-D parameter (``C`` is ``None`` and R has ``shape``)."""
    shape = tuple(shape)
    _check(R, C, shape, what)
    if C is None:
        return R.float().sqrt()
    return (R.float().sqrt()[:, None] * C.float().sqrt()[None, :]).reshape(shape)


def saliency(tau: Tensor, R: Tensor, C: Tensor | None = None) -> Tensor:
    """S = τ² ⊙ √(R ⊗ C) (UMTAM's final saliency), fp32, of ``tau``'s shape.

    ``tau`` = W_T − W₀; R (m,), C (n,) for a weight read as (m, n); for a 1-D parameter
    ``C`` is ``None`` and S = τ² ⊙ √R.
    """
    return tau.float().square() * curvature(R, C, tau.shape, "τ")


def second_moment(R: Tensor, C: Tensor | None, shape, *, means: bool = False) -> Tensor:
    """The rank-1 estimate v̂ of the elementwise second moment (Adafactor), fp32, of ``shape``:
    R Cᵀ / ΣR for row / column sums, R Cᵀ / mean(R) for row / column means (``means``); R itself
    for a 1-D parameter. Zero where ΣR is zero (no gradient ever)."""
    _check(R, C, tuple(shape), "a parameter")
    if C is None:
        return R.float()
    r, c = R.float(), C.float()
    total = r.mean() if means else r.sum()
    if float(total) <= 0:
        return torch.zeros(tuple(shape), dtype=torch.float32, device=R.device)
    return (r[:, None] * (c / total)[None, :]).reshape(tuple(shape))


def parts(shape: tuple[int, ...], dense: Sequence[str] = ()) -> dict[str, tuple[int, ...]]:
    """``{suffix: shape}`` of the curvature statistics of a tensor of ``shape``: ``:R``, ``:C``
    (factored) or ``:R`` (elementwise), plus the ``dense`` ones asked for (``:S``, ``:v``: the
    tensor's shape)."""
    if factored(shape):
        m, n = matrix_shape(shape)
        out = {":R": (m,), ":C": (n,)}
    else:
        out = {":R": tuple(shape)}
    return out | {s: tuple(shape) for s in dense}


def curvature_inputs(
    optional: tuple[str, ...] = (":S",), needed: tuple[str, ...] = (), matrices_only: bool = False
) -> SidecarInputs:
    """What a method reading the ``curvature`` sidecar declares: every merged tensor needs its
    ``:R`` (and ``:C``) and the ``needed`` dense ones; ``optional`` are read where the file has
    them; ``matrices_only``: tensors of fewer than two dimensions read none. A missing file is
    refused with how to record it (:data:`~mergeforge.checkpoint.sidecar.CURVATURE_COMMAND`:
    training again; no data pass makes these statistics)."""
    dense = (*needed, *optional)

    def shape(key: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]] | None:
        return None if matrices_only and not factored(shape) else parts(shape, dense)

    return SidecarInputs(kind=KIND, num_examples=None, shape=shape, required=True,
                         command=CURVATURE_COMMAND, optional=optional)  # fmt: skip


def moments(stat: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """(R, C) of one tensor's curvature statistics (C ``None`` for a 1-D parameter)."""
    return stat[":R"], stat.get(":C")


def uses_means(meta: Mapping[str, str] | None) -> bool:
    """Whether a curvature file's R, C are row / column means (its ``variant``); statistics
    given in memory without metadata are taken as sums, the paper's."""
    return (meta or {}).get("variant") in MEAN_VARIANTS


def check_same_scale(ctx, method: str, fix: str) -> None:
    """Refuse curvature of one merge whose R, C are sums for some experts and means for others
    (``variant``): K would then differ by √(m n) between them for the same matrix."""
    metas = ctx.sidecar_meta or ()
    kinds = {uses_means(m) for m in metas}
    if len(kinds) > 1:
        names = ctx.model_names or tuple(range(len(metas)))
        shown = ", ".join(f"{n}: {(m or {}).get('variant', 'ema')}"
                          for n, m in zip(names, metas, strict=False))  # fmt: skip
        raise ValidationError(
            f"{method}: the experts' curvature was recorded with variants of different scales "
            f"({shown}); 'notebook' keeps row / column means, 'ema' and 'sum' row / column sums. "
            f"Record every expert with one variant, or {fix}."
        )
