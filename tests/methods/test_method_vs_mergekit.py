"""Oracle: mergekit's own tensor functions give the same tensors (≤ 1e-6 in fp32).

mergekit's methods are called directly on tensors (``registry.get(name)([TensorGroup], ...)``),
so only the numerics are compared, not the YAML plumbing. DARE and DELLA draw from an RNG:
with torch's global RNG (no ``ctx.generator``) both draw the same stream and must agree bit for
bit; with our seeded per-model generators the kept fraction, the rescale factor and the mean
must agree statistically. Every test here compares with mergekit: each carries the ``mergekit``
marker (skipped, with the reason, where mergekit is not importable) and imports it when it runs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.methods._engine import call_method, merge_tensor

from mergeforge.config import yaml_field_map
from mergeforge.methods import params as P
from mergeforge.methods import sparsify as S
from mergeforge.methods.consensus import agrees, elect_sign

pytestmark = pytest.mark.mergekit


def mk_registry():
    from mergekit.merge_methods import registry

    return registry


def mk_sparsify():
    import mergekit.sparsify

    return mergekit.sparsify


SHAPES = [(16, 24), (50,), (3, 4, 5)]


def experts(shape, n=3, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * (i + 1) * torch.randn(shape, generator=g) for i in range(n)]


def mergekit(name, base, tensors, parameters):
    from mergekit.merge_methods.base import TensorGroup

    inputs = tensors if base is None else [base, *tensors]
    group = TensorGroup.from_tensors(inputs, base_index=None if base is None else 0)
    return mk_registry().get(name)([group], parameters=parameters)[0]


def per_model(mps, key):
    """mergekit's per-input form {input id: value}; the base is input 0."""
    return {i + 1: mp[key] for i, mp in enumerate(mps)}


