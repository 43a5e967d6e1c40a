"""The ``neuron_fusion`` aggregator: its config (each bad parameter named), the fusion's own
oracle through the aggregator (clients that are exact neuron permutations of one MLP fuse back
to that MLP's function), a failing fusion keeping the global model, and short in-process runs
(Flower's real ``Strategy.start`` loop and ClientApp, no Ray)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from mergeforge.errors import ConfigError
from mergeforge.evaluate.vision.models import MLP
from mergeforge.federated import (
    Aggregator,
    AggregatorSpec,
    ClientUpdate,
    MergeStrategy,
    load_federated_config,
    run_federated,
)
from mergeforge.federated.client import ClientTask, client_data, load_data, local_train, make_model
from mergeforge.federated.client import app as client_app
from mergeforge.federated.local import LocalGrid
from mergeforge.federated.neuron_fusion import DEFAULT_RIDGE, server_fusion_set
from mergeforge.federated.server import initial_model

CFG = {"dataset": "digits", "n_train": 200, "n_test": 100, "clients": 3, "rounds": 2,
       "partition": "iid", "lr": 0.1, "batch_size": 25, "seed": 0, "evaluate_clients": False,
       "aggregator": {"name": "neuron_fusion", "parameters": {"fusion_examples": 100}}}  # fmt: skip


P = "aggregator.parameters"


def _fusion(parameters=None, *, clients=None, **top):
    """The run's config with a neuron_fusion aggregator: ``top`` its other keys (weighting,
    mu, ...), ``clients`` the run's."""
    agg = {"name": "neuron_fusion", **top}
    if parameters is not None:
        agg["parameters"] = parameters
    return {**CFG, "aggregator": agg, **({"clients": clients} if clients else {})}


# ------------------------------------------------------------------ the config


def test_the_config_parses_with_defaults_and_labels():
    spec = load_federated_config({**CFG, "aggregator": "neuron_fusion"}).aggregator
    assert (spec.name, spec.method, spec.label, spec.stats) == (
        "neuron_fusion", None, "neuron_fusion", None)  # fmt: skip
    f = spec.fusion
    assert (f.grouping, f.examples, f.class_fractions, dict(f.params)) == ("kf", 200, "weights", {})
    spec = load_federated_config(_fusion({
        "grouping": "hf", "importance": "conductance", "class_fractions": "reported",
        "fusion_examples": 64, "levels": ["fc1", "fc2", "head"], "ridge": 1e-6,
    }, weighting="uniform", mu=0.01, clients=2)).aggregator  # fmt: skip
    assert spec.label == "neuron_fusion(hf, conductance, reported)"
    assert spec.stats == "class_counts" and spec.mu == 0.01 and spec.weighting == "uniform"
    assert spec.fusion.params == {"importance": "conductance", "levels": ("fc1", "fc2", "head"),
                                  "ridge": 1e-6}  # fmt: skip
    assert spec.fusion.min_clients == 2


@pytest.mark.parametrize(
    "parameters, top, needle",
    [
        ({"importanc": "uniform"}, {}, "aggregator.parameters (neuron_fusion, grouping kf): "
                                       "unknown key 'importanc'. Did you mean 'importance'?"),
        ({"importance": "saliency"}, {}, "aggregator.parameters: fusion method 'kf': importance "
                                         "must be one of"),
        ({"grouping": "kmeans"}, {}, f"{P}.grouping: 'kmeans' is not one of kf, hf"),
        ({"fusion_examples": 0}, {}, f"{P}.fusion_examples: expected an integer >= 1"),
        ({"class_fractions": "labels"}, {}, f"{P}.class_fractions: 'labels' is not"),
        ({"ridge": "small"}, {}, "aggregator.parameters.ridge: expected a number, got 'small'"),
        ({"kmeans_iters": 0}, {}, "kmeans_iters must be a positive integer"),
        ({"kmeans_iters": 2.5}, {}, "aggregator.parameters.kmeans_iters: expected an integer"),
        ({"normalize_acts": "yes"}, {}, f"{P}.normalize_acts: expected true or false"),
        ({"levels": "fc1"}, {}, "aggregator.parameters.levels: expected a list of module names"),
        ({"grouping": "hf"}, {}, "aggregator.parameters.grouping: hf pairs the neurons of exactly "
                                 "2 clients, and a round here trains 3"),
        ({}, {"model_parameters": {"density": 0.5}}, "aggregator.model_parameters: neuron_fusion "
                                                     "takes no per-client parameters"),
        ({}, {"beta": 0.1}, "aggregator.beta: only trimmed_mean reads it"),
    ],
)  # fmt: skip
def test_bad_parameters_name_the_parameter(parameters, top, needle):
    with pytest.raises(ConfigError) as e:
        load_federated_config(_fusion(parameters, **top))
    assert needle in str(e.value)


