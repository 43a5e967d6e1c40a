"""Saliency pruning ("grafting", UMTAM arXiv 2512.17109 §4; ../shared/ALGORITHMS.md §4): keep the
entries of one expert that matter most and return the others to the base,

    θ = θ₀ + m ⊙ (θ_T − θ₀),   m = [score ≥ the global top-``density`` threshold, score > 0]

over every weight of two or more dimensions at once (the whole model's top-k, not each tensor's).
Scores, with τ = θ_T − θ₀:

* ``saliency``: S = τ² ⊙ √(R ⊗ C) (:func:`.curvature.saliency`) from the curvature the expert
  recorded while it trained, or its recorded ``P:S`` where the sidecar has one;
* ``magnitude``: |τ|, the paper's baseline (W_T − W₀)² in the same order, without the underflow of
  squaring tiny entries;
* ``fisher``: F ⊙ τ² with the diagonal Fisher of ``mergeforge stats fisher`` (the post-hoc
  counterpart of the saliency: the Fisher's second-order estimate of the loss change).

The threshold is the m-th largest score over the model, m = max(1, ⌊density·n⌋), n the entries of
the scored weights, found in two streaming passes (:class:`.stats.ModelTopK`: 512 KiB of counts,
whatever the model's size). Entries tied at it are all kept, except entries scored 0, which
always return to the base: when more than 1 − ``density`` of the entries score 0 (saliency: rows
or columns no gradient reached, moved only by weight decay), fewer than ``density`` are kept.
Tensors of fewer than two dimensions (biases, norms) keep the expert's value: the paper prunes
matrices. The output is the expert's (its tensor names, config and head: ``Method.output_like``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mergeforge.methods.base import Method, SidecarInputs, register
from mergeforge.methods.checks import check_choice, check_real, fail
from mergeforge.methods.curvature import curvature_inputs, factored, moments, saliency
from mergeforge.methods.fisher import FisherParams, fisher_sidecars
from mergeforge.methods.stats import ModelTopK

SCORES = ("saliency", "magnitude", "fisher")


@dataclass(frozen=True)
class PruneParams:
    score: str = "saliency"
    """What ranks the entries: ``saliency`` (τ² ⊙ √(R ⊗ C), recorded curvature), ``magnitude``
    (|τ|) or ``fisher`` (F ⊙ τ², ``mergeforge stats fisher``)."""
    fisher: str = "sampled"
    """Which diagonal Fisher ``score: fisher`` reads: ``sampled`` or ``empirical``."""

    def __post_init__(self) -> None:
        check_choice("score", self.score, SCORES)
        check_choice("fisher", self.fisher, ("sampled", "empirical"))


@dataclass(frozen=True)
class PruneModelParams:
    density: float
    """Fraction of the expert's 2-D weight entries kept (the top scores over the whole model),
    in (0, 1]; the others return to the base."""

    def __post_init__(self) -> None:
        check_real("density", self.density, 0.0, 1.0)
        if self.density <= 0:
            fail("density", self.density, "a number in (0, 1]: the fraction of entries kept")


def prune_score(base: Tensor, x: Tensor, stat: Any, params: PruneParams) -> Tensor | None:
    """The score of each entry of one weight (``None`` for tensors of fewer than 2 dimensions,
    which are not pruned); the :class:`.stats.Score` of the whole-model pass."""
    if not factored(x.shape):
        return None
    tau = x - base
    if params.score == "magnitude":
        return tau.abs()
    if params.score == "fisher":
        return stat * tau.float().square()
    if ":S" in stat:
        return stat[":S"]
    return saliency(tau, *moments(stat))


def prune(base, tensors, params: PruneParams, model_params, ctx) -> Tensor:
    (x,) = tensors
    if ctx.fitted is None:
        raise RuntimeError(f"prune needs the threshold of its statistics pass in ctx.fitted for "
                           f"{ctx.key!r}; run the method's statistic first")  # fmt: skip
    (threshold,) = ctx.fitted
    score = prune_score(base, x, ctx.sidecars[0] if ctx.sidecars else None, params)
    if score is None or threshold is None:  # not a matrix, or density 1: the expert's value
        return x
    score = score.to(torch.float32)
    # an entry scored 0 carries no importance (saliency: no gradient reached its row or column;
    # it moved only by weight decay): it returns to the base even when the threshold is 0
    return torch.where((score >= threshold) & (score > 0), x, base)


def prune_sidecars(params: PruneParams) -> SidecarInputs | None:
    if params.score == "magnitude":
        return None
    if params.score == "saliency":
        return curvature_inputs(optional=(":S",), matrices_only=True)
    req = fisher_sidecars(FisherParams(fisher=params.fisher))
    return dataclasses.replace(req, shape=lambda key, shape: shape if factored(shape) else None)


register(
    Method(
        name="prune",
        fn=prune,
        summary="Saliency pruning (grafting): keep one expert's top density of τ² ⊙ √(R ⊗ C) "
        "(or magnitude, or F ⊙ τ²) over all its matrices; the rest return to the base.",
        reference="https://arxiv.org/abs/2512.17109",
        params=PruneParams,
        model_params=PruneModelParams,
        max_models=1,
        statistic=lambda params: ModelTopK(score=prune_score),
        sidecar_inputs=prune_sidecars,
        output_like="first",
        notes="`mergeforge prune EXPERT --base BASE --density D --score S OUT`. score: saliency "
        "needs the expert's curvature recorded while it trained (README: Train merge-ready "
        "experts); score: fisher `mergeforge stats fisher`.",
    )
)
