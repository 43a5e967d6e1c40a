"""The chunked TIES path is the unchunked one, bit for bit, including threshold ties that
straddle chunk boundaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergeforge.methods import _fused, get_method
from mergeforge.methods import ties_chunked as tc
from mergeforge.methods.base import TensorContext


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(tc, "CHUNK", 64)
    monkeypatch.setattr(tc, "MIN_NUMEL", 1)


def _inputs(seed: int, shape=(40, 30), quantum=None):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    deltas = [0.01 * torch.randn(shape, generator=g) for _ in range(3)]
    if quantum:  # a coarse grid makes many entries tie exactly at the trim threshold
        deltas = [torch.round(d / quantum) * quantum for d in deltas]
    return base, [base + d for d in deltas]


@pytest.fixture(params=["fused", "torch"])
def tail(request, monkeypatch):
    """Run each test with the numba kernel and with the torch chunk loop."""
    if request.param == "fused":
        if not _fused.available():
            pytest.skip("numba not installed")
    else:
        monkeypatch.setattr(_fused, "usable", lambda *a: False)
    return request.param


@pytest.mark.parametrize("quantum", [None, 4e-3, 1e-2])
@pytest.mark.parametrize(
    "params",
    [{}, {"consensus_method": "count", "normalize": False, "lambda_": 0.7}, {"lambda_": 1.3}],
)
@pytest.mark.parametrize(
    "wd", [((1.0, 0.2), (0.5, 0.5), (2.0, 1.0)), ((1.0, 0.1), (-1.0, 0.0), (1.0, 0.9))]
)
def test_chunked_equals_unchunked(small_chunks, tail, monkeypatch, quantum, params, wd):
    m = get_method("ties")
    p = m.params(**params)
    mps = tuple(m.model_params(weight=w, density=d) for w, d in wd)
    base, xs = _inputs(0, quantum=quantum)
    assert tc.usable(base, xs, p)
    fast = m.fn(base, xs, p, mps, TensorContext(key="k"))
    monkeypatch.setattr(tc, "MIN_NUMEL", 1 << 40)
    assert not tc.usable(base, xs, p)
    slow = m.fn(base, xs, p, mps, TensorContext(key="k"))
    assert torch.equal(fast, slow)


def test_ties_straddle_chunks(small_chunks, tail):
    """All entries tie: the kept ones are the first k in index order, across chunks."""
    base = torch.zeros(10, 50)
    x = torch.full((10, 50), 0.5)
    m = get_method("ties")
    out = m.fn(base, [x], m.params(), (m.model_params(density=0.3),), TensorContext(key="k"))
    flat = out.reshape(-1)
    k = int(0.3 * 500)
    assert torch.equal(flat[:k], torch.full((k,), 0.5))
    assert torch.equal(flat[k:], torch.zeros(500 - k))


def test_not_used_for_rescale_or_model_scope():
    m = get_method("ties")
    base, xs = _inputs(1, shape=(1100, 1000))
    assert tc.usable(base, xs, m.params())
    assert not tc.usable(base, xs, m.params(rescale=True))
    assert not tc.usable(base, xs, m.params(topk_scope="model"))
    assert not tc.usable(base.half(), [x.half() for x in xs], m.params())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_models", [1, 2, 4])
def test_fused_kernel_bitwise_with_signed_zeros(small_chunks, monkeypatch, dtype, n_models):
    """The numba kernel against the torch tail, bit for bit (signed zeros included), on
    entries that tie at the threshold and entries where the models cancel."""
    if not _fused.available():
        pytest.skip("numba not installed")
    g = torch.Generator().manual_seed(n_models)
    base = torch.randn(3000, generator=g, dtype=dtype)
    base[::7] = -0.0
    xs = [base + torch.round(torch.randn(3000, generator=g, dtype=dtype) * 50) / 1000
          for _ in range(n_models)]  # fmt: skip
    m = get_method("ties")
    p = m.params(lambda_=0.9)
    mps = tuple(m.model_params(weight=1.0 + 0.25 * i, density=0.35) for i in range(n_models))
    calls = []
    real = _fused.ties_tail
    monkeypatch.setattr(_fused, "ties_tail", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = m.fn(base, xs, p, mps, TensorContext(key="k"))
    assert calls == [1]  # the kernel ran
    monkeypatch.setattr(_fused, "usable", lambda *a: False)
    slow = m.fn(base, xs, p, mps, TensorContext(key="k"))
    assert len(calls) == 1
    assert torch.equal(
        fast.view(torch.int64 if dtype == torch.float64 else torch.int32),
        slow.view(torch.int64 if dtype == torch.float64 else torch.int32),
    )


@pytest.mark.parametrize("n", [1000, 300_000])
@pytest.mark.parametrize("quantum", [None, 1e-3])
@pytest.mark.parametrize("frac", [1e-4, 0.1, 0.5, 0.97, 1.0])
def test_bracketed_selection_matches_full_partition(n, quantum, frac):
    """kth_largest_abs_delta = the k-th largest |x - b| by a full partition, with the counts
    of entries above it and tied with it (or None, never a wrong answer)."""
    if not _fused.available():
        pytest.skip("numba not installed")
    g = torch.Generator().manual_seed(n)
    b = torch.randn(n, generator=g)
    d = torch.randn(n, generator=g) * 0.01
    if quantum:
        d = torch.round(d / quantum) * quantum  # many exact ties at the threshold
    x = b + d
    k = max(1, int(frac * n))
    found = _fused.kth_largest_abs_delta(x, b, k)
    a = (x - b).abs().numpy()
    t = np.partition(a, n - k)[n - k]
    if quantum is None:
        assert found is not None
    if found is not None:  # None (fall back to the full selection) is allowed, never wrong
        assert found == (float(t), int((a > t).sum()), int((a == t).sum()))


def test_bracketed_selection_refuses_nan():
    if not _fused.available():
        pytest.skip("numba not installed")
    b = torch.zeros(5000)
    x = torch.randn(5000)
    x[17] = float("nan")
    assert _fused.kth_largest_abs_delta(x, b, 100) is None


def test_kernels_without_disk_cache_give_the_same_result():
    """Where numba cannot cache (read-only install), the kernels compile per process."""
    numba = pytest.importorskip("numba")
    k = _fused._define(numba, cache=False)
    b = torch.randn(5000, dtype=torch.float64)
    x = b + torch.randn(5000, dtype=torch.float64) * 0.01
    cand = np.empty(5001)
    above, inside, below = k.bracket(x.numpy(), b.numpy(), 0.005, 0.01, cand)
    a = (x - b).abs().numpy()
    assert (above, inside, below) == ((a > 0.01).sum(), ((a >= 0.005) & (a <= 0.01)).sum(),
                                      (a < 0.005).sum())  # fmt: skip


def test_warm_up_pending_takes_the_torch_path_with_the_same_result(small_chunks, monkeypatch):
    """While the background warm-up for (dtype, n models) is loading, TIES does not wait for
    it: those tensors take the torch path (same bits); once it is done the kernel is used,
    and a second warm-up request for the same key starts no second thread."""
    import threading

    if not _fused.available():
        pytest.skip("numba not installed")
    dtype, n = torch.float64, 3
    key = (dtype, n)
    monkeypatch.setattr(_fused, "_READY", set())
    monkeypatch.setattr(_fused, "_PENDING", set())
    release, started, calls = threading.Event(), threading.Event(), []
    real_warm = _fused._warm

    def slow_warm(d, k):
        calls.append((d, k))
        started.set()
        release.wait(10)
        real_warm(d, k)

    monkeypatch.setattr(_fused, "_warm", slow_warm)
    m = get_method("ties")
    p = m.params()
    mps = tuple(m.model_params(weight=1.0, density=0.3) for _ in range(n))
    base, xs = _inputs(4)
    base, xs = base.double(), [x.double() for x in xs]

    used = []
    real_tail = _fused.ties_tail
    monkeypatch.setattr(_fused, "ties_tail", lambda *a, **k: used.append(1) or real_tail(*a, **k))
    m.warm_up(p, n, dtype, torch.device("cpu"))
    assert started.wait(10)
    m.warm_up(p, n, dtype, torch.device("cpu"))  # already pending: no second thread
    assert key in _fused._PENDING and not _fused.usable(base, xs)
    during = m.fn(base, xs, p, mps, TensorContext(key="k"))
    assert used == []  # the torch path
    release.set()
    for _ in range(200):
        if key in _fused._READY:
            break
        threading.Event().wait(0.05)
    assert key in _fused._READY and key not in _fused._PENDING and calls == [key]
    assert _fused.usable(base, xs)
    used.clear()  # the warm-up itself ran the kernel once
    after = m.fn(base, xs, p, mps, TensorContext(key="k"))
    assert used  # the kernel
    assert torch.equal(during, after)
