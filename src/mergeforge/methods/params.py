"""Parameter records of the task-vector family (checks in :mod:`.checks`).

Field names are YAML keys (``lambda`` -> ``lambda_``); names and defaults are mergekit's, so a
mergekit YAML means the same here. ``__post_init__`` checks values while the plan is built,
before any tensor is read, naming the parameter and the valid range.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergeforge.methods.checks import check_bool, check_choice, check_real, fail

RESCALE_NORMS = ("l1", "l2", "linf", "inverse_prob")
CONSENSUS_METHODS = ("sum", "count")


# shared parameters (one value for all models)
@dataclass(frozen=True)
class TaskArithmeticParams:
    lambda_: float = 1.0
    """Scale of the merged task vector: θ = θ₀ + λ·τ_m."""
    normalize: bool = False
    """Divide the (sign-agreeing) weighted sum of task vectors by the sum of their weights."""
    int8_mask: bool = False
    """Accepted for mergekit YAMLs; it only saves memory there, the result is the same."""

    def __post_init__(self) -> None:
        check_real("lambda", self.lambda_)
        check_bool("normalize", self.normalize)
        check_bool("int8_mask", self.int8_mask)


@dataclass(frozen=True)
class SparseParams(TaskArithmeticParams):
    rescale: bool = False
    """Rescale each sparsified task vector (mergekit: to its original L1 norm)."""
    rescale_norm: str = "l1"
    """How to rescale: ``l1``/``l2``/``linf`` match that norm of the dense task vector
    (mergekit uses ``l1``); ``inverse_prob`` divides survivors by their keep probability,
    the papers' 1/density (DARE) and 1/p_i (DELLA). Ours; not in mergekit."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("rescale", self.rescale)
        check_choice("rescale_norm", self.rescale_norm, RESCALE_NORMS)


@dataclass(frozen=True)
class DareLinearParams(SparseParams):
    rescale: bool = True


@dataclass(frozen=True)
class SparseTiesParams(SparseParams):
    consensus_method: str = "sum"
    """Sign election: ``sum`` of the weighted deltas (TIES paper, PEFT "total") or ``count``
    of their signs (PEFT "frequency"). Ours; mergekit fixes ``sum``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("consensus_method", self.consensus_method, CONSENSUS_METHODS)


@dataclass(frozen=True)
class DareTiesParams(SparseTiesParams):
    rescale: bool = True


@dataclass(frozen=True)
class DellaParams(SparseTiesParams):
    normalize: bool = True
    rescale: bool = True


@dataclass(frozen=True)
class TiesParams(SparseTiesParams):
    normalize: bool = True
    topk_scope: str = "tensor"
    """``tensor``: keep the top ``density`` of each tensor (mergekit). ``model``: of each whole
    task vector, as in the TIES paper and FusionBench (needs a statistics pass)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("topk_scope", self.topk_scope, ("tensor", "model"))


# per-model parameters
@dataclass(frozen=True)
class WeightParams:
    weight: float = 1.0
    """Weight of this model's task vector; negative subtracts it (forgetting). mergekit
    requires it; we default to 1.0."""

    def __post_init__(self) -> None:
        check_real("weight", self.weight)


@dataclass(frozen=True)
class SparseModelParams(WeightParams):
    density: float = 1.0
    """Fraction of this task vector's entries kept (1 - drop rate)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("density", self.density, 0.0, 1.0)


@dataclass(frozen=True)
class BreadcrumbsModelParams(SparseModelParams):
    gamma: float = 0.01
    """Fraction of the largest-magnitude entries removed as outliers."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("gamma", self.gamma, 0.0, 1.0)


@dataclass(frozen=True)
class RankedModelParams(SparseModelParams):
    density_aware: bool = False
    """``ranked_ties``' keep probability. False (mergekit's definition): it falls linearly with
    the |τ| rank, from 1 for the largest entry to 0 for the smallest, whatever ``density`` below
    1 says (on average half the entries are kept). True: p = r^(1/density − 1) for the same
    linear rank r, so the mean keep probability is ``density`` (at density 0.5 both agree).
    Ours; not in mergekit."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("density_aware", self.density_aware)


@dataclass(frozen=True)
class DellaModelParams(SparseModelParams):
    epsilon: float = 0.15
    """Half-width of the keep-probability window: p ∈ [density − ε, density + ε]."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("epsilon", self.epsilon, 0.0, 1.0)
        d, e = self.density, self.epsilon
        if 0 < d < 1 and not (d - e > 0 and d + e < 1):
            fail("epsilon", e, f"density ± epsilon inside (0, 1); density is {d}")
