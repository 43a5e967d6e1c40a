"""The Flower strategy whose aggregation is a mergeforge merge (Flower Message API, flwr 1.2x+).

:class:`MergeStrategy` is Flower's ``FedAvg`` (``flwr.serverapp.strategy.FedAvg``: sampling,
message construction, evaluation rounds, ``start``) with two hooks replaced:

* ``configure_train`` keeps the arrays it sends: ``aggregate_train`` receives only the replies
  (ALGORITHMS.md §6.3), and a merge needs the round's global model as its base. It also adds
  FedProx's ``proximal-mu`` to the train config when μ > 0 (as Flower's ``FedProx``);
* ``aggregate_train`` reads each reply on its own (``replies.py``: an error, NaN, wrong keys or
  shapes drop that client, logged with the reason), merges the rest with the
  :class:`~mergeforge.federated.aggregate.Aggregator`, and keeps the previous global model when
  no client is left or the result is not finite — the global model is never NaN.

Train metrics are averaged weighted by examples over the clients kept (Flower's rule); each
round's outcome (kept, dropped and why, seconds) is appended to :attr:`MergeStrategy.rounds`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from mergeforge.errors import MergeforgeError
from mergeforge.federated.aggregate import Aggregator, ClientUpdate
from mergeforge.federated.replies import WEIGHT_KEY, BadReply, client_name, read_reply

log = logging.getLogger("mergeforge")


@dataclass
class RoundReport:
    round: int
    kept: list[str] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    """``{"client": name, "reason": why}`` per client left out."""
    updated: bool = False
    """Whether the global model changed (False: no usable client, or a non-finite merge)."""
    aggregate_s: float = 0.0
    train_metrics: dict[str, float] = field(default_factory=dict)


class MergeStrategy(FedAvg):
    """FedAvg's rounds with any mergeforge aggregator (see the module docstring).

    ``aggregator``: an :class:`Aggregator` (``Aggregator(AggregatorSpec(...))``); ``mu``:
    FedProx's proximal weight sent to the clients; ``on_round(report)``: called after each
    aggregation. The other arguments are ``FedAvg``'s.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        mu: float = 0.0,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes,
                         weighted_by_key=WEIGHT_KEY)  # fmt: skip
        self.aggregator = aggregator
        self.mu = float(mu)
        self.on_round = on_round
        self.rounds: list[RoundReport] = []
        self._sent: dict[int, tuple[dict[str, torch.Tensor], list[int]]] = {}
        self._names: dict[int, str] = {}  # node id -> the client name its replies gave

    def summary(self) -> None:
        log.debug("MergeStrategy: aggregator %s, mu %s", self.aggregator.spec.label, self.mu)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.mu > 0:
            config["proximal-mu"] = self.mu
        messages = list(super().configure_train(server_round, arrays, config, grid))
        # the base of this round's merge: a copy, whatever happens to the record afterwards
        base = {k: t.clone() for k, t in arrays.to_torch_state_dict().items()}
        self._sent[server_round] = (base, [m.metadata.dst_node_id for m in messages])
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t0 = time.perf_counter()
        replies = list(replies)
        global_sd, sampled = self._sent.pop(server_round)
        report = RoundReport(server_round)
        updates: list[ClientUpdate] = []
        for msg in replies:
            who = self._names.get(msg.metadata.src_node_id) or client_name(msg)
            try:
                u = read_reply(msg, global_sd, array_key=self.arrayrecord_key,
                               stats_kind=self.aggregator.spec.stats)  # fmt: skip
            except BadReply as e:
                report.dropped.append({"client": who, "reason": str(e)})
                continue
            self._names[u.node_id] = client_name(msg)
            if any(u.name == v.name for v in updates):  # two nodes claim one partition
                u = ClientUpdate(f"{u.name}-node{u.node_id}", u.node_id, u.state_dict,
                                 u.num_examples, u.metrics, u.stats)  # fmt: skip
            updates.append(u)
        answered = {m.metadata.src_node_id for m in replies}
        for node in sampled:
            if node not in answered:
                who = self._names.get(node, f"node {node}")
                report.dropped.append({"client": who, "reason": "no reply before the timeout"})
        for d in report.dropped:
            log.warning("round %d: %s left out of the aggregation: %s", server_round,
                        d["client"], d["reason"])  # fmt: skip
        # replies arrive in any order: merge in client order, so a round is reproducible
        updates.sort(key=lambda u: (len(u.name), u.name))
        merged = self._aggregate(server_round, global_sd, updates, report)
        report.kept = [u.name for u in updates]
        report.train_metrics = _weighted_metrics(updates)
        report.aggregate_s = time.perf_counter() - t0
        self.rounds.append(report)
        if self.on_round is not None:
            self.on_round(report)
        metrics = MetricRecord(report.train_metrics) if report.train_metrics else None
        return (ArrayRecord(merged) if merged is not None else None), metrics

    def _aggregate(self, server_round, global_sd, updates, report) -> dict | None:
        need = self.aggregator.min_models
        if len(updates) < need:
            log.warning("round %d: %d usable client(s), %s needs %d; the global model is kept",
                        server_round, len(updates), self.aggregator.spec.label, need)  # fmt: skip
            return None
        try:
            merged = self.aggregator(global_sd, updates, server_round)
        except (MergeforgeError, ValueError, RuntimeError) as e:
            # a degenerate round (e.g. one client's ×100 update breaking a covariance solve) must
            # not end a long run: the round is skipped, loudly, like a non-finite merge
            log.warning("round %d: the %s merge failed (%s: %s); the global model is kept",
                        server_round, self.aggregator.spec.label, type(e).__name__, e)  # fmt: skip
            return None
        bad = [k for k, t in merged.items() if t.is_floating_point() and
               not bool(torch.isfinite(t).all())]  # fmt: skip
        if bad:
            log.warning("round %d: the %s merge gave non-finite values in %r; the global model "
                        "is kept", server_round, self.aggregator.spec.label, bad[0])  # fmt: skip
            return None
        report.updated = True
        return merged


def _weighted_metrics(updates: list[ClientUpdate]) -> dict[str, float]:
    """Example-weighted mean of the metrics every kept client reported (the weight left out)."""
    if not updates:
        return {}
    keys = set.intersection(*(set(u.metrics) for u in updates)) - {WEIGHT_KEY}
    total = sum(u.num_examples for u in updates)
    return {k: float(sum(u.metrics[k] * u.num_examples for u in updates) / total)
            for k in sorted(keys)}  # fmt: skip
