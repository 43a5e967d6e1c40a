"""Targets for the fused neurons (2507.00037 §3.2, step 4): importance-weighted k-means (KF) or
Hungarian pairing of two parents (HF). A neuron is a point: its activations over the fusion
rows (sample × position), so points are n×R with one row per neuron.

HF cost. The paper writes s_i‖p − a_i‖ + s_j‖p − a_j‖ with p the importance-weighted mean. With
unsquared norms the minimiser over p is the heavier endpoint, so the two terms disagree; we use
the squared form, whose minimiser is exactly p = (s_i a_i + s_j a_j)/(s_i + s_j) and whose
minimum is s_i s_j/(s_i + s_j)·‖a_i − a_j‖² — the same objective k-means minimises.

Everything runs in float64 (fp32 distance ties make assignments flaky) and is deterministic for
a given ``seed``, on the device of the activations it is given: every tensor made here is made
there (index tensors from the CPU solvers are moved), so a fusion on a GPU never mixes devices;
k-means++'s draws are made on the CPU (its seeded generator), the same draws on every device.
"""

from __future__ import annotations

import torch

from mergeforge.errors import ValidationError
from mergeforge.fusion.match import hungarian


def _sq_dist(p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """n×k squared Euclidean distances (float64, clamped at 0 against cancellation)."""
    d = (p * p).sum(1, keepdim=True) - 2 * p @ c.T + (c * c).sum(1)
    return d.clamp_min_(0)


def _check(points: torch.Tensor, weights: torch.Tensor | None, k: int, what: str):
    if points.ndim != 2 or len(points) == 0:
        raise ValidationError(f"{what}: points must be a non-empty n×d matrix, got {points.shape}")
    n = len(points)
    if not 1 <= k <= n:
        raise ValidationError(f"{what}: k = {k} clusters for {n} points; need 1 ≤ k ≤ n")
    if weights is None:
        w = torch.ones(n, dtype=torch.float64, device=points.device)
    else:
        w = weights.to(points.device, torch.float64).reshape(-1)
    if len(w) != n or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValidationError(f"{what}: weights must be {n} non-negative values, positive sum")
    return points.double(), w


def kmeanspp(
    points: torch.Tensor, weights: torch.Tensor | None, k: int, *, seed: int = 0
) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) with weights: the first centre drawn ∝ w,
    each next one ∝ w·D² (D = distance to the nearest chosen centre). Returns k×d centres."""
    p, w = _check(points, weights, k, "kmeans++")
    g = torch.Generator().manual_seed(seed)
    chosen = [int(torch.multinomial(w.cpu(), 1, generator=g))]  # g is a CPU generator
    d2 = _sq_dist(p, p[chosen[-1]][None])[:, 0]
    for _ in range(1, k):
        prob = w * d2
        if float(prob.sum()) <= 0:  # every point sits on a centre: take any unchosen one
            prob = w.clone()
            prob[chosen] = 0
            if float(prob.sum()) <= 0:
                prob = torch.ones_like(w)
                prob[chosen] = 0
        chosen.append(int(torch.multinomial(prob.cpu(), 1, generator=g)))
        d2 = torch.minimum(d2, _sq_dist(p, p[chosen[-1]][None])[:, 0])
    return p[chosen].clone()


def weighted_kmeans(
    points: torch.Tensor,
    weights: torch.Tensor | None,
    k: int,
    *,
    seed: int = 0,
    iters: int = 100,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means minimising Σ_i w_i‖x_i − c_{a(i)}‖² (KF's objective).

    ``points`` n×d, ``weights`` n (None = uniform), ``init`` k×d (default :func:`kmeanspp`).
    Each step assigns every point to its nearest centre (ties → lowest index) and moves each
    centre to the weighted mean of its points; an emptied cluster takes the point farthest (by
    weighted distance) from its centre among clusters of two or more. Stops when no assignment
    changes or after ``iters`` steps. Returns ``(centres k×d float64, assignment n int64)``.
    """
    p, w = _check(points, weights, k, "weighted_kmeans")
    c = kmeanspp(p, w, k, seed=seed) if init is None else init.double().clone()
    if c.shape != (k, p.shape[1]):
        raise ValidationError(f"weighted_kmeans: init must be {k}×{p.shape[1]}, got {c.shape}")
    assign = _sq_dist(p, c).argmin(1)
    for _ in range(iters):
        assign = _fill_empty(p, w, c, assign, k)
        c = _centres(p, w, assign, k, c)
        new = _sq_dist(p, c).argmin(1)
        if bool((new == assign).all()):
            break
        assign = new
    assign = _fill_empty(p, w, c, assign, k)
    return _centres(p, w, assign, k, c), assign


def _centres(p, w, assign, k, old):
    num = torch.zeros_like(old).index_add_(0, assign, p * w[:, None])
    den = torch.zeros(k, dtype=torch.float64, device=p.device).index_add_(0, assign, w)
    # a cluster whose points all weigh 0 keeps its centre
    return torch.where(den[:, None] > 0, num / den.clamp_min(1e-300)[:, None], old)


def _fill_empty(p, w, c, assign, k):
    assign = assign.clone()
    dist = None  # the centres do not move here: one distance matrix serves every empty cluster
    for j in range(k):
        counts = torch.bincount(assign, minlength=k)
        if counts[j] > 0:
            continue
        if dist is None:
            dist = _sq_dist(p, c)
        far = w * dist.gather(1, assign[:, None])[:, 0]
        far[counts[assign] < 2] = -1  # never empty another cluster
        assign[int(far.argmax())] = j
    return assign


