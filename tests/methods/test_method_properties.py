"""Properties every method must have, driven by a table of cases over ``all_methods()``.

A new method fails ``test_every_method_has_a_case`` until it gets a row here; its ``Method``
record then decides which properties apply (``idempotent``, ``symmetric``, ``stochastic``).
Every case runs through the engine (``merge_state_dicts``: planner, statistics passes, seeding),
data-using methods with statistics made up for each expert (they follow it when reordered).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.methods._engine import merge_model, random_stats
from torch.testing import assert_close

from mergeforge.methods import all_methods, get_method


@dataclass(frozen=True)
class Case:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    model_params: tuple[dict[str, Any], ...] = ({}, {}, {})
    idempotent: bool = True
    """False where these parameters lift the method's idempotence (passthrough's scale)."""

    @property
    def id(self) -> str:
        shown = (
            {**self.params, **self.model_params[0]} if self.params or not self.idempotent else {}
        )
        return self.method + ("" if not shown else str(sorted(shown.items())))


W3 = ({"weight": 0.5}, {"weight": 1.0}, {"weight": 2.0})
SPARSE = (
    {"weight": 0.5, "density": 0.5},
    {"weight": 1.0, "density": 0.7},
    {"weight": 2.0, "density": 0.6},
)
CRUMBS = tuple(dict(mp, gamma=0.1) for mp in SPARSE)
DELLA = tuple(dict(mp, epsilon=0.2) for mp in SPARSE)
DENSE3 = ({"density": 0.5}, {"density": 0.7}, {"density": 0.6})
VARIANT_C = {"sign_weight": "saliency", "normalize_curvature": True, "normalize_saliency": True}
CASES = [
    Case("linear", {}, W3),
    Case("task_arithmetic", {"lambda_": 0.7}, W3),
    Case("ties", {}, SPARSE),
    Case("ties", {"topk_scope": "model", "rescale": True}, SPARSE),
    Case("ties", {"consensus_method": "count", "normalize": False}, SPARSE),
    Case("dare_ties", {}, SPARSE),
    Case("dare_linear", {"rescale_norm": "inverse_prob"}, SPARSE),
    Case("breadcrumbs", {}, CRUMBS),
    Case("breadcrumbs_ties", {"normalize": True}, CRUMBS),
    Case("della", {}, DELLA),
    Case("della_linear", {"rescale_norm": "inverse_prob"}, DELLA),
    Case("ranked_ties", {}, SPARSE),
    Case(
        "ranked_ties",
        {"rescale_norm": "inverse_prob", "normalize": True},
        tuple(dict(mp, density_aware=True) for mp in SPARSE),
    ),
    Case("model_stock", {}),
    Case("model_stock", {"filter_wise": True}),
    Case("emr", {}),
    Case("emr", {"task": 1}),
    Case("emr", {"task": 2, "scale_scope": "tensor"}),
    Case("wudi", {}),
    Case("wudi", {"iterations": 20, "init": "zero", "skip": ""}),
    Case("swudi", {}),
    Case("swudi", {"filter": "landweber", "rank_ratio": 1.0}),
    Case("swudi", {"filter": "tikhonov", "init": "mean", "scaling": 0.5}),
    Case("swudi", {"filter": "none", "rank_ratio": 1.0, "solve_dtype": "float64"}),
    Case("swudi_a", {}),
    Case("swudi_a", {"rank_rule": "gavish_donoho"}),
    Case("swudi_a", {"rank_rule": "entropy", "init": "zero"}),
    Case("ace", {}),
    Case("ace", {"ridge": "absolute", "prior": "code"}),
    Case("ace", {"prior": "isotropic", "hetero_threshold": 0.0}),
    # with made-up statistics (random_stats; tensors without a Gram take the no-statistic
    # path); hand-worked and FusionBench oracles: tests/methods/test_regmean.py
    Case("regmean", {"alpha": 0.5}),
    Case("fisher", {}, W3),
    Case("fisher", {"normalize": False, "scaling": 0.5}, W3),
    Case("tsv", {}),
    Case("tsv", {"skip": "", "scaling": 0.7}),
    Case("iso_c", {}),
    Case("iso_cts", {}),
    Case("iso_cts", {"common_fraction": 0.3, "non_matrix": "base"}),
    # curvature recorded in training (made-up R, C: random_stats); oracles in test_umtam.py,
    # test_ota.py, test_prune.py
    Case("umtam", {}, DENSE3),
    Case("umtam", VARIANT_C | {"lambda_": 0.8}, DENSE3),
    Case("umtam", {"curvature": "fisher-sampled"}, DENSE3),
    Case("ota", {}),
    Case("ota", {"power": 0.25, "normalization": "mean"}, ({"density": 0.5},) * 3),
    Case("ota", {"preconditioner": "rank1", "normalization": "sum", "power": 0.0}),
    Case("prune", {}, ({"density": 0.3},)),
    Case("prune", {"score": "magnitude"}, ({"density": 0.3},)),
    Case("prune", {"score": "fisher"}, ({"density": 0.3},)),
    Case("slerp", {"t": 0.3}, ({},)),
    # mergekit's remaining methods (issue 18); oracles: tests/test_vs_mergekit_more.py and
    # tests/methods/test_{spherical,sce,ram,nearswap_fusion}.py
    Case("multislerp", {}, W3),
    Case("multislerp", {"normalize_weights": False}, W3),
    Case("nuslerp", {}, W3[:2]),
    Case("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, W3[1:]),
    Case("karcher", {}),
    Case("karcher", {"max_iter": 3, "tol": 1e-7}),
    Case("sce", {}),
    Case("sce", {"select_topk": 0.5}),
    Case("nearswap", {"t": 0.05}, ({},)),
    Case("arcee_fusion", {}, ({},)),
    Case("ram", {}),
    Case("ram", {"epsilon": 0.1}),
    Case("ramplus_tl", {"epsilon": 0.1, "r": 0.5, "alpha": 0.5}),
    Case("ramplus_tl", {"overlap_scope": "model", "epsilon": 0.1, "r": 0.5}),
    Case("passthrough", {}, ({},)),
    Case("passthrough", {}, ({"scale": 0.5},), idempotent=False),
]
IDS = [c.id for c in CASES]
SHAPES = {"w": (4, 6), "b": (6,), "conv": (2, 3, 4), "scale": ()}


def make_model(case: Case, dtype=torch.float32, shapes=SHAPES, identical=False, seed=0):
    """{key: (base, experts)}: base None for methods without one (experts are then models)."""
    g = torch.Generator().manual_seed(seed)
    n = len(case.model_params)
    has_base = get_method(case.method).base != "none"
    model = {}
    for key, shape in shapes.items():
        base = torch.randn(shape, generator=g, dtype=dtype)
        noise = [0.1 * torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]
        xs = [base.clone() if identical else base + e for e in noise]
        model[key] = (base if has_base else None, xs)
    return model


def run(case: Case, model, order=None, seed=0):
    """Merge the experts in ``order`` (each with its parameters and statistics) through the
    engine; its random streams follow the experts' weights, not their positions."""
    order = list(range(len(case.model_params))) if order is None else order
    permuted = {k: (b, [xs[i] for i in order]) for k, (b, xs) in model.items()}
    mps = [case.model_params[i] for i in order]
    sidecars, meta = random_stats(case.method, case.params, model)
    if sidecars is not None:
        sidecars = {k: tuple(v[i] for i in order) for k, v in sidecars.items()}
        meta = tuple(meta[i] for i in order)
    return merge_model(case.method, permuted, case.params, mps, seed=seed, sidecars=sidecars,
                       sidecar_meta=meta)  # fmt: skip


