"""Editing a model by merging (issue 17): forgetting by negation and domain specialisation.

What both recipes share whatever the domain: the merge configs (the engine does every merge:
no private merge code) and the rules that pick a setting on a *validation* split.

*Forgetting by negation.* A multi-task model θ_MT (itself a merge of experts on the base θ₀)
forgets task t when its task vector τ_t = θ_t − θ₀ is subtracted:

    θ(λ) = θ_MT − λ·τ_t = θ₀ + 1·(θ_MT − θ₀) − λ·(θ_t − θ₀)

which is one ``task_arithmetic`` merge on the base θ₀ of two models, the multi-task model with
weight 1 and the forgotten task's expert with weight −λ (:func:`negation_config`); λ = 0 is the
multi-task model itself. The rule that picks λ (:func:`select_forget_lambda`): among the swept
λ whose every *kept* task scores at least ``keep`` (95 %) of its accuracy before negation
(λ = 0, same split), the one that brings the forgotten task closest to chance (the smallest
|accuracy − chance|); ties go to the smaller λ. λ = 0 always qualifies, so a choice always
exists. Chance is :func:`chance_accuracy`: the share of the split's most frequent label (the
best a model that knows nothing of the task can do; 1/K on a balanced split).

*Domain specialisation.* A general model θ₀ and a domain expert θ_d (θ₀ fine-tuned on the
domain's texts) are merged (task arithmetic θ₀ + λ·τ_d, TIES, linear) and each merge is scored by
its language-model loss on held-out domain texts and on general texts. The fraction of the
domain improvement a merge keeps is (L_base − L_merge) / (L_base − L_expert)
(:func:`domain_fraction`); the rule (:func:`select_domain_merge`): among the merges whose general
loss is within ``tolerance`` (5 %) of the base's, the one with the largest kept fraction (ties:
the earlier in the sweep).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KEEP = 0.95
"""Forgetting: each kept task keeps at least this fraction of its accuracy before negation."""
FORGET_MARGIN = 0.05
"""Forgetting's target: the forgotten task within this many points (a fraction) of chance."""
GENERAL_TOLERANCE = 0.05
"""Domain: the merge's general loss at most this fraction above the base's."""
DOMAIN_TARGET = 0.90
"""Domain's target: the merge keeps at least this fraction of the expert's domain improvement."""


def chance_accuracy(labels: Sequence[Hashable]) -> float:
    """Accuracy of always answering the most frequent label of ``labels`` (1/K when balanced)."""
    if not labels:
        raise ValueError("chance of an empty split")
    return max(Counter(labels).values()) / len(labels)


def negation_config(
    base: str, multitask: str, forget: str, lam: float, *, dtype: str = "float32"
) -> dict[str, Any]:
    """The merge config of θ_MT − λ·τ_t (module docstring): ``task_arithmetic`` on ``base`` of
    ``multitask`` (weight 1) and ``forget`` (weight −``lam``), λ (the method's) 1, no
    normalization. The names are model names for :func:`mergeforge.merge_state_dicts` (or
    paths for ``mergeforge merge``)."""
    if not math.isfinite(lam):
        raise ValueError(f"negation lambda must be finite, got {lam}")
    return {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [
            {"model": multitask, "parameters": {"weight": 1.0}},
            {"model": forget, "parameters": {"weight": -float(lam)}},
        ],
        "parameters": {"lambda": 1.0, "normalize": False},
        "dtype": dtype,
    }


@dataclass(frozen=True)
class ForgetChoice:
    """What :func:`select_forget_lambda` picked, and why."""

    lam: float
    index: int
    """Position of the chosen λ in the curve."""
    feasible: tuple[bool, ...]
    """Per curve point: every kept task keeps ``keep`` of its accuracy before negation."""
    distance: float
    """|forgotten task's accuracy − chance| at the chosen λ."""

    def to_dict(self) -> dict:
        return {"lambda": self.lam, "index": self.index, "feasible": list(self.feasible),
                "distance_to_chance": self.distance}  # fmt: skip