def pair_targets(
    a: torch.Tensor, b: torch.Tensor, s_a: torch.Tensor, s_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF: the Hungarian pairing of parent A's neurons ``a`` (n×R) with parent B's ``b`` (n×R)
    under cost s_i s_j/(s_i + s_j)·‖a_i − b_j‖² (importances ``s_a``, ``s_b``; see the module
    docstring for why squared), and each pair's target p = (s_i a_i + s_j b_j)/(s_i + s_j).
    Returns ``(rows, cols, targets)``: A's neuron ``rows[t]`` pairs B's ``cols[t]``; ``rows`` is
    0..n-1, so ``targets`` (n×R, float64) is in A's neuron order."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValidationError(f"pair_targets: a and b must be equal n×R, got {a.shape}, {b.shape}")
    a, b = a.double(), b.double()
    sa, sb = s_a.double().reshape(-1, 1), s_b.double().reshape(1, -1)
    if sa.shape[0] != len(a) or sb.shape[1] != len(b):
        raise ValidationError("pair_targets: one importance per neuron is needed")
    if bool((sa <= 0).any()) or bool((sb <= 0).any()):
        raise ValidationError("pair_targets: importances must be positive (see importance.FLOOR)")
    cost = sa * sb / (sa + sb) * _sq_dist(a, b)
    rows, cols = hungarian(cost)
    sr, sc = s_a.double()[rows, None], s_b.double()[cols, None]
    return rows, cols, (sr * a[rows] + sc * b[cols]) / (sr + sc)


def unit_rows(m: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``m`` (rows × neurons) with every row scaled to unit L2 norm (an all-zero row stays 0):
    the v1 code's ``normalize_activations_per_sample`` (2507.00037's ViT runs), so that every
    token weighs the same in the neurons' distances whatever its activation scale."""
    m = m.double()
    return m / m.norm(dim=1, keepdim=True).clamp_min(eps)


# ---- from neurons to the fused level's targets ---------------------------------------------
# A grouping is one int64 tensor per parent: ``assign[k][i]`` = the fused neuron (slot) that
# parent k's neuron i feeds. Slots follow parent 0's order wherever possible, so a fused level
# that starts from parent 0's weights (gradient fitting) starts near its target.


def kf_grouping(
    mats: list[torch.Tensor], scores: list[torch.Tensor], *, seed: int = 0, iters: int = 100
) -> list[torch.Tensor]:
    """KF: weighted k-means of the pooled neurons (columns of each parent's R×N_k ``mats``) into
    N_0 clusters, clusters put in parent 0's slots by a Hungarian match of centroids to parent
    0's neurons (squared distance)."""
    width = mats[0].shape[1]
    pts = torch.cat([m.T.double() for m in mats])
    centres, assign = weighted_kmeans(pts, torch.cat(scores), width, seed=seed, iters=iters)
    rows, cols = hungarian(_sq_dist(centres, mats[0].T.double()))
    dev = assign.device
    slot = torch.empty(width, dtype=torch.int64, device=dev)
    slot[rows.to(dev)] = cols.to(dev)  # the solver's indices are CPU tensors
    return list(slot[assign].split([m.shape[1] for m in mats]))


def hf_grouping(mats: list[torch.Tensor], scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """HF: parent 0's neuron i keeps slot i; parent 1's neuron paired with it joins it."""
    rows, cols, _ = pair_targets(mats[0].T, mats[1].T, scores[0], scores[1])
    other = torch.empty(mats[1].shape[1], dtype=torch.int64, device=cols.device)
    other[cols] = rows  # the solver's indices: CPU; the grouping lives with the activations
    dev = mats[0].device
    return [torch.arange(mats[0].shape[1], device=dev), other.to(dev)]


def group_targets(
    mats: list[torch.Tensor], assign: list[torch.Tensor], scores: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot c's target = Σ s·a / Σ s over the neurons grouped into c (R×N_0, float64), and the
    slots' weights (their summed importance, normalised). A slot nobody feeds copies parent 0's
    neuron there."""
    width, dev = mats[0].shape[1], mats[0].device
    num = torch.zeros(len(mats[0]), width, dtype=torch.float64, device=dev)
    den = torch.zeros(width, dtype=torch.float64, device=dev)
    for m, a, s in zip(mats, assign, scores, strict=True):
        a, s = a.to(dev), s.to(dev, torch.float64)
        num.index_add_(1, a, m.to(dev, torch.float64) * s)
        den.index_add_(0, a, s)
    out = num / den.clamp_min(1e-300)
    empty = den == 0
    out[:, empty] = mats[0][:, empty].double()
    den[empty] = den[~empty].min() if bool((~empty).any()) else 1.0
    return out, den / den.sum()


def head_targets(logits: list[torch.Tensor], fractions: torch.Tensor | None) -> torch.Tensor:
    """The head's target (class c ↔ class c): Σ_k w_kc · logits_k[:, c], with w_kc = parent k's
    share of class c (``fractions`` K×C, each column normalised; a column of zeros or None =
    1/K), so a non-IID parent speaks for the classes it saw. Float64, on the logits' device."""
    k, c, dev = len(logits), logits[0].shape[1], logits[0].device
    if fractions is None:
        w = torch.full((k, c), 1.0 / k, dtype=torch.float64, device=dev)
    else:
        if tuple(fractions.shape) != (k, c):
            raise ValidationError(
                f"class_fractions is {tuple(fractions.shape)}; the head needs {k}×{c} (parent × "
                "class)"
            )
        f = fractions.to(dev, torch.float64)
        col = f.sum(0, keepdim=True)
        w = torch.where(col > 0, f / col.clamp_min(1e-300), torch.full_like(f, 1.0 / k))
    return sum(w[j] * logits[j].double() for j in range(k))
