"""Last-layer knowledge distillation: the baseline 2507.00037 compares neuron fusion against.

Parent 0's body (every level but the head) is kept; the head is re-trained so its logits match
the parents' ensemble, p(c | x) = Σ_k w_kc softmax_k(x)_c renormalised over c (w_kc = parent
k's share of class c from ``class_fractions``, else 1/K), by KL with fit.py's gradient fitter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from mergeforge.fusion.base import FusionData, FusionMethod, register
from mergeforge.fusion.cluster import head_targets
from mergeforge.fusion.fit import fit_gradient
from mergeforge.fusion.levels import eval_mode, levels_of, run_prefix


@dataclass(frozen=True, kw_only=True)
class KDParams:
    """Gradient fitting of the head (v1 code's defaults), rows per forward pass, and the
    ordered level names (default: the model's ``levels``; the last one is the head)."""

    epochs: int = 50
    patience: int = 15
    lr: float = 1e-3
    batch_size: int = 32
    eval_batch_size: int = 256
    seed: int = 0
    levels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 0 or min(self.patience, self.batch_size) < 1:
            raise ValueError("lr must be > 0, epochs ≥ 0, patience and batch_size ≥ 1")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be ≥ 1, got {self.eval_batch_size}")


def ensemble_log_probs(logits: list[torch.Tensor], fractions: torch.Tensor | None) -> torch.Tensor:
    """log of the (class-fraction weighted) mean of the parents' softmax, renormalised."""
    probs = head_targets([z.softmax(-1) for z in logits], fractions)
    return (probs / probs.sum(-1, keepdim=True)).clamp_min(1e-30).log()


def last_layer_kd(parents, data: FusionData, params: KDParams) -> dict[str, torch.Tensor]:
    x = data.inputs.to(next(parents[0].parameters()).device)
    bs = params.eval_batch_size
    with eval_mode(parents):
        spec = levels_of(parents[0], params.levels, sample=x[:bs])
        last = len(spec) - 1
        logits = [run_prefix(m, spec, x, len(spec), batch_size=bs) for m in parents]
        target = ensemble_log_probs(logits, data.class_fractions).to(logits[0].dtype)
        fused = copy.deepcopy(parents[0]).eval()
        feats = run_prefix(fused, spec, x, last, batch_size=bs)
        head = spec.module(fused, last)
        head.load_state_dict(
            fit_gradient(
                head, feats, target, loss="kl", epochs=params.epochs, patience=params.patience,
                lr=params.lr, batch_size=params.batch_size, seed=params.seed,
            )
        )  # fmt: skip
    return {k: v.detach().clone() for k, v in fused.state_dict().items()}


register(
    FusionMethod(
        name="last_layer_kd", fn=last_layer_kd, params=KDParams, min_parents=1,
        uses_class_fractions=True,
        reference="last-layer knowledge distillation (2507.00037's baseline)",
        summary="parent 0's body with its head distilled (KL) to the parents' ensemble",
    )
)  # fmt: skip
