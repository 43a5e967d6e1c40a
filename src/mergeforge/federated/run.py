"""``mergeforge federated CONFIG``: a Flower simulation on one machine, with a merge aggregator.

:func:`run_federated` checks the config and the aggregator (a dry merge of the initial model
with itself) before anything starts, then runs the ServerApp of ``server.py`` and the ClientApp
of ``client.py`` through ``flwr.simulation.run_simulation`` on its only backend, Ray (one
virtual SuperNode per client, ``cpus_per_client`` CPUs each, dashboard off, no downloads:
clients read the bundled datasets; ALGORITHMS.md §6.3). ``in_process=True`` runs the same apps
without Ray (``local.py``). A progress bar follows the rounds; the test accuracy per round,
``results.json``, ``accuracy.png`` and the final model are written to ``out``.

Ray is started here, as ``mergeforge evolve`` starts it (``address="local"``: never a stale
cluster's address file; this process's SIGINT / SIGTERM handlers restored after ``ray.init``),
with the driver's ``sys.path`` given to the workers (what Flower's Ray backend does); Flower
shuts it down when the simulation ends.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeforge._signals import own_handlers
from mergeforge.errors import ConfigError, MergeforgeError
from mergeforge.federated.aggregate import Aggregator, ClientUpdate
from mergeforge.federated.config import FederatedConfig, load_federated_config
from mergeforge.federated.report import plot_accuracy, summary, write_model, write_results
from mergeforge.federated.server import Tracker, initial_model, make_server_app, serve

log = logging.getLogger("mergeforge")


@dataclass(frozen=True)
class FederatedResult:
    out: Path | None
    aggregator: str
    rows: list[dict[str, Any]]
    """One per round (0 = the initial model): accuracy, loss, seconds, kept, dropped ..."""
    initial_accuracy: float | None
    final_accuracy: float | None
    best_accuracy: float | None
    best_round: int | None
    dropped: int
    seconds: float
    state_dict: dict[str, torch.Tensor]
    """The final global model."""


def check_aggregator(cfg: FederatedConfig) -> None:
    """A dry merge of two copies of the initial model: parameter values a method refuses
    only when it sees tensors are found before Ray starts (ConfigError naming them).
    neuron_fusion fuses them on the server's fusion set (loaded now, as a round would)."""
    from mergeforge.federated.neuron_fusion import CLASS_COUNTS

    stats = None
    if cfg.aggregator.stats == CLASS_COUNTS:  # what a client with every class would send
        from mergeforge.evaluate.vision.data import NUM_CLASSES

        stats = {CLASS_COUNTS: torch.ones(NUM_CLASSES)}
    elif cfg.aggregator.stats is not None:
        return  # needs the clients' statistics; the names were checked with the config
    agg = Aggregator.from_config(cfg)
    n = min(cfg.clients, 2)
    if n < agg.min_models:
        raise ConfigError(f"aggregator: {cfg.aggregator.label} merges at least "
                          f"{agg.min_models} clients a round; raise clients")  # fmt: skip
    sd = initial_model(cfg)
    try:
        agg(sd, [ClientUpdate(f"client{i}", i, sd, 1.0, stats=stats) for i in range(n)], 0)
    except MergeforgeError as e:
        raise ConfigError(
            f"aggregator: {cfg.aggregator.label} cannot merge this model: {e}"
        ) from None


def start_ray(cfg: FederatedConfig, num_cpus: int | None) -> None:
    try:
        import ray
    except ImportError:
        raise MergeforgeError(
            "Flower's simulation runs on Ray: pip install 'mergeforge[federated]'"
            ", or run the clients in this process (--in-process)"
        ) from None

    if ray.is_initialized():
        return
    path = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    with own_handlers():
        ray.init(address="local", num_cpus=num_cpus or cfg.num_cpus or os.cpu_count() or 1,
                 include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})  # fmt: skip


