"""Faulty and hostile clients: a client that raises mid-round, returns NaN, tensors of the wrong
shape or names, or never answers is left out of that round (logged, naming it); the round
completes with the others and the global model is their merge, never NaN. The robust
aggregators keep a ×100 client inside the honest clients' range."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from mergeforge.federated import Aggregator, AggregatorSpec, MergeStrategy, load_federated_config
from mergeforge.federated.client import app as client_app
from mergeforge.federated.client import make_client_app
from mergeforge.federated.local import LocalGrid
from mergeforge.federated.server import Tracker, serve

SENT: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (round, client) -> what it sent


def faulty(pid: int, rnd: int, sd: dict, global_sd: dict) -> dict:
    """Round 1: client 2 sends NaN, 3 a wrong shape, 4 a wrong name; round 2: client 1 raises
    after training (mid-round), the others behave."""
    if rnd == 2 and pid == 1:
        raise RuntimeError("disk full while saving the update")
    if rnd == 1:
        if pid == 2:
            sd = {**sd, "fc2.0.bias": torch.full_like(sd["fc2.0.bias"], float("nan"))}
        if pid == 3:
            sd = {**sd, "head.weight": sd["head.weight"][:, :-1]}
        if pid == 4:
            sd = dict(sd)
            sd["head.weights"] = sd.pop("head.weight")
    SENT[(rnd, pid)] = {k: t.clone() for k, t in sd.items()}
    return sd


def test_bad_clients_are_left_out_and_the_round_goes_on(caplog):
    cfg = load_federated_config({"dataset": "digits", "n_train": 300, "n_test": 100,
                                 "clients": 6, "rounds": 2, "aggregator": "fedavg",
                                 "evaluate_clients": False})  # fmt: skip
    tracker = Keeping(cfg)
    SENT.clear()
    with caplog.at_level(logging.WARNING, logger="mergeforge"):
        result, strategy = serve(LocalGrid(make_client_app(faulty), 6), cfg, tracker)
    r1, r2 = strategy.rounds
    assert r1.kept == ["client0", "client1", "client5"] and r1.updated
    why = {d["client"].split(" ")[0]: d["reason"] for d in r1.dropped}
    assert "'fc2.0.bias' has 128 non-finite value(s)" in why["client2"]
    assert "'head.weight' has shape (10, 127), the global model's is (10, 128)" in why["client3"]
    assert "lacks 1 tensor(s) of the global model: 'head.weight'" in why["client4"]
    logged = [r.getMessage() for r in caplog.records]
    assert sum("round 1:" in m and "left out of the aggregation" in m for m in logged) == 3
    # round 2: an error reply has no content; the client is named from its earlier replies
    assert r2.kept == ["client0", "client2", "client3", "client4", "client5"]
    assert r2.dropped[0]["client"] == "client1 (node 2)"
    assert "RuntimeError: disk full while saving the update" in r2.dropped[0]["reason"]
    # round 1's global model is FedAvg of the good clients (50 examples each): their mean
    want = {k: sum(SENT[(1, p)][k] for p in (0, 1, 5)) / 3 for k in SENT[(1, 0)]}
    assert tracker.rows[1]["kept"] == ["client0", "client1", "client5"]
    assert max(float((strategy_global(tracker, 1)[k] - want[k]).abs().max()) for k in want) < 1e-6
    final = result.arrays.to_torch_state_dict()
    assert all(torch.isfinite(t).all() for t in final.values())


class Keeping(Tracker):
    """A tracker that also keeps each round's global model."""

    def evaluate(self, server_round, arrays):
        self.__dict__.setdefault("models", {})[server_round] = arrays.to_torch_state_dict()
        return super().evaluate(server_round, arrays)


def strategy_global(tracker, rnd):
    return tracker.models[rnd]


def _messages(strategy, global_sd, n):
    grid = LocalGrid(client_app, n)
    return list(strategy.configure_train(1, ArrayRecord(global_sd), ConfigRecord(), grid))


def _reply(msg, sd, n=10, pid=0):
    content = {"arrays": ArrayRecord(sd), "metrics": MetricRecord({"num-examples": n}),
               "client": ConfigRecord({"partition-id": pid})}  # fmt: skip
    return Message(content=RecordDict(content), reply_to=msg)


def _strategy(spec=None, n=3):
    spec = spec or AggregatorSpec()
    return MergeStrategy(Aggregator(spec), fraction_evaluate=0.0, min_available_nodes=n,
                         min_train_nodes=n)  # fmt: skip


def test_a_client_that_never_answers_is_reported_and_the_others_merged(caplog):
    g = {"w": torch.zeros(3)}
    s = _strategy()
    msgs = _messages(s, g, 3)
    replies = [_reply(msgs[0], {"w": torch.ones(3)}, 10, 0),
               _reply(msgs[1], {"w": torch.full((3,), 4.0)}, 30, 1)]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mergeforge"):
        arrays, metrics = s.aggregate_train(1, replies)
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((3,), 3.25))
    late = msgs[2].metadata.dst_node_id
    assert s.rounds[0].dropped == [{"client": f"node {late}",
                                    "reason": "no reply before the timeout"}]  # fmt: skip
    assert f"node {late} left out" in caplog.text


