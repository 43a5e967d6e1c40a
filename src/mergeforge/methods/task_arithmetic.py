"""Generalized task arithmetic, and its members without sign consensus.

One function, :func:`generalized_task_arithmetic`, is the whole family:

    τ_i = sparsify(θ_i − θ₀) · w_i  →  [elect_sign → keep agreeing entries]  →  (disjoint) sum
    →  [÷ Σ w_i of the entries kept, when normalize]  →  θ = θ₀ + λ·τ_m

Task arithmetic (2212.04089) has no sparsifier and no consensus; DARE, breadcrumbs and DELLA
plug in a sparsifier (:mod:`mergeforge.methods.sparsify`); the TIES members
(:mod:`mergeforge.methods.ties`) add the consensus step (:mod:`mergeforge.methods.consensus`).
Step order and numerics are mergekit's ``GeneralizedTaskArithmeticMerge``: weights multiply the
task vectors after sparsification and rescaling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergeforge.methods import params as P
from mergeforge.methods.base import Method, TensorContext, register
from mergeforge.methods.consensus import disjoint_sum, elect_sign_list
from mergeforge.methods.sparsify import (
    NAMED_STREAMS,
    Sparsifier,
    della_magprune,
    magnitude_outliers,
    model_generators,
    random,
    sparsify,
)


def generalized_task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    model_params: Sequence[P.WeightParams],
    ctx: TensorContext,
    *,
    sparsifiers: Sequence[Sparsifier | None],
    rescale_norm: str | None,
    consensus: str | None,
    normalize: bool,
    lambda_: float,
) -> Tensor:
    """Merge the N experts ``tensors`` (each of the shape S of ``base``) into one tensor S.

    ``sparsifiers[i]`` sparsifies model i's task vector (None: keep it dense); ``consensus``
    is an :func:`elect_sign` method or None (plain weighted sum).
    """
    # One task vector at a time, in place: no (N, *S) stack and few fresh allocations, which
    # dominate the cost of element-wise ops on large CPU tensors. The arithmetic and its order
    # are mergekit's (sparsify, rescale, × weight, sum over models, ÷ divisor, × λ, + base).
    gens = model_generators(ctx, len(tensors), base.device)
    weights = [float(mp.weight) for mp in model_params]
    deltas: list[Tensor] = []
    merged: Tensor | None = None
    for x, mp, sparsifier, gen, w in zip(
        tensors, model_params, sparsifiers, gens, weights, strict=True
    ):
        delta = torch.sub(x, base)  # fresh tensor: sub/sparsify never return an input
        if sparsifier is not None:
            delta = sparsify(delta, sparsifier, mp, rescale_norm=rescale_norm, generator=gen)
        if consensus:
            deltas.append(delta.mul_(w))
        elif merged is None:
            merged = delta.mul_(w)
        else:  # without consensus, accumulate: one task vector alive at a time. mul_ then
            # add_ rather than add_(alpha=w), which fuses (FMA) and rounds differently
            merged.add_(delta.mul_(w))
            del delta
    if consensus:
        merged, divisor = disjoint_sum(deltas, weights, elect_sign_list(deltas, consensus))
    else:
        total = sum(weights)
        divisor = 1.0 if abs(total) < 1e-8 else total
    assert merged is not None
    del deltas
    if normalize:
        merged.div_(divisor)
    if lambda_ != 1:
        merged.mul_(lambda_)
    return merged.add_(base)


def task_arithmetic(base, tensors, params, model_params, ctx):
    return generalized_task_arithmetic(
        base, tensors, model_params, ctx, sparsifiers=[None] * len(tensors), rescale_norm=None,
        consensus=None, normalize=params.normalize, lambda_=params.lambda_,
    )  # fmt: skip


def sparse_fn(sparsifier: Sparsifier, *, consensus: bool):
    """The ``Method.fn`` of one sparse member: its sparsifier and whether signs are elected."""

    def fn(base, tensors, params, model_params, ctx):
        return generalized_task_arithmetic(
            base, tensors, model_params, ctx, sparsifiers=[sparsifier] * len(tensors),
            rescale_norm=params.rescale_norm if params.rescale else None,
            consensus=params.consensus_method if consensus else None,
            normalize=params.normalize, lambda_=params.lambda_,
        )  # fmt: skip

    return fn


_DELTA = "θ = θ₀ + λ·Σ w_i·τ_i"
register(
    Method(
        name="task_arithmetic",
        elementwise=True,
        fn=task_arithmetic,
        summary=f"Task arithmetic: {_DELTA}; negative weights subtract (forgetting).",
        reference="https://arxiv.org/abs/2212.04089",
        params=P.TaskArithmeticParams,
        model_params=P.WeightParams,
    )
)
register(
    Method(
        name="dare_linear",
        fn=sparse_fn(random, consensus=False),
        summary=f"DARE: drop task-vector entries at random (keep density), rescale; {_DELTA}.",
        reference="https://arxiv.org/abs/2311.03099",
        params=P.DareLinearParams,
        model_params=P.SparseModelParams,
        stochastic=True,
        notes=NAMED_STREAMS,
    )
)
register(
    Method(
        name="breadcrumbs",
        fn=sparse_fn(magnitude_outliers, consensus=False),
        summary=f"Model Breadcrumbs: drop the largest (gamma) and smallest entries; {_DELTA}.",
        reference="https://arxiv.org/abs/2312.06795",
        params=P.SparseParams,
        model_params=P.BreadcrumbsModelParams,
    )
)
register(
    Method(
        name="della_linear",
        fn=sparse_fn(della_magprune, consensus=False),
        summary=f"DELLA MagPrune (rank-based keep probability), rescale; {_DELTA}.",
        reference="https://arxiv.org/abs/2406.11617",
        params=P.DareLinearParams,
        model_params=P.DellaModelParams,
        stochastic=True,
        notes=NAMED_STREAMS,
    )
)
