"""Weighted k-means against scikit-learn, HF pairing against scipy's LAP, and the targets."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

from mergeforge.errors import ValidationError
from mergeforge.fusion.cluster import (
    group_targets,
    head_targets,
    hf_grouping,
    kf_grouping,
    kmeanspp,
    pair_targets,
    weighted_kmeans,
)


def _blobs(n=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, d, generator=g) * 4
    return (centres[torch.arange(n) % 4] + torch.randn(n, d, generator=g)).double()


def _sklearn(points, weights, init, iters=100):
    km = KMeans(len(init), init=init.numpy(), n_init=1, max_iter=iters, tol=0, algorithm="lloyd")
    km.fit(points.numpy(), sample_weight=None if weights is None else weights.numpy())
    return torch.as_tensor(km.cluster_centers_), torch.as_tensor(km.labels_)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uniform_weights_equal_plain_kmeans_of_sklearn(seed):
    pts = _blobs(seed=seed)
    init = kmeanspp(pts, None, 4, seed=seed)
    c, a = weighted_kmeans(pts, torch.full((40,), 0.025), 4, init=init)
    c_ref, a_ref = _sklearn(pts, None, init)
    assert torch.equal(a, a_ref.long())
    torch.testing.assert_close(c, c_ref)
    c2, a2 = weighted_kmeans(pts, None, 4, init=init)  # None = uniform
    assert torch.equal(a2, a) and torch.equal(c2, c)


def test_weights_equal_sklearn_sample_weight_and_duplicated_points():
    pts = _blobs(n=20, seed=3)
    w = torch.arange(1, 21).double() % 3 + 1  # integer weights 1..3
    init = kmeanspp(pts, w, 3, seed=0)
    c, a = weighted_kmeans(pts, w, 3, init=init)
    c_ref, a_ref = _sklearn(pts, w, init)
    assert torch.equal(a, a_ref.long())
    torch.testing.assert_close(c, c_ref)
    # weight 2 = the point listed twice
    rep = pts.repeat_interleave(w.long(), 0)
    c_rep, _ = weighted_kmeans(rep, None, 3, init=init)
    torch.testing.assert_close(c, c_rep)


def test_weighted_centroid_by_hand():
    pts = torch.tensor([[0.0], [1.0], [10.0], [12.0]])
    w = torch.tensor([3.0, 1.0, 1.0, 1.0])
    c, a = weighted_kmeans(pts, w, 2, init=torch.tensor([[0.0], [10.0]]))
    assert a.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(c, torch.tensor([[0.25], [11.0]], dtype=torch.float64))


def test_kmeans_is_deterministic_and_seeded():
    pts = _blobs(n=30, d=5, seed=4)
    w = torch.rand(30, generator=torch.Generator().manual_seed(0))
    one = weighted_kmeans(pts, w, 5, seed=7)
    two = weighted_kmeans(pts, w, 5, seed=7)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    inits = {tuple(kmeanspp(pts, w, 5, seed=s)[:, 0].tolist()) for s in range(5)}
    assert len(inits) > 1  # the seed matters


def test_kmeanspp_skips_weightless_and_picks_each_distinct_point():
    pts = torch.eye(5).double()
    w = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    c = kmeanspp(pts, w, 4, seed=0)
    assert sorted(c.argmax(1).tolist()) == [0, 1, 3, 4]
    dup = torch.cat([pts, pts])  # every neuron twice: k = 5 centres are the 5 distinct points
    c, a = weighted_kmeans(dup, None, 5, seed=3)
    assert sorted(c.argmax(1).tolist()) == [0, 1, 2, 3, 4]
    assert torch.equal(a[:5], a[5:])


def test_empty_cluster_is_refilled():
    pts = torch.tensor([[0.0], [0.0], [0.0], [5.0]])
    c, a = weighted_kmeans(pts, None, 3, init=torch.tensor([[0.0], [0.0], [5.0]]))
    assert torch.bincount(a, minlength=3).min() >= 1


def test_uniform_pairing_equals_unweighted_lap():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 20, generator=g), torch.randn(6, 20, generator=g)
    s = torch.full((6,), 1 / 6)
    rows, cols, p = pair_targets(a, b, s, s)
    r, c = linear_sum_assignment(torch.cdist(a.double(), b.double()).pow(2).numpy())
    assert rows.tolist() == list(r) and cols.tolist() == list(c)
    torch.testing.assert_close(p, (a.double() + b.double()[cols]) / 2)


def test_weighted_pairing_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    sa, sb = torch.rand(4, generator=g) + 0.1, torch.rand(4, generator=g) + 0.1

    def pair_cost(i, j):  # min over p of s_i‖p − a_i‖² + s_j‖p − b_j‖², at the weighted mean
        p = (sa[i] * a[i] + sb[j] * b[j]) / (sa[i] + sb[j])
        return float(sa[i] * (p - a[i]).pow(2).sum() + sb[j] * (p - b[j]).pow(2).sum())

    best = min(
        itertools.permutations(range(4)), key=lambda q: sum(pair_cost(i, q[i]) for i in range(4))
    )
    rows, cols, p = pair_targets(a, b, sa, sb)
    assert cols.tolist() == list(best)
    i, j = 2, int(cols[2])
    torch.testing.assert_close(p[2].float(), (sa[i] * a[i] + sb[j] * b[j]) / (sa[i] + sb[j]))


def test_groupings_recover_a_permutation():
    g = torch.Generator().manual_seed(2)
    m0 = torch.randn(30, 5, generator=g)
    perm = torch.randperm(5, generator=g)
    m1 = m0[:, perm]  # parent 1's neuron i is parent 0's neuron perm[i]
    s = [torch.full((5,), 0.2)] * 2
    for assign in (hf_grouping([m0, m1], s), kf_grouping([m0, m1], s, seed=1)):
        assert torch.equal(assign[0], torch.arange(5)) and torch.equal(assign[1], perm)
        t, w = group_targets([m0, m1], assign, s)
        torch.testing.assert_close(t, m0.double())
        torch.testing.assert_close(w, torch.full((5,), 0.2, dtype=torch.float64))


def test_group_targets_by_hand():
    m0, m1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0, 8.0]])
    assign = [torch.tensor([0, 1]), torch.tensor([0, 0])]  # slot 0 gets three neurons
    s = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0])]
    t, w = group_targets([m0, m1], assign, s)
    torch.testing.assert_close(t, torch.tensor([[(1 + 4 + 16) / 4, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([0.8, 0.2], dtype=torch.float64))


def test_head_targets_weight_by_class_fraction():
    z0, z1 = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[5.0, 6.0, 7.0]])
    torch.testing.assert_close(head_targets([z0, z1], None).float(), (z0 + z1) / 2)
    frac = torch.tensor([[1.0, 0.25, 0.0], [0.0, 0.75, 0.0]])  # class 2 seen by nobody
    t = head_targets([z0, z1], frac)
    torch.testing.assert_close(t.float(), torch.tensor([[1.0, 0.25 * 2 + 0.75 * 6, 5.0]]))
    with pytest.raises(ValidationError, match="class_fractions"):
        head_targets([z0, z1], frac[:, :2])


def test_bad_inputs():
    with pytest.raises(ValidationError, match="k = 5"):
        weighted_kmeans(torch.randn(3, 2), None, 5)
    with pytest.raises(ValidationError, match="weights"):
        weighted_kmeans(torch.randn(3, 2), torch.tensor([1.0, -1.0, 1.0]), 2)
    with pytest.raises(ValidationError, match="positive"):
        pair_targets(torch.ones(2, 2), torch.ones(2, 2), torch.zeros(2), torch.ones(2))
