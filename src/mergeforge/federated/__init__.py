"""Federated learning on Flower with merge aggregators: ``mergeforge federated CONFIG``.

FedAvg is a model soup taken every round (McMahan et al. 2017, arXiv:1602.05629) and task
arithmetic a one-shot FedAvg; here every registered merge method is a Flower aggregator. The
round's global model is the base, each client's model an expert, per-client example counts the
per-model weights, and the merge runs through the engine of ``mergeforge merge`` in memory.
See the README's 'Federated learning' (simulation, and the same strategy in a SuperLink +
SuperNodes deployment) and ALGORITHMS.md §6.3 (the Flower facts).

``config.py`` (the YAML) -> ``partition.py`` (IID / Dirichlet / shards, seeded) ->
``client.py`` (the ClientApp: local SGD / Adam, FedProx μ, local evaluation) ->
``replies.py`` (each reply checked alone) -> ``aggregate.py`` (a round's merge; ``robust.py``:
coordinate median, trimmed mean) -> ``strategy.py`` (the Flower Strategy) -> ``server.py``
(the ServerApp, test accuracy per round) -> ``run.py`` (the simulation on Ray, or in process
with ``local.py``) -> ``report.py`` (results.json, accuracy.png, the model); ``app.py``: the
apps a real deployment names. ``neuron_fusion.py``: the fusion aggregator; ``text.py``:
``dataset: text`` (one MiniLM client per text task).
"""

import os

# Flower reads these when it is imported: no telemetry calls out (a user's explicit 1 is kept)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from mergeforge.federated.aggregate import Aggregator, ClientUpdate, merge_document  # noqa: E402
from mergeforge.federated.config import (  # noqa: E402
    AggregatorSpec,
    FederatedConfig,
    PartitionSpec,
    load_federated_config,
)
from mergeforge.federated.partition import partition  # noqa: E402
from mergeforge.federated.robust import coordinate_median, trimmed_mean  # noqa: E402

__all__ = [
    "Aggregator",
    "AggregatorSpec",
    "ClientUpdate",
    "FederatedConfig",
    "FederatedResult",
    "MergeStrategy",
    "PartitionSpec",
    "coordinate_median",
    "load_federated_config",
    "make_client_app",
    "merge_document",
    "partition",
    "run_federated",
    "trimmed_mean",
]


def require_flower() -> None:
    """Flower is an optional dependency: say how to install it instead of an ImportError."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        from mergeforge.errors import MergeforgeError

        raise MergeforgeError(
            "mergeforge federated needs Flower: pip install 'mergeforge[federated]' "
            "(flwr==1.42.0; the simulation also needs ray)"
        ) from None


def __getattr__(name: str):
    """Flower is imported only by what needs it (the strategy, the apps, the runner)."""
    if name in ("MergeStrategy", "run_federated", "FederatedResult", "make_client_app"):
        require_flower()
    if name == "MergeStrategy":
        from mergeforge.federated.strategy import MergeStrategy

        return MergeStrategy
    if name in ("run_federated", "FederatedResult"):
        from mergeforge.federated import run

        return getattr(run, name)
    if name == "make_client_app":
        from mergeforge.federated.client import make_client_app

        return make_client_app
    raise AttributeError(f"module 'mergeforge.federated' has no attribute {name!r}")