MODEL_PARAMS = [
    {"weight": 0.7, "density": 0.5},
    {"weight": -0.3, "density": 0.3},
    {"weight": 1.1, "density": 0.8},
]
GTA_CASES = [
    (name, shared)
    for name in ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties")
    for shared in ({}, {"normalize": True, "lambda": 1.3}, {"normalize": False, "rescale": True})
    if not (name == "task_arithmetic" and "rescale" in shared)
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("name", "shared"), GTA_CASES)
def test_task_vector_methods(name, shared, shape):
    base, xs = experts(shape)
    extra = {"gamma": 0.05} if "breadcrumbs" in name else {}
    mps = [dict(mp, **extra) for mp in MODEL_PARAMS]
    if name == "task_arithmetic":
        mps = [{"weight": mp["weight"]} for mp in mps]
    theirs = mergekit(name, base, xs, {**shared, **{k: per_model(mps, k) for k in mps[0]}})
    ours = merge_tensor(name, base, xs, shared, mps)  # YAML names, as mergekit's
    assert (ours - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
@pytest.mark.parametrize("shape", SHAPES)
def test_random_sparsifiers_same_stream_bit_identical(name, shape):
    base, xs = experts(shape)
    extra = {"epsilon": 0.1} if "della" in name else {}
    mps = [dict(mp, **extra) for mp in MODEL_PARAMS]
    torch.manual_seed(11)
    theirs = mergekit(name, base, xs, {k: per_model(mps, k) for k in mps[0]})
    torch.manual_seed(11)
    ours = call_method(name, base, xs, {}, mps)  # no ctx.generator: global RNG
    assert torch.equal(ours, theirs)


def _sparse_stats(delta, sparse):
    kept = sparse != 0
    return kept.float().mean().item(), (sparse[kept] / delta[kept]).median().item(), sparse.mean()


@pytest.mark.parametrize("method", ["random", "della_magprune"])
def test_random_sparsifiers_seeded_statistics(method):
    g = torch.Generator().manual_seed(0)
    delta = 0.5 + torch.randn(200, 300, generator=g)  # the mean 0.5 must survive
    density = 0.3
    mp = P.DellaModelParams(density=density, epsilon=0.1)
    sparsifier = getattr(S, method)
    ours = S.sparsify(delta, sparsifier, mp, rescale_norm="l1", generator=g)
    torch.manual_seed(1)
    mk = mk_sparsify()
    theirs = mk.sparsify(
        delta, density, mk.SparsificationMethod(method), epsilon=0.1,
        rescale_norm=mk.RescaleNorm.l1,
    )  # fmt: skip
    kf_o, rs_o, mean_o = _sparse_stats(delta, ours)
    kf_t, rs_t, mean_t = _sparse_stats(delta, theirs)
    assert abs(kf_o - density) < 0.01 and abs(kf_t - density) < 0.01
    assert rs_o == pytest.approx(rs_t, rel=0.03)
    # σ of a mean ≈ 0.008 here: 4σ bounds
    assert abs(mean_o - mean_t) < 0.04
    if method == "random":  # l1 rescale ≈ 1/density, and unbiased
        assert rs_o == pytest.approx(1 / density, rel=0.03)
        assert abs(mean_o - delta.mean()) < 0.03
    if method == "della_magprune":  # large magnitudes are kept more often, in both
        big = delta.abs() > delta.abs().median(dim=1, keepdim=True).values
        assert abs((ours != 0)[big].float().mean() - (theirs != 0)[big].float().mean()) < 0.02
    # the papers' rescale: survivors ÷ keep probability; for DARE exactly 1/density
    exact = S.sparsify(delta, sparsifier, mp, rescale_norm="inverse_prob", generator=g)
    if method == "random":
        _, rs, _ = _sparse_stats(delta, exact)
        assert rs == pytest.approx(1 / density, rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    density=st.floats(0.0, 1.0),
    gamma=st.floats(0.0, 0.5),
    norm=st.sampled_from([None, "l1", "l2", "linf"]),
    seed=st.integers(0, 2**16),
)
def test_deterministic_sparsifiers(shape, density, gamma, norm, seed):
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    mp = P.BreadcrumbsModelParams(density=density, gamma=gamma)
    mk = mk_sparsify()
    mk_norm = None if norm is None else mk.RescaleNorm(norm)
    for ours_fn, theirs_method in [
        (S.magnitude, mk.SparsificationMethod.magnitude),
        (S.magnitude_outliers, mk.SparsificationMethod.magnitude_outliers),
    ]:
        ours = S.sparsify(delta, ours_fn, mp, rescale_norm=norm)
        theirs = mk.sparsify(delta, density, theirs_method, gamma=gamma, rescale_norm=mk_norm)
        assert torch.equal(ours, theirs)


def test_trim_ties_on_bf16_deltas_differ_from_mergekit_only_among_tied_entries():
    # bf16 task vectors have many equal magnitudes. We keep tied entries in index order
    # (a stable sort's choice, found in O(n)); mergekit's unstable argsort keeps some other
    # subset of them. Everything else must be identical.
    delta = torch.randn(4096, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    assert delta.abs().unique().numel() < 3000
    mp = P.SparseModelParams(density=0.37)
    theirs = mk_sparsify().magnitude(delta, 0.37)
    ours = S.sparsify(delta, S.magnitude, mp, rescale_norm=None)
    k = int(0.37 * delta.numel())
    thr = delta.abs().kthvalue(delta.numel() - k + 1).values
    assert int((ours != 0).sum()) == int((theirs != 0).sum()) == k
    differ = ours != theirs
    assert bool((delta.abs()[differ] == thr).all())  # only threshold ties differ
    tied = (delta.abs() == thr).nonzero().squeeze(1)
    kept_tied = ours[tied] != 0
    assert bool(kept_tied[: int(kept_tied.sum())].all())  # the first ones in index order


@pytest.mark.parametrize("method", ["sum", "count"])
def test_elect_sign_matches_get_mask(method):
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(4, 30, generator=g).round()  # integer values: plenty of tied votes
    ours = agrees(deltas, elect_sign(deltas, method))
    assert torch.equal(ours, get_mask(deltas, method=method))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear(shape, normalize):
    _, xs = experts(shape)
    weights = [0.2, 0.5, 0.9]
    theirs = mergekit("linear", None, xs, {"weight": weights, "normalize": normalize})
    ours = merge_tensor(
        "linear", None, xs, {"normalize": normalize}, [{"weight": w} for w in weights]
    )
    assert (ours - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0, 1.2])
@pytest.mark.parametrize("kind", ["random", "parallel", "antiparallel", "zero"])
def test_slerp(shape, t, kind):
    base, xs = experts(shape, n=1, scale=1.0)
    other = {"random": xs[0], "parallel": 2 * base, "antiparallel": -base}.get(kind)
    other = torch.zeros(shape) if other is None else other
    theirs = mergekit("slerp", base, [other], {"t": t})
    ours = merge_tensor("slerp", base, [other], {"t": t})
    assert (ours - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 4])
def test_model_stock(shape, filter_wise, n):
    base, xs = experts(shape, n=n)
    theirs = mergekit("model_stock", base, xs, {"filter_wise": filter_wise})
    ours = merge_tensor("model_stock", base, xs, {"filter_wise": filter_wise})
    assert (ours - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize("scale", [None, 0.0, -1.5])
def test_passthrough(scale):
    _, xs = experts((3, 4), n=1)
    theirs = mergekit("passthrough", None, xs, {"scale": [scale]})
    ours = merge_tensor("passthrough", None, xs, {}, [{"scale": scale}])
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "name",
    ["linear", "slerp", "model_stock", "passthrough", "task_arithmetic", "ties", "dare_ties",
     "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"],
)  # fmt: skip
def test_parameter_names_and_defaults(name):
    """Every mergekit parameter of a shared method exists here with mergekit's default
    (``weight`` defaults to 1.0 here; mergekit requires it)."""
    from mergeforge.methods import get_method

    m = get_method(name)
    ours = m.param_fields()
    fields = {**ours["shared"], **ours["per_model"]}
    field_of = {**yaml_field_map(m.params), **yaml_field_map(m.model_params)}
    # task_arithmetic: mergekit accepts density and rescale and ignores them; we refuse them
    ignored = {"density", "rescale"} if name == "task_arithmetic" else set()
    for spec in mk_registry().get(name).spec.parameters:
        if spec.name in ignored:
            assert spec.name not in fields
            continue
        key = field_of.get(spec.name, spec.name)
        assert key in fields, (name, spec.name)
        expected = 1.0 if spec.name == "weight" else spec.default
        assert fields[key] == ("required" if spec.required and key == "t" else expected)
