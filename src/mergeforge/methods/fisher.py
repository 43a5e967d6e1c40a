"""Fisher merging (Matena & Raffel, 2111.09832): per entry, the Fisher-weighted mean

    θ_j = Σ_i c_i F_ij θ_ij / Σ_i c_i F_ij

with F_i the diagonal Fisher of expert i from ``mergeforge stats fisher`` (see
:mod:`mergeforge.stats.fisher`) and c_i its ``weight``. FusionBench's safeguards, with its
defaults: ``min_fisher`` (1e-6) is added to every F_ij (entries no example moved would otherwise
give 0/0), and ``normalize`` multiplies c_i by (1/‖F_i‖)/Σ_k(1/‖F_k‖), ‖F_i‖ the L2 norm over the
whole model (recorded in the statistics file as ``fisher_norm``; FusionBench takes it over the
merged parameters: the same unless ``exclude:`` drops some), so one expert's larger overall
Fisher does not dominate. ``fisher: empirical|sampled`` picks the statistics file.

With a base θ₀ the result is θ₀ + scaling·(θ − θ₀) (``scaling: 1``: θ, FusionBench's result);
without one ``scaling`` must stay 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mergeforge.methods.base import Method, SidecarInputs, register
from mergeforge.methods.checks import check_bool, check_choice, check_real
from mergeforge.methods.params import WeightParams
from mergeforge.methods.regmean import check_num_examples, no_base


@dataclass(frozen=True)
class FisherParams:
    fisher: str = "sampled"
    """Which diagonal Fisher: ``sampled`` (labels drawn from the model) or ``empirical``."""
    num_examples: int | None = None
    """Examples the Fisher must have been computed on (``None``: whatever was used)."""
    normalize: bool = True
    """Scale each expert by the inverse of its whole-model Fisher norm (FusionBench default)."""
    min_fisher: float = 1e-6
    """Added to every Fisher entry (FusionBench's ``minimal_fisher_weight``)."""
    scaling: float = 1.0
    """θ₀ + scaling·(θ − θ₀) (needs a base unless 1)."""

    def __post_init__(self) -> None:
        check_choice("fisher", self.fisher, ("sampled", "empirical"))
        check_num_examples(self.num_examples)
        check_bool("normalize", self.normalize)
        check_real("min_fisher", self.min_fisher, 0.0)
        check_real("scaling", self.scaling)


def model_coefficients(params: FisherParams, model_params, ctx) -> list[float]:
    """c_i: the per-model weights, times FusionBench's inverse-norm shares if ``normalize``."""
    c = [float(mp.weight) for mp in model_params]
    if params.normalize and ctx.sidecar_meta:
        inv = [1.0 / (float(m["fisher_norm"]) + params.min_fisher) for m in ctx.sidecar_meta]
        c = [ci * v / sum(inv) for ci, v in zip(c, inv, strict=True)]
    return c


def fisher(base, tensors, params: FisherParams, model_params, ctx) -> Tensor:
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    coeff = model_coefficients(params, model_params, ctx)
    num = torch.zeros_like(tensors[0], dtype=dtype)
    den = torch.zeros_like(num)
    for i, (x, c) in enumerate(zip(tensors, coeff, strict=True)):
        f = ctx.sidecars[i] if ctx.sidecars else None
        f = torch.ones_like(num) if f is None else f
        w = (f.to(dtype) + params.min_fisher) * c
        num += w * x.to(dtype)
        den += w
    merged = num / den
    if base is None:
        no_base(base, tensors, params.scaling, "fisher")
        return merged.to(tensors[0].dtype)
    b = base.to(dtype)
    return (b + params.scaling * (merged - b)).to(base.dtype)


def fisher_sidecars(params: FisherParams) -> SidecarInputs:
    n = params.num_examples
    return SidecarInputs(
        kind=f"fisher-{params.fisher}", num_examples=n, shape=lambda key, shape: shape,
        required=True,
        command=f"mergeforge stats fisher {{model}} --texts TEXTS.jsonl --fisher {params.fisher}"
        + (f" --num-examples {n}" if n else ""),
    )  # fmt: skip


register(
    Method(
        name="fisher",
        fn=fisher,
        summary="Fisher-weighted average Σ c_i F_i θ_i / Σ c_i F_i with diagonal Fishers from "
        "`mergeforge stats fisher`.",
        reference="https://arxiv.org/abs/2111.09832",
        params=FisherParams,
        model_params=WeightParams,
        base="optional",
        sidecar_inputs=fisher_sidecars,
        aliases=("fisher_merging",),
        notes="Needs statistics: `mergeforge stats fisher MODEL --texts FILE` per expert.",
    )
)
