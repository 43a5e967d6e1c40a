"""The server side of a run: the strategy, the centralised evaluation, the ServerApp.

:func:`serve` is what the ServerApp does, in a simulation (``run.py``) and in a real
deployment (``app.py``) alike: the initial global model (``arch`` initialised from ``seed``),
:class:`~mergeforge.federated.strategy.MergeStrategy` with the config's aggregator, Flower's
``Strategy.start`` for ``rounds`` rounds with the task in the train config, and after every
round the global model scored on the held-out test set (:class:`Tracker`, which also times the
rounds and drives the progress display).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from mergeforge.federated import text
from mergeforge.federated.aggregate import Aggregator
from mergeforge.federated.client import TASK_KEY, ClientTask, load_data, make_model, score
from mergeforge.federated.config import FederatedConfig
from mergeforge.federated.strategy import MergeStrategy, RoundReport


def initial_model(cfg: FederatedConfig) -> dict[str, torch.Tensor]:
    """The round-0 global model: ``arch`` initialised from ``seed`` (fixed by the config)."""
    torch.manual_seed(cfg.seed)  # a vision model's initialisation (text heads: their own seed)
    model = make_model(cfg)
    return {k: t.detach().clone() for k, t in model.state_dict().items()}


@dataclass
class Tracker:
    """Scores the global model after each round on the test set and keeps the history.

    ``on_round(row)`` is called with the row of each round after the first (progress)."""

    cfg: FederatedConfig
    on_round: Callable[[dict[str, Any]], None] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    reports: dict[int, RoundReport] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def report(self, r: RoundReport) -> None:
        self.reports[r.round] = r

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        per_task = None
        model = make_model(self.cfg)
        model.load_state_dict(arrays.to_torch_state_dict())
        if self.cfg.is_text:  # the mean over the tasks' test splits
            acc, loss, per_task = text.score_tasks(model, self.cfg)
        else:
            data = load_data(self.cfg.dataset, self.cfg.n_train, self.cfg.n_test, self.cfg.seed)
            acc, loss = score(model, data.test_x, data.test_y)
        now = time.perf_counter()
        if server_round == 0:  # the clock of the rounds starts with them (not with Ray)
            self.started = now
        rep = self.reports.get(server_round)
        row: dict[str, Any] = {
            "round": server_round, "accuracy": acc, "loss": loss,
            "seconds": round(now - self.started, 3),
            "kept": rep.kept if rep else [], "dropped": rep.dropped if rep else [],
            "updated": rep.updated if rep else None,
            "aggregate_s": round(rep.aggregate_s, 4) if rep else 0.0,
            "train": rep.train_metrics if rep else {},
        }  # fmt: skip
        if per_task is not None:
            row["tasks"] = per_task
        self.rows.append(row)
        if self.on_round is not None and server_round > 0:
            self.on_round(row)
        return MetricRecord({"accuracy": acc, "loss": loss})


def make_strategy(cfg: FederatedConfig, tracker: Tracker | None = None) -> MergeStrategy:
    """The config's strategy: every client waited for, ``fraction`` of them trained per round
    (at least one), all of them asked to evaluate when ``evaluate_clients``."""
    train = max(1, round(cfg.fraction * cfg.clients))
    return MergeStrategy(
        Aggregator.from_config(cfg), mu=cfg.aggregator.mu, fraction_train=cfg.fraction,
        fraction_evaluate=1.0 if cfg.evaluate_clients else 0.0, min_train_nodes=train,
        min_evaluate_nodes=cfg.clients if cfg.evaluate_clients else 0,
        min_available_nodes=cfg.clients,
        on_round=tracker.report if tracker is not None else None,
    )  # fmt: skip


def serve(grid: Grid, cfg: FederatedConfig, tracker: Tracker) -> tuple[Result, MergeStrategy]:
    """Run the rounds on ``grid`` (see the module docstring). Client sampling is seeded."""
    random.seed(cfg.seed)  # FedAvg samples nodes with the random module
    strategy = make_strategy(cfg, tracker)
    task = ClientTask.from_config(cfg).to_json()
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(initial_model(cfg)), num_rounds=cfg.rounds,
        timeout=cfg.timeout, train_config=ConfigRecord({TASK_KEY: task}),
        evaluate_config=ConfigRecord({TASK_KEY: task}), evaluate_fn=tracker.evaluate,
    )  # fmt: skip
    return result, strategy


def make_server_app(cfg: FederatedConfig, tracker: Tracker, done: dict[str, Any]) -> ServerApp:
    """A ServerApp running :func:`serve`; ``done["result"]`` / ``done["strategy"]`` are set
    when it ends (the simulation runs it in a thread of this process)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        done["result"], done["strategy"] = serve(grid, cfg, tracker)

    return server_app