@contextmanager
def _quiet_flower(verbose: bool):
    """Flower logs every round at INFO on its own handler; keep its warnings and errors."""
    logger = logging.getLogger("flwr")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _progress(cfg: FederatedConfig, enabled: bool | None, console):
    """``(on_round, close)``: a rich bar on a terminal, one log line a round otherwise."""
    if enabled is False:
        return None, lambda: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    if enabled is None and not console.is_terminal:

        def line(row):  # fmt: skip
            log.info("round %d/%d: test accuracy %.2f%%, %d client(s) kept, %d dropped (%.1f s)",
                     row["round"], cfg.rounds, 100 * row["accuracy"], len(row["kept"]),
                     len(row["dropped"]), row["seconds"])  # fmt: skip

        return line, lambda: None
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console)  # fmt: skip
    task = bar.add_task(f"federated {cfg.aggregator.label}", total=cfg.rounds)
    bar.start()

    def advance(row):
        bar.update(task, completed=row["round"],
                   description=f"federated {cfg.aggregator.label}: accuracy "
                               f"{100 * row['accuracy']:.1f}%")  # fmt: skip

    return advance, bar.stop


def run_federated(
    config: str | Path | dict | FederatedConfig,
    *,
    out: str | Path | None = None,
    progress: bool | None = None,
    console=None,
    client_app=None,
    in_process: bool = False,
    num_cpus: int | None = None,
    verbose: bool = False,
) -> FederatedResult:
    """Run the federated simulation the config describes (see the module docstring).

    ``out``: the results folder (default: the config's ``out``; none: nothing written).
    ``client_app``: another ClientApp (e.g. ``client.make_client_app(transform)`` for
    hostile clients); ``in_process``: no Ray, clients in turn in this process; ``num_cpus``:
    Ray's CPUs (default: the config's, else every core); ``verbose``: Flower's own log lines.
    """
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's database layer, at import
    from flwr.simulation import run_simulation

    from mergeforge.federated.client import app as default_client_app
    from mergeforge.federated.local import LocalGrid

    t0 = time.perf_counter()
    cfg = load_federated_config(config)
    out = Path(out) if out is not None else (Path(cfg.out) if cfg.out else None)
    check_aggregator(cfg)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    on_round, close = _progress(cfg, progress, console)
    tracker = Tracker(cfg, on_round=on_round)
    done: dict[str, Any] = {}
    client_app = client_app or default_client_app
    try:
        with _quiet_flower(verbose):
            if in_process:
                done["result"], done["strategy"] = serve(LocalGrid(client_app, cfg.clients), cfg,
                                                         tracker)  # fmt: skip
            else:
                start_ray(cfg, num_cpus)
                resources = {"num_cpus": cfg.cpus_per_client, "num_gpus": 0.0}
                run_simulation(make_server_app(cfg, tracker, done), client_app,
                               num_supernodes=cfg.clients,
                               backend_config={"client_resources": resources},
                               verbose_logging=verbose)  # fmt: skip
    finally:
        close()
    if "result" not in done:
        raise MergeforgeError("the federated run ended without a result (see the log above)")
    return finish(cfg, tracker, done["result"], out, t0)


def finish(cfg: FederatedConfig, tracker: Tracker, result, out: Path | None,
           t0: float) -> FederatedResult:  # fmt: skip
    """The :class:`FederatedResult` of a finished ``Strategy.start``, its outputs written to
    ``out`` (when given)."""
    final = dict(result.arrays.to_torch_state_dict()) or initial_model(cfg)
    res = FederatedResult(out=out, aggregator=cfg.aggregator.label, rows=tracker.rows,
                          seconds=time.perf_counter() - t0, state_dict=final,
                          **summary(tracker.rows))  # fmt: skip
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_outputs(out, cfg, res)
    return res


def write_outputs(out: Path, cfg: FederatedConfig, result: FederatedResult) -> None:
    import flwr

    versions = {"flwr": flwr.__version__, "torch": torch.__version__}
    try:
        import ray

        versions["ray"] = ray.__version__
    except ImportError:
        pass
    doc = {"config": cfg.to_dict(), "aggregator": result.aggregator, "versions": versions,
           "seconds": round(result.seconds, 2), **summary(result.rows),
           "rounds": result.rows}  # fmt: skip
    write_results(out / "results.json", doc)
    plot_accuracy(out / "accuracy.png", {result.aggregator: result.rows},
                  title=f"text: {', '.join(cfg.tasks)}, one client each"
                  if cfg.is_text
                  else f"{cfg.dataset}, {cfg.clients} clients, {cfg.partition.kind}")  # fmt: skip
    write_model(out / "model.safetensors", result.state_dict,
                {"aggregator": result.aggregator, "rounds": str(cfg.rounds)})  # fmt: skip
