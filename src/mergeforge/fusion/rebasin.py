"""Git Re-Basin (Ainsworth, Hayase & Srinivasa, 2209.04836): permute every parent's neurons onto
parent 0's, then average the aligned parents.

- *Weight matching* (§3.2, Algorithm 1): coordinate descent over the spec's groups in a seeded
  random order; each step solves a maximising LAP on Σ_params W_A · W̃_Bᵀ (W̃_B = parent B with
  every other group's current permutation applied), and the loop stops after a sweep in which no
  group improved (or after ``max_iter`` sweeps).
- *Activation matching* (§3.1): one LAP per group on the cross-correlation of the parents'
  features on the fusion set.

With K > 2 parents each parent is aligned to parent 0 independently (the paper's merge is for
two; its §5 "merge many" variant iterates, which we do not). Merge = mean of the aligned parents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergeforge.errors import ValidationError
from mergeforge.fusion.base import FusionData, FusionMethod, register
from mergeforge.fusion.match import cross_correlation, hungarian
from mergeforge.fusion.permspec import (
    PermutationSpec,
    aligned_mean_transforms,
    apply_transforms,
    entry_group,
    features,
    flat_rows,
    perm_matrix,
    permute_tensor,
    spec_for,
)


@dataclass(frozen=True, kw_only=True)
class WeightMatchingParams:
    """``max_iter``: sweeps over all groups at most (paper: 100); ``seed``: the group order."""

    max_iter: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be ≥ 1, got {self.max_iter}")


@dataclass(frozen=True, kw_only=True)
class ActivationMatchingParams:
    """``batch_size``: fusion-set inputs per forward pass when reading features."""

    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")


def _similarity(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    group: str,
    perms: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """Σ over every (parameter, axis) of ``group``: A's channels · B's channels, w × w, with B's
    other axes permuted by the current ``perms`` (the group itself is left out on that axis)."""
    sim = None
    for key, entries in spec.axes.items():
        for axis, e in enumerate(entries):
            if (g := entry_group(e)) is None or g[0] != group:
                continue
            wb = permute_tensor(b[key], entries, perms, skip=axis)
            term = flat_rows(a[key], axis, e) @ flat_rows(wb, axis, e).T
            sim = term if sim is None else sim + term
    return sim


def weight_matching(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    *,
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Permutations ``perms`` (group → int64 indices) such that ``permute(state_b, spec, perms)``
    is close to ``state_a`` in the weights' inner product (Algorithm 1 of 2209.04836)."""
    widths = spec.widths(state_a)
    if (other := spec.widths(state_b)) != widths:
        raise ValidationError(f"weight_matching: group widths differ: {widths} vs {other}")
    a = {k: state_a[k].detach().to("cpu", torch.float64) for k in spec.axes}
    b = {k: state_b[k].detach().to("cpu", torch.float64) for k in spec.axes}
    perms = {g: torch.arange(w) for g, w in widths.items()}
    groups = list(widths)
    rng = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        improved = False
        for i in torch.randperm(len(groups), generator=rng).tolist():
            g = groups[i]
            sim = _similarity(a, b, spec, g, perms)
            _, cols = hungarian(sim, maximize=True)
            rows = torch.arange(widths[g])
            old, new = float(sim[rows, perms[g]].sum()), float(sim[rows, cols].sum())
            if new > old + 1e-12 * max(1.0, abs(old)):  # relative: weights' scale varies
                perms[g], improved = cols, True
        if not improved:
            break
    return perms


def activation_matching(
    feats_a: Mapping[str, torch.Tensor], feats_b: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per group, the permutation of B's features maximising Σ_i corr(A_i, B_perm[i])."""
    return {
        g: hungarian(cross_correlation(fa, feats_b[g]), maximize=True)[1]
        for g, fa in feats_a.items()
    }


def _merge_permuted(
    states: Sequence[Mapping[str, torch.Tensor]],
    spec: PermutationSpec,
    perms: Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Mean of the parents, parent k ≥ 1 permuted by ``perms[k - 1]``."""
    maps = [{}] + [{g: perm_matrix(p) for g, p in pk.items()} for pk in perms]
    merge, unmerge = aligned_mean_transforms(maps)
    return apply_transforms(states, spec, merge, unmerge)


def rebasin_weight(
    parents: Sequence[nn.Module], data: FusionData, params: WeightMatchingParams
) -> dict[str, torch.Tensor]:
    spec = spec_for(parents[0])
    states = [p.state_dict() for p in parents]
    perms = [
        weight_matching(states[0], sd, spec, max_iter=params.max_iter, seed=params.seed)
        for sd in states[1:]
    ]
    return _merge_permuted(states, spec, perms)


def rebasin_activation(
    parents: Sequence[nn.Module], data: FusionData, params: ActivationMatchingParams
) -> dict[str, torch.Tensor]:
    spec = spec_for(parents[0])
    feats = [features(p, spec, data.inputs, batch_size=params.batch_size) for p in parents]
    perms = [activation_matching(feats[0], f) for f in feats[1:]]
    return _merge_permuted([p.state_dict() for p in parents], spec, perms)


register(
    FusionMethod(
        name="rebasin_weight",
        fn=rebasin_weight,
        params=WeightMatchingParams,
        reference="Git Re-Basin weight matching (Ainsworth et al., 2209.04836, Algorithm 1)",
        summary="permute each parent onto parent 0 by iterated LAPs on weight products, average",
    )
)
register(
    FusionMethod(
        name="rebasin_activation",
        fn=rebasin_activation,
        params=ActivationMatchingParams,
        reference="Git Re-Basin activation matching (Ainsworth et al., 2209.04836, §3.1)",
        summary="permute each parent onto parent 0 by one LAP per group on feature "
        "correlations, average",
    )
)
