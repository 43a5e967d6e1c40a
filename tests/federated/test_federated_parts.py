"""The pieces without Flower's runtime: the robust aggregators against numpy / scipy on hand
examples, the partitions (disjoint, covering, seeded, skewed as asked), and the config's
errors (each names the key and the fix)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergeforge.errors import ConfigError
from mergeforge.federated import (
    PartitionSpec,
    coordinate_median,
    load_federated_config,
    partition,
    trimmed_mean,
)
from mergeforge.federated.robust import robust_state_dict

# ------------------------------------------------------------------ median / trimmed mean

HAND = [
    [[1.0, -2.0, 3.0], [4.0, 0.5, -1.0], [2.0, 9.0, 0.0]],  # K = 3
    [[1.0, 2.0], [3.0, 4.0], [10.0, -10.0], [5.0, 5.0]],  # K = 4: numpy averages the middle
    [[0.0], [0.0], [7.0], [7.0], [7.0]],  # ties
    [[1e6, -3.0], [1.0, -2.0], [2.0, -1.0], [1.5, 100.0], [0.5, -2.5]],  # one huge outlier
]


@pytest.mark.parametrize("rows", HAND)
def test_coordinate_median_is_numpys(rows):
    x = np.array(rows)
    got = coordinate_median([torch.tensor(r, dtype=torch.float64) for r in rows])
    np.testing.assert_allclose(got.numpy(), np.median(x, axis=0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rows", HAND)
@pytest.mark.parametrize("beta", [0.0, 0.2, 0.25, 0.4])
def test_trimmed_mean_is_scipys(rows, beta):
    from scipy.stats import trim_mean

    x = np.array(rows)
    got = trimmed_mean([torch.tensor(r, dtype=torch.float64) for r in rows], beta)
    np.testing.assert_allclose(got.numpy(), trim_mean(x, beta, axis=0), rtol=1e-12)


def test_hand_worked_values():
    ts = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([100.0]), torch.tensor([3.0])]
    assert coordinate_median(ts).item() == 2.5  # (2 + 3) / 2, not torch.median's 2
    assert trimmed_mean(ts, 0.25).item() == 2.5  # drop 1 and 100
    assert trimmed_mean(ts, 0.0).item() == 26.5  # the plain mean


def test_robust_state_dict_keeps_dtype_keys_and_inputs():
    sds = [{"w": torch.full((2, 2), float(v), dtype=torch.float16), "b": torch.tensor([v])}
           for v in (1, 5, 3)]  # fmt: skip
    before = [{k: t.clone() for k, t in sd.items()} for sd in sds]
    out = robust_state_dict(sds, kind="median")
    assert list(out) == ["w", "b"] and out["w"].dtype == torch.float16
    assert torch.equal(out["w"], torch.full((2, 2), 3.0, dtype=torch.float16))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(sds, before, strict=True) for k in a)
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean([torch.zeros(1)] * 3, 0.5)


# ------------------------------------------------------------------ partitions

LABELS = np.repeat(np.arange(10), 30)  # 300 examples, 30 per class


@pytest.mark.parametrize("spec", [PartitionSpec("iid"), PartitionSpec("dirichlet", alpha=0.3),
                                  PartitionSpec("shards", shards=2)])  # fmt: skip
def test_parts_are_disjoint_cover_everything_and_are_seeded(spec):
    parts = partition(LABELS, 5, spec, seed=3)
    allidx = np.concatenate(parts)
    assert len(parts) == 5 and len(allidx) == len(LABELS)
    assert np.array_equal(np.sort(allidx), np.arange(len(LABELS)))
    again = partition(LABELS, 5, spec, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(LABELS, 5, spec, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_is_balanced_and_shards_hold_few_classes():
    iid = partition(LABELS, 4, PartitionSpec("iid"), seed=0)
    assert {len(p) for p in iid} == {75}
    shards = partition(LABELS, 5, PartitionSpec("shards", shards=2), seed=0)
    # 10 shards of 30 sorted labels: each shard is one class, so a client holds <= 2 classes
    assert all(len(np.unique(LABELS[p])) <= 2 for p in shards)


def test_small_alpha_skews_labels_more_than_large_alpha():
    def skew(alpha):  # mean over clients of the largest class share
        parts = partition(LABELS, 5, PartitionSpec("dirichlet", alpha=alpha), seed=0)
        return np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts])

    assert skew(0.1) > skew(100.0) + 0.2


def test_impossible_partitions_say_what_to_change():
    with pytest.raises(ConfigError, match="clients"):
        partition(LABELS[:3], 5, PartitionSpec("iid"))
    with pytest.raises(ConfigError, match="partition.shards"):
        partition(LABELS[:8], 5, PartitionSpec("shards", shards=2))


# ------------------------------------------------------------------ the config


def test_aggregator_forms():
    assert load_federated_config({"aggregator": "fedavg"}).aggregator.method == "linear"
    ties = load_federated_config({"aggregator": "ties"}).aggregator
    assert (ties.name, ties.method, ties.label) == ("merge", "ties", "ties")
    prox = load_federated_config({"aggregator": {"name": "fedprox", "mu": 0.1}}).aggregator
    assert prox.mu == 0.1 and prox.method == "linear"
    tm = load_federated_config({"aggregator": {"name": "trimmed_mean", "beta": 0.1}}).aggregator
    assert tm.label == "trimmed_mean(0.1)" and tm.method is None
    assert load_federated_config({"aggregator": "regmean"}).aggregator.stats == "regmean"


@pytest.mark.parametrize(
    "doc, needle",
    [
        ({}, "missing 'aggregator:'"),
        ({"aggregator": "fedavg", "round": 3}, "unknown key 'round'. Did you mean 'rounds'?"),
        ({"aggregator": "tiez"}, "unknown merge method 'tiez'"),
        ({"aggregator": {"method": "ties", "model_parameters": {"weight": 2}}},
         "model_parameters.weight: each client's weight is its share"),
        ({"aggregator": {"method": "ties", "parameters": {"densty": 0.5}}}, "densty"),
        ({"aggregator": {"name": "fedprox", "mu": 0}}, "fedprox with mu 0 is fedavg"),
        ({"aggregator": {"name": "median", "beta": 0.1}}, "only trimmed_mean reads it"),
        ({"aggregator": {"name": "trimmed_mean", "beta": 0.5}}, "aggregator.beta: must be <="),
        ({"aggregator": {"method": "fedavg"}}, "write 'name: fedavg'"),
        ({"aggregator": {"name": "fedavg", "method": "ties"}}, "exactly one of 'name:'"),
        ({"aggregator": "fisher"}, "reads per-model statistics files that the clients"),
        ({"aggregator": "slerp", "clients": 3}, "slerp merges at most 1 model"),
        ({"aggregator": "fedavg", "partition": {"kind": "dirichlet", "alpha": 0}},
         "partition.alpha: must be > 0"),
        ({"aggregator": "fedavg", "partition": "dirichlet", "clients": 1}, "needs clients >= 2"),
        ({"aggregator": "fedavg", "dataset": "cifar"}, "dataset: 'cifar' is not one of"),
        ({"aggregator": "fedavg", "lr": -1}, "lr: must be > 0"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key_and_the_fix(doc, needle):
    with pytest.raises(ConfigError) as e:
        load_federated_config(doc)
    assert needle in str(e.value)
