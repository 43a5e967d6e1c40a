"""Cut a training set among N clients: IID, Dirichlet(α) label skew, or label-sorted shards.

Every split is a deterministic function of ``(labels, n_clients, spec, seed)``, so each client
(a Ray actor, or a SuperNode on another machine) recomputes its own part from the round's task
without any index list being sent. Parts are disjoint, sorted int64 index arrays.

* ``iid``: a seeded permutation cut into N near-equal parts.
* ``dirichlet``: per class, shares ~ Dir(α·1) (Hsu, Qi & Brown 2019, arXiv:1909.06335), the
  vision suite's :func:`~mergeforge.evaluate.vision.data.noniid_split` (redrawn until every
  client holds ``min_size`` examples).
* ``shards``: sort by label, cut into N·s shards, deal s random shards to each client
  (McMahan et al. 2017, arXiv:1602.05629, §3: "pathological non-IID", s = 2).
"""

from __future__ import annotations

import numpy as np

from mergeforge.errors import ConfigError
from mergeforge.evaluate.vision.data import NUM_CLASSES, noniid_split
from mergeforge.federated.config import PartitionSpec


def partition(
    labels: np.ndarray, n_clients: int, spec: PartitionSpec, *, seed: int = 0
) -> list[np.ndarray]:
    """The clients' index arrays (disjoint, covering every example; see the module docstring)."""
    labels = np.asarray(labels)
    n = len(labels)
    if n_clients < 1:
        raise ConfigError(f"clients: expected >= 1, got {n_clients}")
    rng = np.random.default_rng(seed)
    if spec.kind == "iid":
        if n < n_clients:
            raise ConfigError(f"clients: {n_clients} clients for {n} training examples; "
                              "lower clients or raise n_train")  # fmt: skip
        parts = np.array_split(rng.permutation(n), n_clients)
    elif spec.kind == "dirichlet":
        try:
            split = noniid_split(labels, n_clients, kind="dirichlet", alpha=spec.alpha,
                                 seed=seed, min_size=spec.min_size)  # fmt: skip
        except ValueError as e:
            raise ConfigError(f"partition: {e}; raise partition.alpha or n_train, or lower "
                              "partition.min_size or clients") from None  # fmt: skip
        parts = list(split.indices)
    elif spec.kind == "shards":
        count = n_clients * spec.shards
        if n < count:
            raise ConfigError(f"partition.shards: {count} shards for {n} examples; lower "
                              "partition.shards or clients")  # fmt: skip
        # a random order first, then a stable sort: ties between equal labels are random
        order = rng.permutation(n)
        order = order[np.argsort(labels[order], kind="stable")]
        shards = np.array_split(order, count)
        deal = rng.permutation(count).reshape(n_clients, spec.shards)
        parts = [np.concatenate([shards[j] for j in row]) for row in deal]
    else:
        raise ConfigError(f"partition.kind: {spec.kind!r} is not iid, dirichlet or shards")
    return [np.sort(p).astype(np.int64) for p in parts]


def label_histograms(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    """``(clients, classes)`` counts of each client's labels (for reports)."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=NUM_CLASSES) for p in parts])
