"""Fitting a fused level to its targets (2507.00037 §3.2, step 5).

- :func:`affine_lstsq`: the closed form for a Linear/Conv2d with bias, W = argmin ‖[X, 1]W − T‖²
  (the paper's pinv solution; conv inputs unfolded with the conv's geometry, rows = sample ×
  position). ``ridge`` adds λ‖W‖² (the bias is not shrunk) with λ = ridge × the mean diagonal
  of XᵀX, solved by the float64 normal equations: the default 1e-10 only keeps them invertible
  when input features are dead or collinear (ReLU zeros, fusion sets smaller than the fan-in)
  and then picks the near-min-norm solution; 1e-8 already moves outputs by ~1e-5 on a random
  VGG. ``ridge=0`` solves by SVD (``gelsd``): exactly pinv([X, 1]) T.
- :func:`fit_gradient`: a copy of a level trained to its targets (v1 code: Adam 1e-3, batch 32,
  80/20 split, early stopping): importance-weighted MSE on the outputs, or KL to target logits at
  the head. The validation loss before training counts, and the best weights are restored, so
  the level never gets worse on held-out rows than it started.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mergeforge.errors import ValidationError
from mergeforge.fusion.levels import neuron_matrix

# An epoch improves only by more than float noise: a level at its target (loss ≈ 1e-12) must not
# drift, e.g. by Adam moving all logits of a head together (softmax cannot see that).
REL_GAIN, ABS_GAIN = 1e-4, 1e-9


def design_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the affine ``module`` sees: Linear → x as (rows × in); Conv2d → unfolded patches
    ((B·H'·W') × (C_in·kh·kw), column order of ``weight.reshape(out, -1)``)."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=module.padding,
            stride=module.stride,
        )  # fmt: skip
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def affine_lstsq(
    module: nn.Module, x: torch.Tensor, target: torch.Tensor, *, ridge: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New ``(weight, bias)`` (the module's shapes and dtype) so that ``module(x) ≈ target``;
    ``target`` has the shape of ``module(x)``. A module without bias is fitted without the
    ones column. Solved in float64."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise ValidationError(f"affine_lstsq fits a Linear or Conv2d, got {type(module).__name__}")
    if ridge < 0:
        raise ValidationError(f"affine_lstsq: ridge must be ≥ 0, got {ridge}")
    xm = design_matrix(module, x.detach()).double()
    t = neuron_matrix(target.detach()).double()
    if len(xm) != len(t):
        raise ValidationError(f"affine_lstsq: {len(xm)} input rows for {len(t)} target rows")
    has_bias = module.bias is not None
    if has_bias:
        xm = torch.cat([xm, torch.ones(len(xm), 1, dtype=xm.dtype, device=xm.device)], 1)
    if ridge == 0:
        sol = torch.linalg.lstsq(xm, t, driver="gelsd").solution
    else:
        gram = xm.T @ xm
        n_w = xm.shape[1] - has_bias  # the bias is not shrunk
        lam = ridge * float(gram.diagonal()[:n_w].mean().clamp_min(1e-300))
        gram.diagonal()[:n_w] += lam
        sol = torch.linalg.solve(gram, xm.T @ t)
    w = module.weight
    weight = sol[: xm.shape[1] - has_bias].T.reshape(w.shape).to(w.dtype)
    bias = sol[-1].to(module.bias.dtype) if has_bias else None
    return weight, bias


def fit_gradient(
    module: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    loss: str = "mse",
    epochs: int = 50,
    patience: int = 15,
    lr: float = 1e-3,
    batch_size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Train a copy of ``module`` so ``module(x) ≈ target``; returns its fitted state dict
    (``module`` is not touched). ``loss``: ``"mse"`` = Σ_j w_j · mean over rows (out_j − t_j)²
    over the neurons j (``weights`` sum to 1; None = uniform), or ``"kl"`` = KL(softmax(target)
    ‖ softmax(out)) for logits. Adam, seeded shuffles; rows split ``val_fraction`` for early
    stopping (all rows serve both when fewer than 5). Trained in eval mode: dropout off and norm
    statistics frozen, so the level is fitted as the deterministic function fusion composes."""
    if loss not in ("mse", "kl"):
        raise ValidationError(f"fit_gradient: loss must be 'mse' or 'kl', got {loss!r}")
    if len(x) != len(target):
        raise ValidationError(f"fit_gradient: {len(x)} inputs for {len(target)} targets")
    net = copy.deepcopy(module).eval()
    params = [p for p in net.parameters() if p.is_floating_point()]
    if not params:
        return {k: v.clone() for k, v in net.state_dict().items()}
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    # row orders on the CPU generator's device (indexing x on any device), never torch's
    # default device
    order = torch.randperm(len(x), generator=g, device="cpu")
    n_val = int(round(val_fraction * len(x))) if len(x) >= 5 else 0
    val, train = (order[:n_val], order[n_val:]) if n_val else (order, order)
    w = None if weights is None else weights.to(x.device, torch.float64)

    def objective(xb, tb):
        # float64 loss: fp32 KL of two equal softmaxes is noise of either sign, which early
        # stopping would take for progress
        out, tb = net(xb).double(), tb.double()
        if loss == "kl":
            return F.kl_div(out.log_softmax(-1), tb.log_softmax(-1), log_target=True,
                            reduction="batchmean")  # fmt: skip
        d = neuron_matrix((out - tb).pow(2))
        per = d.mean(0)
        return per.mean() if w is None else (per * w).sum()

    @torch.no_grad()
    def evaluate():
        return sum(float(objective(x[i], target[i])) * len(i) for i in val.split(256)) / len(val)

    opt = torch.optim.Adam(params, lr=lr)
    best, best_state, stale = evaluate(), copy.deepcopy(net.state_dict()), 0
    for _ in range(epochs):
        shuffled = train[torch.randperm(len(train), generator=g, device="cpu")]
        for idx in shuffled.split(batch_size):
            opt.zero_grad(set_to_none=True)
            objective(x[idx], target[idx]).backward()
            opt.step()
        score = evaluate()
        if score < best * (1 - REL_GAIN) - ABS_GAIN:
            best, best_state, stale = score, copy.deepcopy(net.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best_state
