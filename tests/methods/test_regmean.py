"""RegMean and Fisher merging: hand-worked oracles, FusionBench's functions on the same inputs,
and the shared properties with statistics supplied (the shared table runs them without)."""

from __future__ import annotations

import pytest
import torch
from tests.methods._engine import merge_model
from torch.testing import assert_close

G = torch.Generator().manual_seed(0)
KEYS = {"enc.q.weight": (4, 6), "enc.q.bias": (4,), "h.0.attn.c_attn.weight": (6, 5)}


def _psd(n: int) -> torch.Tensor:
    a = torch.randn(n, 2 * n, generator=G, dtype=torch.float64)
    return (a @ a.T / (2 * n)).float()


def _gram_shape(key, shape):
    if len(shape) != 2:
        return None
    n = shape[0] if "c_attn" in key else shape[1]  # Conv1D stores (in, out)
    return n


def _inputs(n_models=3, identical_grams=False):
    base = {k: torch.randn(s, generator=G) for k, s in KEYS.items()}
    xs = {k: [b + 0.1 * torch.randn(b.shape, generator=G) for _ in range(n_models)]
          for k, b in base.items()}  # fmt: skip
    sidecars = {}
    for k, s in KEYS.items():
        n = _gram_shape(k, s)
        if n is None:
            sidecars[k] = (None,) * n_models
        else:
            g = _psd(n)
            sidecars[k] = tuple(g.clone() if identical_grams else _psd(n) for _ in range(n_models))
    return base, xs, sidecars


def _regmean(base, xs, sidecars, **params):
    model = {k: (None if base is None else base[k], xs[k]) for k in xs}
    return merge_model("regmean", model, params, sidecars=sidecars)


@pytest.mark.parametrize("alpha", [0.1, 0.9])
def test_identical_grams_give_the_average(alpha):
    base, xs, sidecars = _inputs(identical_grams=True)
    for b in (base, None):
        out = _regmean(b, xs, sidecars, alpha=alpha)
        for k in xs:
            assert_close(out[k], torch.stack(xs[k]).mean(0), rtol=1e-4, atol=1e-5)


def test_base_does_not_change_the_result_at_scaling_one():
    base, xs, sidecars = _inputs()
    a, b = _regmean(base, xs, sidecars), _regmean(None, xs, sidecars)
    for k in xs:
        assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    half = _regmean(base, xs, sidecars, scaling=0.5)
    for k in xs:
        assert_close(half[k], base[k] + 0.5 * (a[k] - base[k]), rtol=1e-4, atol=1e-5)


def test_regmean_properties_with_grams():
    base, xs, sidecars = _inputs()
    ref = _regmean(base, xs, sidecars)
    perm = [2, 0, 1]
    out = _regmean(base, {k: [v[i] for i in perm] for k, v in xs.items()},
                   {k: tuple(v[i] for i in perm) for k, v in sidecars.items()})  # fmt: skip
    for k in xs:
        assert_close(out[k], ref[k], rtol=1e-4, atol=1e-5)  # symmetric
        assert ref[k].shape == KEYS[k] and torch.isfinite(ref[k]).all()
    same = _regmean(base, {k: [base[k].clone()] * 3 for k in xs}, sidecars)
    for k in xs:
        assert_close(same[k], base[k], rtol=1e-5, atol=1e-5)  # idempotent


def test_regmean_matches_fusion_bench():
    fb = pytest.importorskip("fusion_bench.method.regmean.regmean")
    base, xs, sidecars = _inputs()
    out = _regmean(base, xs, sidecars, alpha=0.3)
    # FusionBench: nn.Linear (out, in) with weight_transpose=True; Conv1D (in, out) with False
    for key, transpose in (("enc.q.weight", True), ("h.0.attn.c_attn.weight", False)):
        module = key.removesuffix(".weight")
        want = fb.merging_with_regmean_weights(
            {key: xs[key], module + ".bias": xs["enc.q.bias"]},
            [{module: g} for g in sidecars[key]],
            reduce_non_diagonal_ratio=0.3,
            weight_transpose=transpose,
        )
        assert_close(out[key], want[key], rtol=1e-4, atol=1e-5)
        assert_close(out["enc.q.bias"], want[module + ".bias"], rtol=1e-5, atol=1e-6)


def _fisher(base, xs, fishers, norms, weights=(1.0, 1.0, 1.0), **params):
    model = {k: (None if base is None else base[k], xs[k]) for k in xs}
    meta = tuple({"fisher_norm": repr(n)} for n in norms)
    sidecars = {k: tuple(f[k] for f in fishers) for k in xs}
    mps = [{"weight": w} for w in weights]
    return merge_model("fisher", model, params, mps, sidecars=sidecars, sidecar_meta=meta)


def _fisher_inputs():
    base, xs, _ = _inputs()
    fishers = [{k: torch.rand(s, generator=G) ** 4 * (i + 1) for k, s in KEYS.items()}
               for i in range(3)]  # fmt: skip
    norms = [float(sum(f.double().square().sum() for f in d.values()) ** 0.5) for d in fishers]
    return base, xs, fishers, norms


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_matches_fusion_bench(normalize):
    fb = pytest.importorskip("fusion_bench.method.fisher_merging.fisher_merging")
    base, xs, fishers, norms = _fisher_inputs()
    want = fb.merging_with_fisher_weights(
        dict(xs), fishers, torch.tensor([0.2, 0.3, 0.5]),
        normalize_fisher_weight=normalize, minimal_fisher_weight=1e-6,
    )  # fmt: skip
    for b in (base, None):
        out = _fisher(b, xs, fishers, norms, (0.2, 0.3, 0.5), normalize=normalize)
        for k in xs:
            assert_close(out[k], want[k], rtol=1e-5, atol=1e-6)


def test_fisher_by_hand_and_properties():
    base, xs, fishers, norms = _fisher_inputs()
    out = _fisher(base, xs, fishers, norms, normalize=False, min_fisher=0.0)
    for k in xs:
        f = torch.stack([d[k] for d in fishers])
        assert_close(out[k], (f * torch.stack(xs[k])).sum(0) / f.sum(0), rtol=1e-5, atol=1e-6)
    same = _fisher(base, {k: [base[k].clone()] * 3 for k in xs}, fishers, norms)
    for k in xs:
        assert_close(same[k], base[k], rtol=1e-6, atol=1e-6)
    ref = _fisher(base, xs, fishers, norms)
    p = [1, 2, 0]
    out = _fisher(base, {k: [v[i] for i in p] for k, v in xs.items()}, [fishers[i] for i in p],
                  [norms[i] for i in p])  # fmt: skip
    for k in xs:
        assert_close(out[k], ref[k], rtol=1e-6, atol=1e-6)


def test_scaling_without_a_base_is_refused():
    from mergeforge.errors import ConfigError

    _, xs, sidecars = _inputs()
    with pytest.raises(ConfigError, match="scaling.*base_model"):
        _regmean(None, xs, sidecars, scaling=0.5)