def test_no_usable_client_or_a_non_finite_merge_keeps_the_global_model(monkeypatch):
    g = {"w": torch.zeros(3)}
    s = _strategy()
    msgs = _messages(s, g, 3)
    bad = [_reply(m, {"w": torch.tensor([float("nan"), 0, 0])}, 5, i) for i, m in enumerate(msgs)]
    assert s.aggregate_train(1, bad) == (None, None)  # Strategy.start then keeps its arrays
    msgs = _messages(s, g, 3)
    ok = [_reply(m, {"w": torch.ones(3)}, 5, i) for i, m in enumerate(msgs)]
    monkeypatch.setattr(
        Aggregator, "__call__", lambda self, g, u, r: {"w": torch.full((3,), float("inf"))}
    )
    arrays, _ = s.aggregate_train(1, ok)
    assert arrays is None and not s.rounds[-1].updated


def test_a_merge_that_raises_keeps_the_global_model(monkeypatch, caplog):
    s = _strategy()
    msgs = _messages(s, {"w": torch.zeros(3)}, 3)
    ok = [_reply(m, {"w": torch.ones(3)}, 5, i) for i, m in enumerate(msgs)]

    def broken(self, g, u, r):
        raise ValueError("cannot convert float NaN to integer")

    monkeypatch.setattr(Aggregator, "__call__", broken)
    with caplog.at_level("WARNING"):
        arrays, _ = s.aggregate_train(1, ok)
    assert arrays is None and not s.rounds[-1].updated
    assert "merge failed (ValueError: cannot convert float NaN to integer)" in caplog.text


def test_a_reply_that_is_not_a_model_is_dropped():
    g = {"w": torch.zeros(3)}
    s = _strategy(n=2)
    m0, m1 = _messages(s, g, 2)
    no_count = Message(content=RecordDict({"arrays": ArrayRecord({"w": torch.ones(3)}),
                                           "metrics": MetricRecord({"loss": 1.0})}),
                       reply_to=m1)  # fmt: skip
    arrays, _ = s.aggregate_train(1, [_reply(m0, {"w": torch.ones(3)}, 5, 0), no_count])
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.ones(3))
    assert "no positive 'num-examples'" in s.rounds[0].dropped[0]["reason"]


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_robust_aggregators_keep_a_x100_client_inside_the_honest_range(name):
    random.seed(0)
    g = {"w": torch.zeros(50)}
    gen = torch.Generator().manual_seed(0)
    honest = [{"w": 0.1 * torch.randn(50, generator=gen)} for _ in range(4)]
    hostile = {"w": 100 * 0.1 * torch.randn(50, generator=gen)}
    s = _strategy(AggregatorSpec(name=name, method=None, beta=0.2), n=5)
    msgs = _messages(s, g, 5)
    sds = [*honest, hostile]
    arrays, _ = s.aggregate_train(1, [_reply(m, sd, 10, i) for i, (m, sd) in
                                      enumerate(zip(msgs, sds, strict=True))])  # fmt: skip
    w = arrays.to_torch_state_dict()["w"]
    stack = torch.stack([h["w"] for h in honest])
    assert (w >= stack.min(0).values - 1e-7).all() and (w <= stack.max(0).values + 1e-7).all()
    fedavg = _strategy(n=5)
    msgs = _messages(fedavg, g, 5)
    avg, _ = fedavg.aggregate_train(1, [_reply(m, sd, 10, i) for i, (m, sd) in
                                        enumerate(zip(msgs, sds, strict=True))])  # fmt: skip
    assert avg.to_torch_state_dict()["w"].abs().max() > 5 * w.abs().max()  # FedAvg is dragged


def test_regmean_statistics_are_checked_per_client():
    g = {"fc.weight": torch.zeros(4, 3), "fc.bias": torch.zeros(4)}
    s = _strategy(AggregatorSpec(name="merge", method="regmean"), n=2)
    m0, m1 = _messages(s, g, 2)
    good, bad = _reply(m0, {k: t + 1 for k, t in g.items()}, 10, 0), _reply(m1, g, 10, 1)
    good.content["stats.regmean"] = ArrayRecord({"fc.weight": torch.eye(3)})
    bad.content["stats.regmean"] = ArrayRecord({"fc.weight": torch.eye(4)})
    arrays, _ = s.aggregate_train(1, [good, bad])
    assert s.rounds[0].kept == ["client0"]
    assert "regmean Gram for 'fc.weight' has shape (4, 4), expected (3, 3)" in (
        s.rounds[0].dropped[0]["reason"])  # fmt: skip
    assert torch.allclose(arrays.to_torch_state_dict()["fc.weight"], torch.ones(4, 3))