def test_every_method_has_a_case():
    assert {c.method for c in CASES} == {m.name for m in all_methods()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_finite(case, dtype):
    for key, out in run(case, make_model(case, dtype)).items():
        assert out.shape == SHAPES[key] and out.dtype == dtype, key
        assert torch.isfinite(out).all(), key


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.idempotent and get_method(c.method).idempotent],
    ids=lambda c: c.id,
)
def test_identical_inputs_return_the_input(case):
    model = make_model(case, identical=True)
    for key, out in run(case, model).items():
        base, xs = model[key]
        assert_close(out, xs[0] if base is None else base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "case", [c for c in CASES if get_method(c.method).symmetric], ids=lambda c: c.id
)
def test_order_of_models_does_not_matter(case):
    model = make_model(case)
    n = len(case.model_params)
    ref = run(case, model)
    for order in ([n - 1 - i for i in range(n)], [(i + 1) % n for i in range(n)]):
        for key, out in run(case, model, order).items():
            assert_close(out, ref[key], rtol=1e-6, atol=1e-6)


def test_emr_is_symmetric_without_a_task():
    case = Case("emr", {})
    model = make_model(case)
    ref, out = run(case, model), run(case, model, [2, 0, 1])
    for key in ref:
        assert_close(out[key], ref[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fixed_seed_gives_bit_identical_output(case):
    model = make_model(case)
    a, b = run(case, model, seed=5), run(case, model, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if get_method(case.method).stochastic:
        c = run(case, model, seed=6)
        assert not all(torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1)


def test_the_engine_generator_is_not_advanced():
    from mergeforge.methods import TensorContext

    m, case = get_method("dare_ties"), Case("dare_ties", {}, SPARSE)
    base, xs = make_model(case)["w"]
    gen = torch.Generator().manual_seed(9)
    state = gen.get_state()
    ctx = TensorContext(key="w", generator=gen, model_names=("alpha", "bravo", "charlie"))
    m.fn(base, xs, m.params(), [m.model_params(**mp) for mp in SPARSE], ctx)
    assert torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inputs_are_not_mutated(case):
    model = make_model(case)
    before = {
        k: (None if b is None else b.clone(), [x.clone() for x in xs])
        for k, (b, xs) in model.items()
    }
    run(case, model)
    for key, (base, xs) in model.items():
        assert base is None or torch.equal(base, before[key][0])
        assert all(torch.equal(x, y) for x, y in zip(xs, before[key][1], strict=True))


@settings(max_examples=8, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple),
    # 1.0 exactly, or a density a DELLA window can fit in: 1 - 1e-16 leaves no room for an
    # epsilon with density + epsilon < 1 in floating point
    density=st.one_of(st.just(1.0), st.floats(0.05, 0.99)),
    seed=st.integers(0, 1000),
)
def test_any_shape_and_density(shape, density, seed):
    for case in CASES:
        eps = {"epsilon": min(density, 1 - density) / 2}
        mps = tuple(
            {**mp, "density": density, **(eps if "epsilon" in mp else {})}
            if "density" in mp
            else mp
            for mp in case.model_params
        )
        case = Case(case.method, case.params, mps, case.idempotent)
        model = make_model(case, shapes={"x": shape}, seed=seed)
        out = run(case, model, seed=seed)["x"]
        assert out.shape == shape and torch.isfinite(out).all(), case.id
        if case.idempotent and get_method(case.method).idempotent:
            same = make_model(case, shapes={"x": shape}, identical=True, seed=seed)
            base, xs = same["x"]
            expected = xs[0] if base is None else base
            assert_close(run(case, same, seed=seed)["x"], expected, rtol=1e-6, atol=1e-6)


def test_model_streams_follow_names_not_positions():
    from mergeforge.methods import TensorContext
    from mergeforge.methods.sparsify import model_generators

    def draws(names):
        ctx = TensorContext(key="w", generator=torch.Generator().manual_seed(1), model_names=names)
        return [torch.rand(4, generator=g) for g in model_generators(ctx, len(names), "cpu")]

    ab, ba, aa = draws(("a", "b")), draws(("b", "a")), draws(("a", "a"))
    assert torch.equal(ab[0], ba[1]) and torch.equal(ab[1], ba[0])
    assert torch.equal(aa[0], ab[0]) and not torch.equal(aa[0], aa[1])  # a copy drops anew