def kept_ratios(
    accuracy: Mapping[str, float], before: Mapping[str, float], forget: str
) -> dict[str, float]:
    """Per kept task (every task but ``forget``): accuracy ÷ its accuracy before negation."""
    return {t: (accuracy[t] / before[t] if before[t] > 0 else math.inf)
            for t in before if t != forget}  # fmt: skip


def select_forget_lambda(
    curve: Sequence[tuple[float, Mapping[str, float]]],
    forget: str,
    chance: float,
    *,
    before: Mapping[str, float] | None = None,
    keep: float = KEEP,
) -> ForgetChoice:
    """The λ of ``curve`` (``(λ, {task: accuracy})`` points, one split) the rule picks (module
    docstring). ``before``: every task's accuracy before negation; default the curve's λ = 0
    point (which must then be there)."""
    if not curve:
        raise ValueError("empty lambda curve")
    if before is None:
        zero = [acc for lam, acc in curve if lam == 0]
        if not zero:
            raise ValueError("the curve has no lambda = 0 point; pass before=")
        before = zero[0]
    feasible = tuple(
        all(r >= keep - 1e-12 for r in kept_ratios(acc, before, forget).values())
        for _, acc in curve
    )
    best: tuple[float, float, int] | None = None  # (distance, lambda, index)
    for i, ((lam, acc), ok) in enumerate(zip(curve, feasible, strict=True)):
        if not ok:
            continue
        key = (abs(acc[forget] - chance), lam, i)
        if best is None or key[:2] < best[:2]:
            best = key
    if best is None:
        raise ValueError(
            "no lambda keeps every other task at "
            f"{keep:.0%} of its accuracy before negation; include lambda = 0 in the sweep"
        )
    distance, lam, index = best
    return ForgetChoice(lam=lam, index=index, feasible=feasible, distance=distance)


def domain_fraction(base_loss: float, expert_loss: float, merged_loss: float) -> float:
    """Share of the expert's domain-loss improvement a merge keeps: (L₀ − L) / (L₀ − L_expert)
    (1 = as good as the expert, 0 = no better than the base; NaN when the expert did not
    improve on the base)."""
    gain = base_loss - expert_loss
    return (base_loss - merged_loss) / gain if gain > 0 else math.nan


@dataclass(frozen=True)
class DomainChoice:
    index: int
    name: str
    fraction: float
    general_change: float
    """General loss of the merge ÷ the base's, minus 1 (+0.03 = 3 % worse)."""
    feasible: tuple[bool, ...]

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "fraction": self.fraction,
                "general_change": self.general_change, "feasible": list(self.feasible)}  # fmt: skip


def select_domain_merge(
    merges: Sequence[tuple[str, float, float]],
    *,
    base: tuple[float, float],
    expert_domain: float,
    tolerance: float = GENERAL_TOLERANCE,
) -> DomainChoice | None:
    """The merge the domain rule picks (module docstring) from ``merges``: ``(name, domain
    loss, general loss)`` on one split; ``base``: the base's ``(domain, general)`` loss there;
    ``expert_domain``: the expert's domain loss. None when no merge keeps the general loss within
    ``tolerance``."""
    base_domain, base_general = base
    feasible = tuple(g <= (1 + tolerance) * base_general for _, _, g in merges)
    best: tuple[float, int] | None = None
    for i, ((_, d, _), ok) in enumerate(zip(merges, feasible, strict=True)):
        if not ok:
            continue
        f = domain_fraction(base_domain, expert_domain, d)
        f = -math.inf if math.isnan(f) else f
        if best is None or f > best[0]:
            best = (f, i)
    if best is None:
        return None
    i = best[1]
    name, d, g = merges[i]
    return DomainChoice(index=i, name=name, fraction=domain_fraction(base_domain, expert_domain, d),
                        general_change=g / base_general - 1, feasible=feasible)  # fmt: skip
