"""The apps a real Flower deployment names: ``mergeforge.federated.app:server_app`` and
``mergeforge.federated.app:client_app`` (the README's 'Federated learning', "A real
deployment").

The ServerApp reads the run config of the Flower App's ``pyproject.toml``
(``[tool.flwr.app.config]``, overridable with ``flwr run -c``): ``config`` (the federated YAML,
a path, read by the SuperLink's ServerApp process) and ``out`` (the results folder, on the
SuperLink's machine; empty: nothing written). It runs the same :func:`~.server.serve` as a
simulation and writes the same outputs. The ClientApp is ``client.py``'s; each SuperNode is
started with ``--node-config 'partition-id=K num-partitions=N'`` and reads the bundled dataset
on its own machine. :func:`write_flower_app` writes such an App folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from mergeforge.federated.client import app as client_app
from mergeforge.federated.config import load_federated_config
from mergeforge.federated.server import Tracker, serve

log = logging.getLogger("mergeforge")

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from mergeforge.federated.run import finish

    t0 = time.perf_counter()
    cfg = load_federated_config(str(context.run_config["config"]))
    out = str(context.run_config.get("out", "") or "")

    def line(row):
        log.warning("round %d/%d: test accuracy %.2f%%, kept %s, dropped %s", row["round"],
                    cfg.rounds, 100 * row["accuracy"], row["kept"], row["dropped"])  # fmt: skip

    tracker = Tracker(cfg, on_round=line)
    result, _ = serve(grid, cfg, tracker)
    finish(cfg, tracker, result, Path(out) if out else None, t0)


PYPROJECT = """\
# A Flower App running mergeforge's federated strategy (the README's 'Federated learning').
# mergeforge and flwr are installed in the SuperLink's and SuperNodes' environments; the App
# adds no code.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "mergeforge federated: {label} on {dataset}"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "mergeforge"

[tool.flwr.app.components]
serverapp = "mergeforge.federated.app:server_app"
clientapp = "mergeforge.federated.app:client_app"

[tool.flwr.app.config]
config = "{config}"
out = "{out}"
"""


def write_flower_app(folder: str | Path, config: str | Path, *, out: str | Path = "") -> Path:
    """Write a Flower App folder (``pyproject.toml``) that runs ``config`` with ``flwr run``;
    ``config`` and ``out`` are stored as absolute paths (the ServerApp runs elsewhere)."""
    from mergeforge.checkpoint.atomic import write_text_atomic

    config = Path(config).resolve()
    cfg = load_federated_config(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = PYPROJECT.format(name="mergeforge-federated", label=cfg.aggregator.label,
                            dataset=cfg.dataset, config=config.as_posix(),
                            out=Path(out).resolve().as_posix() if out else "")  # fmt: skip
    write_text_atomic(folder / "pyproject.toml", text)
    return folder / "pyproject.toml"


__all__ = ["client_app", "server_app", "write_flower_app"]
