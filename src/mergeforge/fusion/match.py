"""Matchers: the assignment, transport and greedy-zip solvers the alignment baselines share.

- :func:`hungarian`: a linear assignment (``scipy.optimize.linear_sum_assignment``), the matcher
  of Git Re-Basin (2209.04836) and of two-parent Hungarian fusion (2507.00037).
- :func:`ot_plan`: an exact optimal-transport plan (``ot.emd``), the matcher of OT-Fusion
  (1910.05653).
- :func:`zip_greedy`: ZipIt!'s greedy feature merging (2305.03053 §4), which may also merge two
  features of one model.

All solve in float64 on a CPU copy (the solvers are numpy; fp32 ties make LAP results flaky) and
never modify their arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

from mergeforge.errors import ValidationError


def _matrix(cost: torch.Tensor, what: str) -> np.ndarray:
    if not isinstance(cost, torch.Tensor) or cost.ndim != 2:
        shape = tuple(cost.shape) if isinstance(cost, torch.Tensor) else type(cost).__name__
        raise ValidationError(f"{what}: the cost must be a 2-D tensor, got {shape}")
    if cost.numel() == 0:
        raise ValidationError(f"{what}: the cost matrix {tuple(cost.shape)} is empty")
    if not bool(torch.isfinite(cost).all()):
        raise ValidationError(
            f"{what}: the {tuple(cost.shape)} cost matrix contains NaN or Inf (constant features "
            "give NaN correlations; add an epsilon or drop them)"
        )
    return cost.detach().to("cpu", torch.float64).numpy().copy()


def hungarian(cost: torch.Tensor, *, maximize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The optimal assignment of rows to columns of an n×m ``cost`` (rectangular allowed: the
    min(n, m) rows/columns matched). Returns ``(rows, cols)`` int64 tensors with ``rows`` sorted:
    row ``rows[i]`` goes to column ``cols[i]``; the total ``cost[rows, cols].sum()`` is minimal
    (maximal with ``maximize=True``)."""
    c = _matrix(cost, "hungarian")
    rows, cols = linear_sum_assignment(c, maximize=maximize)
    # CPU tensors whatever torch's default device (callers move them to their own)
    as_index = dict(dtype=torch.int64, device="cpu")
    return torch.as_tensor(rows, **as_index), torch.as_tensor(cols, **as_index)


def _marginal(w: torch.Tensor | None, n: int, name: str) -> np.ndarray:
    if w is None:
        return np.full(n, 1.0 / n)
    v = torch.as_tensor(w).detach().to("cpu", torch.float64).reshape(-1)
    if len(v) != n:
        raise ValidationError(f"ot_plan: marginal {name} has {len(v)} entries for {n} points")
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()) or float(v.sum()) <= 0:
        raise ValidationError(
            f"ot_plan: marginal {name} must be finite and non-negative with a positive sum"
        )
    return (v / v.sum()).numpy()


def ot_plan(
    cost: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None
) -> torch.Tensor:
    """The exact optimal transport plan T (n×m, float64) between histograms ``a`` (n) and ``b``
    (m) for ``cost`` (n×m, non-negative): T ≥ 0, T·1 = a, Tᵀ·1 = b, ⟨T, cost⟩ minimal. ``a`` and
    ``b`` default to uniform and are normalised to sum 1 (so only their proportions matter)."""
    c = _matrix(cost, "ot_plan")
    if (c < 0).any():
        raise ValidationError(
            f"ot_plan: the {c.shape} cost has negative entries (min {c.min():.3g}); use distances"
        )
    n, m = c.shape
    pa, pb = _marginal(a, n, "a"), _marginal(b, m, "b")
    # ot.emd wants equal masses to machine precision; renormalise b to a's float sum.
    pb = pb * (pa.sum() / pb.sum())
    plan = ot.emd(pa, pb, c)
    return torch.as_tensor(plan, dtype=torch.float64)


