"""RAM and RAM+ (Reinforced Agent Merging, 2601.13572): average the shared updates, keep the
unique ones whole.

For the N task vectors τ_i = θ_i − θ₀ of one tensor: an entry is *changed* by model i when
|τ_i| > ``epsilon``; c = the number of models changing it. Entries changed by one model
(*unique*) take that model's τ_i undiluted; entries changed by several (*shared*) take the mean
of their τ_i; the rest keep the base:

    RAM:  θ = θ₀ + Σ_i [changed_i]·τ_i·([c = 1] + [c > 1]/c)

RAM+ also boosts each model's unique entries by λ_i = 1 + r·clamp(ρ_i, 0, α), with
ρ_i = (#shared entries model i changes) / max(#unique entries it changes, ε): a model whose
changes overlap the others' more gets its own changes rescaled more against dilution. mergekit's
``ramplus_tl`` counts per tensor (tensor-local, the default ``overlap_scope: tensor``);
``overlap_scope: model`` counts over the whole model, as the paper describes RAM+ (a
statistics pass; two integers per model). Numerics as mergekit's ``ram`` / ``ramplus_tl``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mergeforge.methods.base import Method, NoParams, register
from mergeforge.methods.checks import check_choice, check_real
from mergeforge.methods.stats import NoStatistic


@dataclass(frozen=True)
class RamParams:
    epsilon: float = 1e-5
    """An entry counts as changed by a model when its |τ| exceeds this."""

    def __post_init__(self) -> None:
        check_real("epsilon", self.epsilon, 0.0)


@dataclass(frozen=True)
class RamPlusParams(RamParams):
    r: float = 0.1
    """Strength of the boost of unique entries: λ_i = 1 + r·clamp(ρ_i, 0, alpha)."""
    alpha: float = 0.2
    """Cap on the overlap ratio ρ_i in the boost."""
    overlap_scope: str = "tensor"
    """Where ρ_i counts entries: ``tensor`` (mergekit's ramplus_tl) or ``model`` (the whole
    model, as the paper's RAM+; a statistics pass)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("r", self.r)
        check_real("alpha", self.alpha, 0.0)
        check_choice("overlap_scope", self.overlap_scope, ("tensor", "model"))


def changed(deltas: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """Boolean (N, n) [|τ_i| > ε] and the counts c (1, n) of models changing each entry."""
    mask = deltas.abs() > epsilon
    return mask, mask.sum(dim=0, keepdim=True)


def overlap_counts(mask: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Per model (N,): how many shared (c > 1) and unique (c = 1) entries it changes."""
    return (mask & (counts > 1)).sum(dim=1), (mask & (counts == 1)).sum(dim=1)


def boost(shared: Tensor, unique: Tensor, params: RamPlusParams) -> Tensor:
    """λ_i = 1 + r·clamp(shared_i / max(unique_i, ε), 0, α), (N,) float."""
    rho = shared / unique.clamp(min=params.epsilon)
    return 1 + params.r * rho.clamp(min=0, max=params.alpha)


def ram_merge(base: Tensor, deltas: Tensor, mask: Tensor, counts: Tensor, scale=1.0) -> Tensor:
    """θ₀ + Σ_i [changed_i]·τ_i·(scale_i·[c = 1] + [c > 1]/c); ``scale``: (N, 1) or 1."""
    kept = deltas * mask
    unique = kept * (counts == 1) * scale
    shared = kept * (counts > 1) / counts.clamp(min=1)
    return base + (unique + shared).sum(dim=0).reshape(base.shape)


def task_vectors(base: Tensor, tensors) -> Tensor:
    """τ_i = θ_i − θ₀ flattened, stacked (N, n)."""
    return torch.stack([x - base for x in tensors]).reshape(len(tensors), -1)


def ram(base, tensors, params, model_params, ctx):
    deltas = task_vectors(base, tensors)
    mask, counts = changed(deltas, params.epsilon)
    return ram_merge(base, deltas, mask, counts)


def ramplus(base, tensors, params, model_params, ctx):
    deltas = task_vectors(base, tensors)
    mask, counts = changed(deltas, params.epsilon)
    if params.overlap_scope == "tensor":
        lam = boost(*overlap_counts(mask, counts), params)
    elif ctx.fitted is None:
        raise RuntimeError(f"ramplus_tl with overlap_scope: model needs ctx.fitted ({ctx.key!r})")
    else:
        lam = ctx.fitted
    return ram_merge(base, deltas, mask, counts, lam.to(deltas.dtype).unsqueeze(-1))


class ModelOverlap:
    """One pass summing each model's shared and unique entry counts over the whole model;
    ``result()`` is λ (N,) (float32)."""

    passes = 1

    def __init__(self, params: RamPlusParams) -> None:
        self.params = params
        self.shared: Tensor | None = None
        self.unique: Tensor | None = None

    def observe(self, pass_index, key, base, tensors, params, model_params, sidecars=()):
        mask, counts = changed(task_vectors(base, tensors), self.params.epsilon)
        shared, unique = overlap_counts(mask, counts)
        self.shared = shared.cpu() if self.shared is None else self.shared + shared.cpu()
        self.unique = unique.cpu() if self.unique is None else self.unique + unique.cpu()

    def end_pass(self, pass_index: int) -> None:
        pass

    def result(self) -> Tensor | None:
        if self.shared is None or self.unique is None:
            return None
        return boost(self.shared, self.unique, self.params)


def _ramplus_statistic(params: RamPlusParams):
    return ModelOverlap(params) if params.overlap_scope == "model" else NoStatistic()


register(
    Method(
        name="ram",
        elementwise=True,
        fn=ram,
        summary="RAM: entries one model changes take its task vector whole, entries several "
        "change take their mean.",
        reference="https://arxiv.org/abs/2601.13572",
        params=RamParams,
        model_params=NoParams,
    )
)
register(
    Method(
        name="ramplus_tl",
        fn=ramplus,
        summary="RAM+: RAM with each model's unique entries boosted by 1 + r·clamp(shared/unique, "
        "0, alpha), counted per tensor (mergekit) or over the model.",
        reference="https://arxiv.org/abs/2601.13572",
        params=RamPlusParams,
        model_params=NoParams,
        statistic=_ramplus_statistic,
    )
)
