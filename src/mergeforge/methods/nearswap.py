"""NearSwap: take the other model's value where it is close to the base's, keep the base's
elsewhere (alchemonaut, QuartetAnemoi-70B-t0.0001 model card, 2024).

Entry by entry, with a = θ₀ (the base) and b = θ₁: w = clamp(t / max(|a − b|, 10⁻⁶), 0, 1) and
θ = w·b + (1 − w)·a. Entries that differ by at most t are swapped for b's (w = 1); farther
ones move the fraction t/|a − b| of the way, i.e. by exactly t: where |a − b| ≥ 10⁻⁶ this is
θ = a + clamp(b − a, −t, t), every entry's change capped at t. t ≤ 0 returns the base.
Numerics as mergekit's ``nearswap``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergeforge.methods.base import Method, NoParams, register
from mergeforge.methods.checks import check_real


@dataclass(frozen=True)
class NearSwapParams:
    t: float
    """Distance under which an entry takes the other model's value; farther entries move
    t/|θ₀ − θ₁| of the way (≤ 0: the base)."""

    def __post_init__(self) -> None:
        check_real("t", self.t)


def nearswap(base, tensors, params, model_params, ctx):
    other = tensors[0]
    weight = (params.t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


register(
    Method(
        name="nearswap",
        elementwise=True,
        fn=nearswap,
        summary="NearSwap: entries within t of the base take the other model's value, farther "
        "ones move towards it by t/|θ₀ − θ₁|.",
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        params=NearSwapParams,
        model_params=NoParams,
        min_models=1,
        max_models=1,
    )
)
