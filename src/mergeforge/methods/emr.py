"""EMR-Merging (2405.17461): Elect, Mask, Rescale.

For N task vectors τ_t = θ_t − θ₀ of one tensor (each of shape S, stacked (N, *S)):

* elect: σ = sign(Σ_t τ_t) (a tied vote elects −1, as the authors' code), ε = max_t |τ_t| over
  the τ_t whose sign is σ, unified vector τ_uni = σ·ε;
* mask:  M_t = 1{τ_t·τ_uni > 0}, a boolean per task;
* rescale: λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|, summed over the whole model (``scale_scope: model``,
  the paper's choice; a statistics pass) or over this tensor (``scale_scope: tensor``).

``task: null`` writes θ₀ + τ_uni, the shared model; ``task: t`` (0-based position among the
non-base models) writes task t's model θ₀ + λ_t·M_t ⊙ τ_uni. The authors' code sums per-tensor
*means* of |·| for λ_t; we follow the paper's sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mergeforge.errors import ConfigError
from mergeforge.methods.base import Method, NoParams, register
from mergeforge.methods.checks import check_choice, fail
from mergeforge.methods.consensus import agrees, elect_sign
from mergeforge.methods.stats import NoStatistic


@dataclass(frozen=True)
class EMRParams:
    task: int | None = None
    """None: the unified model θ₀ + τ_uni; t: task t's model (0-based, in config order)."""
    scale_scope: str = "model"
    """Where the rescaler λ_t sums: ``model`` (whole model, a statistics pass) or ``tensor``."""

    def __post_init__(self) -> None:
        task = self.task
        if task is not None and (isinstance(task, bool) or not isinstance(task, int) or task < 0):
            fail("task", task, "null or a model index 0, 1, … (position among the models)")
        check_choice("scale_scope", self.scale_scope, ("model", "tensor"))


def elect_mask(base: Tensor, tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Task vectors (N, *S), masks M (N, *S) boolean and the unified vector τ_uni (S)."""
    deltas = torch.stack([x - base for x in tensors])
    sign = elect_sign(deltas, "sum", zero_sign=-1)
    masks = agrees(deltas, sign)  # τ_t non-zero with sign σ  ⇔  τ_t·τ_uni > 0
    return deltas, masks, (deltas.abs() * masks).amax(dim=0) * sign


def rescaler(task_l1: float, masked_l1: float) -> float:
    # Σ|M_t ⊙ τ_uni| = 0 means task t's masked vector is 0 and any λ_t gives the same model
    return task_l1 / masked_l1 if masked_l1 > 0 else 1.0


def emr(base, tensors, params, model_params, ctx):
    deltas, masks, unified = elect_mask(base, tensors)
    task = params.task
    if task is None:
        return base + unified
    if task >= len(tensors):
        raise ConfigError(
            f"parameter 'task' = {task} is out of range: there are {len(tensors)} models "
            f"besides the base for {ctx.key!r} (valid: 0 … {len(tensors) - 1})"
        )
    masked = unified * masks[task]
    if params.scale_scope == "tensor":
        scale = rescaler(deltas[task].abs().sum().item(), masked.abs().sum().item())
    elif ctx.fitted is None:
        raise RuntimeError(
            f"emr with scale_scope: model needs its statistics pass (ctx.fitted) for {ctx.key!r}"
        )
    else:
        scale = ctx.fitted[task]
    return base + scale * masked


class EMRScales:
    """One pass accumulating Σ|τ_t| and Σ|M_t ⊙ τ_uni| per task (2N float64 numbers);
    ``result()`` is the tuple of λ_t."""

    passes = 1

    def __init__(self) -> None:
        self.task_l1: list[float] = []
        self.masked_l1: list[float] = []

    def observe(self, pass_index, key, base, tensors, params, model_params, sidecars=()):
        deltas, masks, unified = elect_mask(base, tensors)
        if not self.task_l1:
            self.task_l1, self.masked_l1 = [0.0] * len(tensors), [0.0] * len(tensors)
        for t in range(len(tensors)):
            self.task_l1[t] += deltas[t].abs().sum(dtype=torch.float64).item()
            self.masked_l1[t] += (unified * masks[t]).abs().sum(dtype=torch.float64).item()

    def end_pass(self, pass_index: int) -> None:
        pass

    def result(self) -> tuple[float, ...]:
        return tuple(rescaler(a, b) for a, b in zip(self.task_l1, self.masked_l1, strict=True))


def _emr_statistic(params: EMRParams):
    needed = params.task is not None and params.scale_scope == "model"
    return EMRScales() if needed else NoStatistic()


register(
    Method(
        name="emr",
        fn=emr,
        summary="EMR: unified task vector plus per-task masks and rescalers (elect, mask, "
        "rescale); 'task' picks the shared model or one task's model.",
        reference="https://arxiv.org/abs/2405.17461",
        params=EMRParams,
        model_params=NoParams,
        statistic=_emr_statistic,
        symmetric=False,
        notes="Symmetric with task: null; task: t names a model by its position.",
    )
)
