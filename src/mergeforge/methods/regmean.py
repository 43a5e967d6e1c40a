"""RegMean (Jin et al., 2212.09849): per linear layer, the weights that best reproduce every
expert's outputs on its own inputs, min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², in closed form

    W* = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹,   G̃_i = α G_i + (1 − α) diag(G_i),   G_i = X_iᵀX_i / n_i

with W (out, in) and G (in, in) from ``mergeforge stats regmean`` (see :mod:`mergeforge.stats`).
α < 1 shrinks the off-diagonal of each Gram towards its diagonal (α = 0: a per-input-feature
weighted mean; α = 1: the plain least-squares solution).

RegMean merges weights, not task vectors. With a base θ₀ we solve for the task vector instead,
τ* = (Σ τ_i G̃_i)(Σ G̃_i)⁻¹ (:func:`~mergeforge.methods.covariance.exact_solve`), and return
θ₀ + scaling·τ*: since Σ θ₀ G̃_i (Σ G̃_i)⁻¹ = θ₀, at ``scaling: 1`` this *is* W* (FusionBench's
result, up to rounding) whenever Σ G̃_i is invertible; the base only makes ``scaling`` mean
something. Without a base the weights themselves are merged (``scaling`` must stay 1).

Tensors without a Gram in the statistics (biases, norms, embeddings, anything not the weight of
an ``nn.Linear``/``Conv1D``) get the simple average, as in FusionBench (``non_matrix: base``
keeps them at θ₀ instead). GPT-2 ``Conv1D`` weights are (in, out): transposed for the solve
(``orientation``). Defaults: α = 0.1 (FusionBench's generic ``regmean.yaml``; its GPT-2 config
uses 0.6, CLIP 0.95), ``skip: ''`` (every 2-D tensor with a Gram is solved, as FusionBench).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mergeforge.errors import ConfigError
from mergeforge.methods.base import Method, SidecarInputs, register
from mergeforge.methods.checks import check_real, fail
from mergeforge.methods.covariance import exact_solve
from mergeforge.methods.matrix import MatrixParams, is_matrix, merge_matrices, stored_in_out


def check_num_examples(value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        fail("num_examples", value, "a positive integer (or null: whatever the statistics used)")


@dataclass(frozen=True)
class RegMeanParams(MatrixParams):
    skip: str = ""
    """Regex of 2-D tensors averaged even when they have a Gram (default: none)."""
    alpha: float = 0.1
    """Off-diagonal scale of each Gram, in [0, 1] (FusionBench's ``reduce_non_diagonal_ratio``)."""
    num_examples: int | None = None
    """Examples the Grams must have been computed on (``mergeforge stats --num-examples``);
    ``None`` accepts the stored statistics whatever their count."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("alpha", self.alpha, 0.0, 1.0)
        check_num_examples(self.num_examples)


def shrink(gram: Tensor, alpha: float) -> Tensor:
    """α G + (1 − α) diag(G): off-diagonal entries scaled by α, diagonal kept. (in, in)."""
    return gram * alpha + torch.diag(torch.diagonal(gram)) * (1.0 - alpha)


def no_base(base: Tensor | None, tensors, scaling: float, name: str) -> Tensor:
    """Without a base the weights are merged as they are: a zero "base", and scaling 1."""
    if base is not None:
        return base
    if scaling != 1.0:
        raise ConfigError(f"{name}: 'scaling' needs a base_model (it scales θ − θ₀); "
                          "set base_model or leave scaling at 1")  # fmt: skip
    return torch.zeros_like(tensors[0])


def regmean(base, tensors, params: RegMeanParams, model_params, ctx) -> Tensor:
    base = no_base(base, tensors, params.scaling, "regmean")
    grams = ctx.sidecars if ctx.sidecars and all(g is not None for g in ctx.sidecars) else None

    def solve(deltas: list[Tensor]) -> Tensor:
        if grams is None:  # no Gram for this tensor: FusionBench averages it
            stacked = torch.stack(deltas)
            return stacked.mean(0) if params.non_matrix == "mean" else torch.zeros_like(deltas[0])
        g = [shrink(x.to(deltas[0].dtype), params.alpha) for x in grams]
        return exact_solve(deltas, g)

    return merge_matrices(base, tensors, params, ctx, solve)


def regmean_sidecars(params: RegMeanParams) -> SidecarInputs:
    def shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        if not is_matrix(key, shape, params):
            return None
        n = shape[0] if stored_in_out(key, params) else shape[1]
        return (n, n)

    n = params.num_examples
    return SidecarInputs(
        kind="regmean", num_examples=n, shape=shape, required=False,
        command="mergeforge stats regmean {model} --texts TEXTS.jsonl"
        + (f" --num-examples {n}" if n else ""),
    )  # fmt: skip


register(
    Method(
        name="regmean",
        fn=regmean,
        summary="Per linear layer, the weights that best reproduce each expert on its own "
        "inputs: (Σ W_i G_i)(Σ G_i)⁻¹ with input Grams from `mergeforge stats regmean`.",
        reference="https://arxiv.org/abs/2212.09849",
        params=RegMeanParams,
        base="optional",
        sidecar_inputs=regmean_sidecars,
        notes="Needs statistics: `mergeforge stats regmean MODEL --texts FILE` per expert.",
    )
)
