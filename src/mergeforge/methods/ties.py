"""The TIES members of generalized task arithmetic: sparsify → elect sign → disjoint mean.

TIES (2306.01708) trims by magnitude; DARE-TIES (2311.03099) drops at random; breadcrumbs-TIES
(2312.06795) drops outliers and small entries; DELLA (2406.11617) drops with rank-based
probabilities inside each row; ``ranked_ties`` (a mergekit branch's method, no paper) with
keep probabilities linear in the magnitude rank over the whole tensor. All five are
:func:`generalized_task_arithmetic` with a different sparsifier (:mod:`.sparsify`) and sign
consensus (:mod:`.consensus`). Shapes: each input has the shape of
``base``; so does the result.
"""

from __future__ import annotations

from mergeforge.methods import params as P
from mergeforge.methods.base import Method, register
from mergeforge.methods.sparsify import (
    NAMED_STREAMS,
    della_magprune,
    magnitude,
    magnitude_outliers,
    random,
    ranked,
)
from mergeforge.methods.stats import ModelTopK, NoStatistic, keep_at_least
from mergeforge.methods.task_arithmetic import generalized_task_arithmetic, sparse_fn
from mergeforge.methods.ties_chunked import ties_chunked, usable


def ties(base, tensors, params, model_params, ctx):
    """TIES; with ``topk_scope: model`` the trim keeps each task vector's top ``density`` over
    the whole model, using the thresholds of the :class:`ModelTopK` pass (``ctx.fitted``)."""
    if usable(base, tensors, params):  # large CPU tensors: same result, 2 sweeps over memory
        return ties_chunked(
            base, tensors, [float(mp.weight) for mp in model_params],
            [float(mp.density) for mp in model_params], consensus=params.consensus_method,
            normalize=params.normalize, lambda_=params.lambda_,
        )  # fmt: skip
    if params.topk_scope == "tensor":
        sparsifiers = [magnitude] * len(tensors)
    else:
        if ctx.fitted is None or len(ctx.fitted) != len(tensors):
            raise RuntimeError(
                f"ties with topk_scope: model needs the thresholds of its statistics pass in "
                f"ctx.fitted (one per model) for {ctx.key!r}; run the method's statistic first"
            )
        # a model with density 0 or 1 has no threshold, and sparsify never asks for one
        sparsifiers = [keep_at_least(t) if t is not None else magnitude for t in ctx.fitted]
    return generalized_task_arithmetic(
        base,
        tensors,
        model_params,
        ctx,
        sparsifiers=sparsifiers,
        rescale_norm=params.rescale_norm if params.rescale else None,
        consensus=params.consensus_method,
        normalize=params.normalize,
        lambda_=params.lambda_,
    )


def _ties_warm_up(params: P.TiesParams, n_models: int, dtype, device) -> None:
    """Load the fused tail's kernel in the background while the engine starts (see _fused)."""
    if params.topk_scope == "tensor" and not params.rescale and device.type == "cpu":
        from mergeforge.methods import _fused

        _fused.warm_up_async(dtype, n_models)


def _ties_statistic(params: P.TiesParams):
    return ModelTopK() if params.topk_scope == "model" else NoStatistic()


_STEPS = "elect sign, disjoint mean, θ = θ₀ + λ·τ_m"
register(
    Method(
        name="ties",
        fn=ties,
        summary=f"TIES: trim to the top density of |τ| (per tensor or whole model), {_STEPS}.",
        reference="https://arxiv.org/abs/2306.01708",
        params=P.TiesParams,
        model_params=P.SparseModelParams,
        statistic=_ties_statistic,
        warm_up=_ties_warm_up,
    )
)
register(
    Method(
        name="dare_ties",
        fn=sparse_fn(random, consensus=True),
        summary=f"DARE-TIES: random drop (keep density), rescale, {_STEPS}.",
        reference="https://arxiv.org/abs/2311.03099",
        params=P.DareTiesParams,
        model_params=P.SparseModelParams,
        stochastic=True,
        notes=NAMED_STREAMS,
    )
)
register(
    Method(
        name="breadcrumbs_ties",
        fn=sparse_fn(magnitude_outliers, consensus=True),
        summary=f"Model Breadcrumbs with TIES: drop outliers and small entries, {_STEPS}.",
        reference="https://arxiv.org/abs/2312.06795",
        params=P.SparseTiesParams,
        model_params=P.BreadcrumbsModelParams,
    )
)
register(
    Method(
        name="della",
        fn=sparse_fn(della_magprune, consensus=True),
        summary=f"DELLA: rank-based random drop (MagPrune), rescale, {_STEPS}.",
        reference="https://arxiv.org/abs/2406.11617",
        params=P.DellaParams,
        model_params=P.DellaModelParams,
        stochastic=True,
        notes=NAMED_STREAMS,
    )
)
register(
    Method(
        name="ranked_ties",
        fn=sparse_fn(ranked, consensus=True),
        summary=f"Ranked TIES: keep each entry with probability linear in its |τ| rank "
        f"(1 → 0), rescale (L1), {_STEPS}; no normalisation by default.",
        reference="https://github.com/arcee-ai/mergekit/blob/192af12d81391559e94a9160b56e7f2749a350bd/mergekit/sparsify.py",
        params=P.DareTiesParams,
        model_params=P.RankedModelParams,
        stochastic=True,
        notes=NAMED_STREAMS
        + " mergekit's definition (a 2024 branch, named by its examples/ties.yml; no mergekit "
        "release has it) ignores `density` below 1: about half of each task vector survives. "
        "`density_aware: true` makes the mean keep probability the density.",
    )
)