def test_the_aggregator_needs_the_fusion_set_and_the_architecture():
    spec = AggregatorSpec(name="neuron_fusion", method=None)
    with pytest.raises(ConfigError, match="needs the server's fusion set"):
        Aggregator(spec)
    agg = Aggregator.from_config(load_federated_config(CFG))
    assert agg.min_models == 1 and callable(agg.fusion_data) and agg.make_model is not None


# ------------------------------------------------------------------ the oracle


def _perm(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def permuted(m: MLP, seed: int) -> MLP:
    """``m`` with fc1's and fc2's neurons permuted consistently: the same function."""
    q = copy.deepcopy(m)
    p1, p2 = _perm(q.fc1[1].out_features, seed), _perm(q.fc2[0].out_features, seed + 1)
    q.fc1[1].weight.copy_(q.fc1[1].weight[p1])
    q.fc1[1].bias.copy_(q.fc1[1].bias[p1])
    q.fc2[0].weight.copy_(q.fc2[0].weight[p2][:, p1])
    q.fc2[0].bias.copy_(q.fc2[0].bias[p2])
    q.head.weight.copy_(q.head.weight[:, p2])
    return q


@pytest.mark.parametrize("grouping, k", [("kf", 3), ("hf", 2)])
def test_clients_that_permute_one_model_fuse_back_to_its_function(grouping, k):
    # the fusion's permutation recovery, through the aggregator and the server's fusion set
    # (200 stratified digits images, 28x28: they span 200 of the 784 input dimensions, so the
    # first level's least squares is exact on the fusion set and its span, the minimum-norm
    # solution elsewhere). The fusion's own ridge (1e-10), not the aggregator's default: a
    # ridge that steadies many rounds also shrinks this fit by a few per cent.
    torch.manual_seed(0)
    small = lambda: MLP(hidden=(12, 8))  # noqa: E731
    model = small().eval()
    clients = [permuted(model, seed=3), model, permuted(model, seed=7)][:k]
    assert not torch.equal(permuted(model, seed=3).fc1[1].weight, model.fc1[1].weight)
    spec = AggregatorSpec(name="neuron_fusion", method=None,
                          parameters={"grouping": grouping, "ridge": 1e-10})  # fmt: skip
    data = server_fusion_set("digits", None, None, 0, 200)
    assert len(data) == 200 and torch.bincount(data.labels).tolist() == [20] * 10
    agg = Aggregator(spec, seed=0, fusion_data=data, make_model=small)
    global_sd = small().state_dict()  # the round's start: no part of the fusion
    updates = [ClientUpdate(f"client{i}", i, m.state_dict(), float(n))
               for i, (m, n) in enumerate(zip(clients, (50, 30, 20), strict=False))]  # fmt: skip
    fused = agg(global_sd, updates, 1)
    assert list(fused) == list(global_sd)
    out = small().eval()
    out.load_state_dict(fused)
    test_x = load_data("digits", None, None, 0).test_x
    with torch.no_grad():
        assert float((out(data.inputs) - model(data.inputs)).abs().max()) < 1e-5
        a, b = out(test_x), model(test_x)  # off the fusion set's span: close, not exact
    assert float((a - b).abs().max()) < 2e-2 * float(b.abs().max())
    assert float((a.argmax(1) == b.argmax(1)).float().mean()) > 0.99


def test_the_default_ridge_keeps_the_function_close():
    torch.manual_seed(0)
    small = lambda: MLP(hidden=(12, 8))  # noqa: E731
    model = small().eval()
    spec = AggregatorSpec(name="neuron_fusion", method=None)
    agg = Aggregator(spec, fusion_data=server_fusion_set("digits", None, None, 0, 200),
                     make_model=small)  # fmt: skip
    assert DEFAULT_RIDGE > 1e-10
    ups = [ClientUpdate(f"client{i}", i, m.state_dict(), 1.0)
           for i, m in enumerate([model, permuted(model, seed=1)])]  # fmt: skip
    out = small().eval()
    out.load_state_dict(agg(small().state_dict(), ups, 1))
    with torch.no_grad():
        a, b = out(agg.fusion_data.inputs), model(agg.fusion_data.inputs)
    # the default ridge (1e-2) shrinks the fit: 3.6 % of the largest logit here, measured
    assert 1e-3 < float((a - b).abs().max()) < 5e-2 * float(b.abs().max())
    x = load_data("digits", None, None, 0).test_x
    with torch.no_grad():
        a, b = out(x), model(x)
    assert bool((a.argmax(1) == b.argmax(1)).float().mean() > 0.97)  # 98.6 % measured


# ------------------------------------------------------------------ a failing fusion


def _reply(msg, sd, n, pid, counts=None):
    content = {"arrays": ArrayRecord(sd), "metrics": MetricRecord({"num-examples": n}),
               "client": ConfigRecord({"partition-id": pid})}  # fmt: skip
    if counts is not None:
        content["stats.class_counts"] = ArrayRecord({"class_counts": counts})
    return Message(content=RecordDict(content), reply_to=msg)


def test_a_failing_fusion_keeps_the_global_model_and_bad_counts_drop_a_client(caplog):
    torch.manual_seed(0)
    small = lambda: MLP(hidden=(12, 8))  # noqa: E731
    g = small().state_dict()
    spec = AggregatorSpec(name="neuron_fusion", method=None,
                          parameters={"class_fractions": "reported"})  # fmt: skip
    agg = Aggregator(spec, fusion_data=server_fusion_set("digits", None, None, 0, 50),
                     make_model=small)  # fmt: skip
    s = MergeStrategy(agg, fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3)
    msgs = list(s.configure_train(1, ArrayRecord(g), ConfigRecord(), LocalGrid(client_app, 3)))
    sds = [small().state_dict() for _ in range(3)]
    replies = [_reply(msgs[0], sds[0], 10, 0, torch.ones(3, dtype=torch.int64)),  # 3 classes
               _reply(msgs[1], sds[1], 10, 1, torch.ones(3, dtype=torch.int64)),
               _reply(msgs[2], sds[2], 10, 2)]  # no counts  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mergeforge"):
        arrays, _ = s.aggregate_train(1, replies)
    assert arrays is None and not s.rounds[0].updated  # Strategy.start keeps its arrays
    assert s.rounds[0].kept == ["client0", "client1"]
    assert "no class_counts statistics ArrayRecord" in s.rounds[0].dropped[0]["reason"]
    assert (
        "the neuron_fusion(reported) merge failed (ValidationError: client0's class counts "
        "have shape (3,); the model has 10 classes); the global model is kept"
    ) in caplog.text


# ------------------------------------------------------------------ in-process runs


def test_a_short_federated_run_fuses_every_round():
    res = run_federated({**CFG, "rounds": 4}, progress=False, in_process=True)
    assert res.aggregator == "neuron_fusion"
    assert [r["round"] for r in res.rows] == [0, 1, 2, 3, 4]
    # it learns: chance is 0.10 (measured: 0.10, 0.10, 0.12, 0.16, 0.24)
    assert res.initial_accuracy < 0.15 and res.final_accuracy > 0.2
    for r in res.rows[1:]:
        assert r["updated"] and r["kept"] == ["client0", "client1", "client2"] and not r["dropped"]
        assert 0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 and r["aggregate_s"] > 0
    assert res.final_accuracy is not None and res.initial_accuracy is not None
    assert all(torch.isfinite(t).all() for t in res.state_dict.values())


def test_hf_with_reported_class_counts_runs_with_two_clients():
    cfg = _fusion({"grouping": "hf", "class_fractions": "reported", "fusion_examples": 60},
                  clients=2)  # fmt: skip
    cfg["partition"], cfg["rounds"] = {"kind": "shards", "shards": 2}, 1
    res = run_federated(cfg, progress=False, in_process=True)
    assert res.aggregator == "neuron_fusion(hf, reported)"
    assert res.rows[1]["updated"] and res.rows[1]["kept"] == ["client0", "client1"]
    # oracle: the round's model is the aggregator applied to the clients trained by hand, each
    # with its own class counts (the shards give each client other classes)
    loaded = load_federated_config(cfg)
    task, start = ClientTask.from_config(loaded), initial_model(loaded)
    updates = []
    for pid in range(2):
        model = make_model(loaded)
        model.load_state_dict(start)
        x, y = client_data(task, pid)
        local_train(model, x, y, task, mu=0.0, seed=task.seed * 1_000_003 + 1009 + pid)
        counts = {"class_counts": torch.bincount(y, minlength=10)}
        updates.append(ClientUpdate(f"client{pid}", pid, model.state_dict(), float(len(x)),
                                    stats=counts))  # fmt: skip
    assert updates[0].stats["class_counts"].tolist() != updates[1].stats["class_counts"].tolist()
    want = Aggregator.from_config(loaded)(start, updates, 1)
    for k, t in want.items():
        torch.testing.assert_close(res.state_dict[k], t, rtol=1e-5, atol=1e-6, msg=k)
