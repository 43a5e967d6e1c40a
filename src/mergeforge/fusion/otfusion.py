"""OT-Fusion (Singh & Jaggi, "Model Fusion via Optimal Transport", 1910.05653): soft-align every
parent's neurons onto a target parent (parent 0) by exact optimal transport, then average.

Per group, in the spec's (forward) order, for each parent k ≥ 1:
1. cost C_ij = ‖z_k,i − z_0,j‖ between parent k's neuron i and the target's neuron j: ``mode
   "activation"`` compares their features over the fusion set at the spec's observation points
   (each parent on its own forward pass; post-activation, see the deviation below); ``mode
   "weight"`` compares the weight rows producing them, after parent k's incoming axes were
   mapped by the transports already computed (§4, "aligning incoming edges").
2. T = ``ot.emd``(μ_k, ν, C) with marginals μ_k, ν uniform or the neurons' importances
   (``importance``: each parent's Conductance / DeepLIFT / ablation scores of the group's
   neurons, importance.py: the paper's non-uniform measure on neurons, so an important neuron
   claims more of the other model's mass instead of every neuron one equal share).
3. Q_k = diag(1/ν) Tᵀ (w × w_k), each target neuron's transported mass normalised to 1 (so a
   permutation stays a permutation): parent k's output axis is mapped by Q_k, its input axes by
   Q_kᵀ; the fused model is the mean of the target and the mapped parents.

Deviation (ALGORITHMS.md §5 says pre-activations): ``mode "activation"`` compares neurons at
the permutation spec's observation points (``points``), which are module *outputs*: after the
activation and, in a VGG block, after the max pool (a ResNet block's output after its skip
addition, a ViT block's residual stream). The points are kept because they are where the
spec's groups are observable: a residual stream is written by several blocks and has no single
pre-activation, and the same points serve rebasin_activation and zipit. The ops after the affine
map (ReLU, max pool) act on each channel alone, so a neuron keeps its identity there and an
exact permuted copy still costs 0 (the transport is unchanged); only the distances between
non-identical neurons are measured on clipped / pooled values instead of raw pre-activations.

Deviation: the paper averages the transport of a residual block's branch and shortcut; here a
residual stream is one group of the permutation spec, so its transport is computed once from all
its observation points (activations) or all the weights writing it (weights). In weight mode, a
weight whose input group comes later in the order (a residual stream written by a block's
second layer) does not enter that stream's cost. A target neuron with zero marginal receives
nothing from parent k (its fused value is its own / K). A group observed at several points (a
residual stream written by several blocks) gets the mean of its normalised importances there:
the paper scores a layer's neurons once, a shared stream has no single layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergeforge.errors import ValidationError
from mergeforge.fusion.base import FusionData, FusionMethod, check_parents, register
from mergeforge.fusion.importance import METHODS as IMPORTANCES
from mergeforge.fusion.importance import neuron_importance
from mergeforge.fusion.match import ot_plan
from mergeforge.fusion.permspec import (
    PermutationSpec,
    aligned_mean_transforms,
    apply_transforms,
    entry_group,
    features,
    flat_rows,
    spec_for,
    transform_axis,
)

MODES = ("activation", "weight")


@dataclass(frozen=True, kw_only=True)
class OTFusionParams:
    """``mode``: ``"activation"`` (costs from features on the fusion set, the paper's
    recommended variant) or ``"weight"`` (costs from weight rows; still reads the fusion set
    when ``importance`` is not uniform); ``batch_size``: inputs per forward pass when reading
    features; ``importance``: the transport marginals, uniform | conductance | deeplift |
    ablation (:func:`importance_marginals`); ``conductance_steps``: Conductance's
    integration steps."""

    mode: str = "activation"
    batch_size: int = 256
    importance: str = "uniform"
    conductance_steps: int = 20

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.importance not in IMPORTANCES:
            raise ValueError(
                f"importance must be one of {list(IMPORTANCES)}, got {self.importance!r}"
            )
        if self.batch_size < 1 or self.conductance_steps < 1:
            raise ValueError(
                f"batch_size and conductance_steps must be ≥ 1, got {self.batch_size}, "
                f"{self.conductance_steps}"
            )


def transport_map(
    cost: torch.Tensor, mu: torch.Tensor | None = None, nu: torch.Tensor | None = None
) -> torch.Tensor:
    """Q = diag(1/ν) Tᵀ (w × w_k, float64) for a cost w_k × w between parent k's neurons (rows)
    and the target's (columns); ν = T's column sums (the normalised target marginal)."""
    plan = ot_plan(cost, mu, nu)
    mass = plan.sum(0)
    return plan.T / torch.where(mass > 0, mass, 1.0)[:, None]


def _weight_rows(
    state: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    group: str,
    maps: Mapping[str, torch.Tensor],
) -> torch.Tensor | None:
    """The rows (w × features) of every parameter whose output-side axis is ``group`` and whose
    other permuted axes all have a transport in ``maps`` already, those axes mapped by it."""
    rows = []
    for key, entries in spec.axes.items():
        m = spec.m_axis(key)
        if m is None or entry_group(entries[m])[0] != group:
            continue
        others = [(a, e) for a, e in enumerate(entries) if a != m and e is not None]
        if any(entry_group(e)[0] not in maps for _, e in others):
            continue  # its input group is matched later: leave it out of this cost
        t = state[key].detach().to("cpu", torch.float64)
        for axis, e in others:
            t = transform_axis(t, axis, e, maps[entry_group(e)[0]])
        rows.append(flat_rows(t, m, entries[m]))
    return torch.cat(rows, 1) if rows else None


def _check_marginals(
    marginals: Mapping[str, Sequence[torch.Tensor]], widths: Mapping[str, int], n: int
) -> None:
    for g, per_parent in marginals.items():
        if g not in widths:
            raise ValidationError(
                f"ot_fusion: marginals name group {g!r}; the spec's groups are {list(widths)}"
            )
        if len(per_parent) != n:
            raise ValidationError(
                f"ot_fusion: group {g!r} has marginals for {len(per_parent)} parents, not {n}"
            )
        for k, w in enumerate(per_parent):
            w = torch.as_tensor(w)
            if w.shape != (widths[g],) or bool((w < 0).any()) or float(w.sum()) <= 0:
                raise ValidationError(
                    f"ot_fusion: parent {k}'s marginal for group {g!r} must be {widths[g]} "
                    f"non-negative weights with a positive sum, got shape {tuple(w.shape)}"
                )


def ot_fusion_state(
    parents: Sequence[nn.Module],
    data: FusionData,
    params: OTFusionParams,
    *,
    marginals: Mapping[str, Sequence[torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """The fused state dict (parent 0 = target). ``marginals``: optional group → one
    non-negative weight vector per parent (length = the group's width, e.g. neuron
    importances), normalised per parent; groups not given are uniform."""
    check_parents(parents)  # public entry point: the checks fuse() would do
    spec = spec_for(parents[0])
    states = [p.state_dict() for p in parents]
    widths = spec.widths(states[0])
    marginals = dict(marginals or {})
    _check_marginals(marginals, widths, len(parents))
    feats = None
    if params.mode == "activation":
        feats = [features(p, spec, data.inputs, batch_size=params.batch_size) for p in parents]
    # maps[k][g] = Q_k for the groups done so far; the target's are identities
    maps: list[dict[str, torch.Tensor]] = [{} for _ in parents]
    for g in spec.groups:
        nu = marginals[g][0] if g in marginals else None
        target = feats[0][g].T.double() if feats else _weight_rows(states[0], spec, g, maps[0])
        for k in range(1, len(parents)):
            if feats:
                mine = feats[k][g].T.double()
            else:
                mine = _weight_rows(states[k], spec, g, maps[k])
            if target is None or mine is None:
                raise ValidationError(
                    f"ot_fusion (weight mode): no weight writes group {g!r} with its inputs "
                    "already aligned; use mode 'activation' for this architecture"
                )
            mu = marginals[g][k] if g in marginals else None
            # exact pairwise distances: the matmul form leaves ~1e-7 noise on identical neurons
            cost = torch.cdist(mine, target, compute_mode="donot_use_mm_for_euclid_dist")
            maps[k][g] = transport_map(cost, mu, nu)
        maps[0][g] = torch.eye(widths[g], dtype=torch.float64)
    merge, unmerge = aligned_mean_transforms(maps)
    return apply_transforms(states, spec, merge, unmerge)


def importance_marginals(
    parents: Sequence[nn.Module], data: FusionData, params: OTFusionParams
) -> dict[str, list[torch.Tensor]]:
    """Group → one importance vector per parent (float64, sums to 1): the mean, over the
    group's observation points, of :func:`~mergeforge.fusion.importance.neuron_importance` of
    the point module's outputs along the point's feature dim; ``{}`` for uniform importance.
    Each parent is scored on its own forward pass, so the scores follow its neuron order (a
    permuted parent gets permuted scores, and OT still maps it back exactly)."""
    if params.importance == "uniform":
        return {}  # ot_plan's uniform default: bit-for-bit the unweighted transport
    spec = spec_for(parents[0])
    widths = spec.widths(parents[0])
    missing = [g for g in spec.groups if not spec.points.get(g)]
    if missing:
        raise ValidationError(
            f"ot_fusion: importance {params.importance!r} needs observation points for groups "
            f"{missing}; add them to the permutation spec's 'points'"
        )
    out: dict[str, list[torch.Tensor]] = {}
    for g in spec.groups:
        out[g] = []
        for k, model in enumerate(parents):
            dev = next(model.parameters()).device
            x = data.inputs.to(dev)
            y = None if data.labels is None else data.labels.to(dev)
            scores = []
            for name, dim in spec.points[g]:
                s = neuron_importance(
                    model, model.get_submodule(name), x, method=params.importance,
                    labels=y, batch_size=max(1, params.batch_size // 4),
                    n_steps=params.conductance_steps, dim=dim,
                )  # fmt: skip
                if len(s) != widths[g]:
                    raise ValidationError(
                        f"ot_fusion: parent {k}'s point {name!r} of group {g!r} has {len(s)} "
                        f"features on dim {dim}, the group {widths[g]}"
                    )
                scores.append(s)
            out[g].append(torch.stack(scores).mean(0).cpu())
    return out


def ot_fusion(
    parents: Sequence[nn.Module], data: FusionData, params: OTFusionParams
) -> dict[str, torch.Tensor]:
    marginals = importance_marginals(parents, data, params)
    return ot_fusion_state(parents, data, params, marginals=marginals)


register(
    FusionMethod(
        name="ot_fusion",
        fn=ot_fusion,
        params=OTFusionParams,
        reference="OT-Fusion (Singh & Jaggi, 1910.05653), exact OT with ot.emd",
        summary="align each parent's neurons to parent 0 by optimal transport (activations or "
        "weights; uniform or importance marginals), average",
    )
)