def cross_correlation(x: torch.Tensor, y: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation between the columns of ``x`` (n×a) and ``y`` (n×b): a×b, float64.
    Constant columns (dead units) are indistinguishable on the data: two of them correlate 1,
    a constant and a varying column 0 (instead of NaN), so matchers pair dead units together
    rather than with live ones."""
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise ValidationError(
            f"cross_correlation: needs n×a and n×b features with n ≥ 2, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )

    def standardise(f: torch.Tensor) -> torch.Tensor:
        f = f.detach().to("cpu", torch.float64)
        f = f - f.mean(0)
        return f / (f.pow(2).mean(0).sqrt() + eps)

    corr = standardise(x).T @ standardise(y) / len(x)
    flat_x, flat_y = x.amax(0) == x.amin(0), y.amax(0) == y.amin(0)
    return corr + (flat_x[:, None] & flat_y[None, :]).to(corr.dtype)


def zip_greedy(
    corr: torch.Tensor,
    sizes: Sequence[int],
    *,
    alpha: float = 0.3,
    beta: float = 0.125,
    target: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ZipIt!'s greedy matching (2305.03053 §4.1) over the concatenated features of N models.

    ``corr``: S×S feature correlation, S = Σ ``sizes`` (model k's features are the k-th block;
    the diagonal is ignored). Repeatedly the most similar pair of clusters (within a model or
    across models) is merged until ``target`` (default ``sizes[0]``) clusters are left. A merged
    cluster's similarity to any other is ``alpha`` × the smaller of its two parts' (so a cluster
    is rarely merged twice). A merge of two clusters that both hold features of model m is a
    within-model merge for m; each model allows ``int(beta · ((S − target) // N))`` of them
    (beta = 0: none). Should every remaining pair be over budget (possible with N ≥ 3), the most
    similar one is merged anyway. (The authors' code charges the model of the pair's lower
    index and bars pairs by propagating −∞ through the min, which can strand the loop; counting
    shared models is the same for single features and never strands two equal-width models.)
    Returns ``M`` (target × S; row c averages the features of cluster c, so each row sums to 1)
    and ``U`` (S × target, 0/1: feature i is restored as a copy of its cluster). Clusters are
    ordered by their lowest feature index, so with N = 2 and no within-model merges cluster c
    holds model 0's feature c.
    """
    sizes = [int(s) for s in sizes]
    total = sum(sizes)
    if not sizes or min(sizes) <= 0:
        raise ValidationError(f"zip_greedy: sizes must be positive widths, got {sizes}")
    if not isinstance(corr, torch.Tensor) or tuple(corr.shape) != (total, total):
        shape = tuple(corr.shape) if isinstance(corr, torch.Tensor) else type(corr).__name__
        raise ValidationError(
            f"zip_greedy: corr must be {total}×{total} (Σ sizes {sizes}), got {shape}"
        )
    target = sizes[0] if target is None else int(target)
    if not 1 <= target <= total:
        raise ValidationError(f"zip_greedy: target {target} must be in [1, {total}]")
    if alpha < 0 or beta < 0:
        raise ValidationError(f"zip_greedy: alpha ({alpha}) and beta ({beta}) must be ≥ 0")
    sim = corr.detach().to("cpu", torch.float64).clone()
    sim.fill_diagonal_(0.0)  # ignored (masked below); keeps the arithmetic finite
    if not bool(torch.isfinite(sim).all()):
        raise ValidationError("zip_greedy: corr contains NaN or Inf (constant features?)")
    n = len(sizes)
    budget = torch.full((n,), int(beta * ((total - target) // n) + 1e-9))
    owner = torch.repeat_interleave(torch.arange(n), torch.tensor(sizes))
    holds = torch.nn.functional.one_hot(owner, n).to(torch.float64)  # clusters × N
    members = torch.eye(total, dtype=torch.float64)  # S × clusters, columns shrink as we merge
    while members.shape[1] > target:
        spent = (budget <= 0).to(torch.float64)
        # barred: the diagonal, and pairs sharing a model whose within-model budget is spent
        barred = (holds * spent) @ holds.T > 0
        barred.fill_diagonal_(True)
        if bool(barred.all()):  # every pair over budget: relax rather than fail
            barred = torch.eye(len(sim), dtype=torch.bool)
        flat = int(torch.argmax(sim.masked_fill(barred, -torch.inf)))
        i, j = divmod(flat, sim.shape[1])
        i, j = min(i, j), max(i, j)  # the lower index survives: keeps model 0's order
        budget -= ((holds[i] > 0) & (holds[j] > 0)).long()
        members[:, i] += members[:, j]
        holds[i] += holds[j]
        merged = alpha * torch.minimum(sim[i], sim[j])
        sim[i], sim[:, i] = merged, merged
        keep = torch.arange(len(sim)) != j
        sim, members, holds = sim[keep][:, keep], members[:, keep], holds[keep]
    unmerge = members  # S × target
    merge = (members / members.sum(0, keepdim=True)).T  # target × S, rows average
    return merge.float(), unmerge.float()
