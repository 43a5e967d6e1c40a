"""The ``mergeforge federated`` config: data, clients, rounds, local training, the aggregator.

One YAML (every key optional but ``aggregator``; defaults in :class:`FederatedConfig`)::

    dataset: digits            # fashion_mnist | mnist | digits (evaluate/vision/data.py)
    n_train: 1200              # stratified subsample of the training set (default: all)
    n_test: 360                # held-out test set the global model is scored on
    arch: mlp                  # mlp | vgg | resnet | vit (evaluate/vision/models.py)
    clients: 10
    partition: {kind: dirichlet, alpha: 0.1}   # iid | dirichlet (alpha) | shards (shards)
    rounds: 20
    local_epochs: 1
    lr: 0.05
    optimizer: sgd             # sgd | adam
    batch_size: 32
    aggregator:                # fedavg | fedprox | median | trimmed_mean | neuron_fusion
      method: ties             #   | any merge method
      parameters: {lambda: 1.0}
      model_parameters: {density: 0.5}
    seed: 0

``dataset: text`` runs MiniLM clients, one per text task (``text.py``)::

    dataset: text
    tasks: [polarity, news_topic, tweet_sentiment]   # clients = one per task
    n_train: 256               # training texts per task (default 1000), n_test per task (200)
    rounds: 3
    lr: 1.0e-4                 # encoder (AdamW); head_lr: 3.0e-3; weight_decay: 0.01
    max_length: 64
    aggregator: task_arithmetic

``aggregator`` is a name (``fedavg``, ``fedprox``, ``median``, ``trimmed_mean``,
``neuron_fusion`` or a merge method, ``ties``) or a mapping: ``name`` (one of those five) or
``method`` (a merge method, ``mergeforge methods``) with its ``parameters`` /
``model_parameters``; ``neuron_fusion``'s ``parameters`` are the fusion's (``grouping``,
``fusion_examples``, ``class_fractions``, ``importance``, ...; ``neuron_fusion.py``); ``weighting``
(``examples``: each client's per-model ``weight`` is its share of the round's examples, as
FedAvg; ``uniform``: 1/K); ``mu`` (FedProx's proximal term on the clients, Li et al. 2020,
arXiv:1812.06127; any aggregator may use it, ``fedprox`` needs it > 0); ``beta`` (the
fraction trimmed from each end, ``trimmed_mean``). Everything is checked here, before any data
is read or Ray started; errors name the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from mergeforge.config import check_int, check_keys, check_number, read_yaml
from mergeforge.errors import ConfigError

log = logging.getLogger("mergeforge")

DOCS = "the README's 'Federated learning'"
ROBUST = ("median", "trimmed_mean")
FUSION = "neuron_fusion"
NAMED = ("fedavg", "fedprox", *ROBUST, FUSION)
PARTITIONS = ("iid", "dirichlet", "shards")
TEXT = "text"
"""``dataset: text``: MiniLM clients, one per text task (``text.py``)."""
DATASETS = ("fashion_mnist", "mnist", "digits", TEXT)
STATS_METHODS = {"regmean": "regmean"}
"""Merge methods that read per-model statistics, and the statistics kind the clients send."""

TOP_KEYS = {
    "dataset", "n_train", "n_test", "arch", "clients", "partition", "rounds", "local_epochs",
    "lr", "optimizer", "momentum", "weight_decay", "batch_size", "aggregator", "fraction",
    "evaluate_clients", "seed", "out", "timeout", "cpus_per_client", "num_cpus", "stats_examples",
    "tasks", "head_lr", "max_length",
}  # fmt: skip
TEXT_ONLY = ("tasks", "head_lr", "max_length")
VISION_ONLY = ("arch", "partition")
TEXT_DEFAULTS = {"lr": 1e-4, "optimizer": "adam", "weight_decay": 0.01}
"""A text run's defaults where they differ from a vision run's (the text suite's recipe; the
optimizer is AdamW there)."""
AGG_KEYS = {"name", "method", "parameters", "model_parameters", "weighting", "mu", "beta"}
PART_KEYS = {"kind", "alpha", "shards", "min_size"}


@dataclass(frozen=True)
class PartitionSpec:
    """How the training set is cut among the clients (``partition.py``)."""

    kind: str = "iid"
    alpha: float = 0.5
    """Dirichlet concentration (Hsu et al. 2019, arXiv:1909.06335): small = skewed labels."""
    shards: int = 2
    """Label-sorted shards per client (McMahan et al. 2017, arXiv:1602.05629: 2 per client)."""
    min_size: int = 10
    """Dirichlet: redraw until every client holds at least this many examples."""


@dataclass(frozen=True)
class AggregatorSpec:
    """What the server does with the clients' models each round (``aggregate.py``)."""

    name: str = "fedavg"
    """``fedavg``, ``fedprox``, ``median``, ``trimmed_mean``, ``neuron_fusion`` or ``merge``."""
    method: str | None = "linear"
    """The merge method (``fedavg`` / ``fedprox``: ``linear`` weighted by examples; None for
    ``median``, ``trimmed_mean`` and ``neuron_fusion``)."""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    """The merge method's shared parameters; for ``neuron_fusion``, the fusion's."""
    model_parameters: Mapping[str, Any] = field(default_factory=dict)
    weighting: str = "examples"
    mu: float = 0.0
    beta: float = 0.2

    @property
    def label(self) -> str:
        """A short name for tables and plots: ``fedavg``, ``ties``, ``trimmed_mean(0.2)``."""
        if self.name == "merge":
            return str(self.method)
        if self.name == "trimmed_mean":
            return f"trimmed_mean({self.beta:g})"
        if self.fusion is not None:
            return self.fusion.label
        return self.name if self.name != "fedprox" else f"fedprox(mu={self.mu:g})"

    @property
    def stats(self) -> str | None:
        """The statistics kind the clients compute and send (``regmean``: input Grams;
        ``class_counts``: neuron_fusion with ``class_fractions: reported``)."""
        if self.fusion is not None:
            return self.fusion.stats
        return STATS_METHODS.get(self.method or "") if self.name == "merge" else None

    @cached_property
    def fusion(self):
        """``neuron_fusion``'s checked parameters (:class:`~.neuron_fusion.FusionSettings`);
        None for any other aggregator."""
        if self.name != FUSION:
            return None
        from mergeforge.federated.neuron_fusion import parse_fusion_parameters

        return parse_fusion_parameters(self.parameters)


@dataclass(frozen=True)
class FederatedConfig:
    aggregator: AggregatorSpec = AggregatorSpec()
    dataset: str = "digits"
    n_train: int | None = None
    n_test: int | None = None
    arch: str = "mlp"
    clients: int = 3
    partition: PartitionSpec = PartitionSpec()
    rounds: int = 3
    local_epochs: int = 1
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    fraction: float = 1.0
    """Clients sampled for training each round (at least 2, or all when fewer)."""
    evaluate_clients: bool = True
    """Also ask the clients to score the global model on their own data each round."""
    seed: int = 0
    out: str | None = None
    timeout: float = 3600.0
    """Seconds the server waits for a round's replies; a client that has not answered by then
    is left out of that round (logged)."""
    cpus_per_client: int = 1
    num_cpus: int | None = None
    """CPUs Ray may use (default: every core of the machine)."""
    stats_examples: int = 256
    """Examples each client runs its statistics on (methods that read statistics)."""
    tasks: tuple[str, ...] = ()
    """``dataset: text``: the clients' tasks, one client each (``text.py``)."""
    head_lr: float = 3e-3
    """``dataset: text``: the heads' learning rate (the encoder's is ``lr``)."""
    max_length: int = 64
    """``dataset: text``: tokens per text."""
    text: str = ""

    @property
    def is_text(self) -> bool:
        return self.dataset == TEXT

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("text")
        return d


def _choice(value: Any, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}."
                          + (f" Did you mean {hint[0]!r}?" if hint else ""))  # fmt: skip
    return value


def parse_partition(raw: Any) -> PartitionSpec:
    if raw is None:
        return PartitionSpec()
    if isinstance(raw, str):
        raw = {"kind": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"partition: expected iid, dirichlet, shards or a mapping "
                          f"{{kind: dirichlet, alpha: 0.1}}, got {raw!r}")  # fmt: skip
    check_keys(raw, PART_KEYS, "partition", see=DOCS)
    spec = PartitionSpec(kind=_choice(raw.get("kind", "iid"), PARTITIONS, "partition.kind"))
    return dataclasses.replace(
        spec,
        alpha=check_number(raw.get("alpha", spec.alpha), "partition.alpha", low=0, low_open=True),
        shards=check_int(raw.get("shards", spec.shards), "partition.shards", 1),
        min_size=check_int(raw.get("min_size", spec.min_size), "partition.min_size", 1),
    )


def parse_aggregator(raw: Any) -> AggregatorSpec:
    """``aggregator:`` as an :class:`AggregatorSpec`; the merge method and its parameter
    names are checked against the registry (``check_merge_method``)."""
    if raw is None:
        raise ConfigError(f"config: missing 'aggregator:' (fedavg, fedprox, median, "
                          f"trimmed_mean, neuron_fusion, or a merge method such as ties; see "
                          f"{DOCS})")  # fmt: skip
    if isinstance(raw, str):
        raw = {"name": raw} if raw in NAMED else {"method": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"aggregator: expected a name or a mapping, got {raw!r}")
    check_keys(raw, AGG_KEYS, "aggregator", see=DOCS)
    if ("name" in raw) == ("method" in raw):
        raise ConfigError(
            "aggregator: give exactly one of 'name:' (fedavg, fedprox, median, trimmed_mean, "
            "neuron_fusion) or 'method:' (a merge method, `mergeforge methods`)"
        )
    for key in ("parameters", "model_parameters"):
        if raw.get(key) is not None and not isinstance(raw[key], Mapping):
            raise ConfigError(f"aggregator.{key}: expected a mapping of parameter: value")
    if "name" in raw:
        name = _choice(raw["name"], NAMED, "aggregator.name")
        method = "linear" if name in ("fedavg", "fedprox") else None
        if name == FUSION and raw.get("model_parameters"):
            raise ConfigError(
                "aggregator.model_parameters: neuron_fusion takes no per-client parameters "
                "(its fusion parameters go under 'parameters:')"
            )
        if name in ROBUST and (raw.get("parameters") or raw.get("model_parameters")):
            raise ConfigError(f"aggregator: {name} takes no merge parameters (only 'beta' "
                              "for trimmed_mean); remove 'parameters:'")  # fmt: skip
    else:
        name, method = "merge", str(raw["method"])
        if method in NAMED:
            raise ConfigError(f"aggregator.method: {method!r} is an aggregator name, not a "
                              f"merge method: write 'name: {method}'")  # fmt: skip
    spec = AggregatorSpec(
        name=name, method=method, parameters=dict(raw.get("parameters") or {}),
        model_parameters=dict(raw.get("model_parameters") or {}),
        weighting=_choice(raw.get("weighting", "examples"), ("examples", "uniform"),
                          "aggregator.weighting"),
        mu=check_number(raw.get("mu", 0.01 if name == "fedprox" else 0.0), "aggregator.mu", low=0),
        beta=check_number(raw.get("beta", 0.2), "aggregator.beta", low=0, high=0.4999),
    )  # fmt: skip
    if name == "fedprox" and spec.mu == 0:
        raise ConfigError("aggregator.mu: fedprox with mu 0 is fedavg; give mu > 0 (e.g. 0.01)")
    if "beta" in raw and name != "trimmed_mean":
        raise ConfigError(f"aggregator.beta: only trimmed_mean reads it, not {spec.label}")
    _ = spec.fusion  # neuron_fusion: its parameters checked now (ConfigError naming one)
    if spec.method is not None:
        for warning in check_merge_method(spec):  # a parameter another method reads: ignored
            log.warning("aggregator: %s", warning)
    return spec


def check_merge_method(spec: AggregatorSpec) -> list[str]:
    """The method exists, reads no statistics the clients cannot send, and its parameter
    names are its own (``mergeforge.config.load_config`` on a two-client document). The
    per-model ``weight`` is set from the clients' examples: giving it is an error. Returns
    the config's warnings (parameter names some other method uses: ignored)."""
    from mergeforge.config import load_config
    from mergeforge.methods import get_method

    method = get_method(spec.method)  # unknown: ConfigError listing the known ones
    if method.sidecar_inputs is not None and method.name not in STATS_METHODS:
        raise ConfigError(
            f"aggregator.method: {method.name!r} reads per-model statistics files that the "
            f"clients do not send; use regmean (the clients send their input Grams) or a "
            "data-free method (task_arithmetic, ties, dare_ties, swudi, ...)"
        )
    if "weight" in spec.model_parameters:
        raise ConfigError("aggregator.model_parameters.weight: each client's weight is its "
                          "share of the round's examples (or 1/K with weighting: uniform); "
                          "remove it")  # fmt: skip
    from mergeforge.federated.aggregate import merge_document

    doc = merge_document(spec, ["client0", "client1"], [0.5, 0.5])
    return list(load_config(doc).warnings)


def load_federated_config(
    source: str | Path | Mapping[str, Any] | FederatedConfig,
) -> FederatedConfig:
    """The one constructor of a :class:`FederatedConfig` (a YAML path or string, a mapping, or
    a config returned as it is). Raises :class:`ConfigError` naming the key and the fix."""
    from mergeforge.evaluate.vision.models import ARCHS

    if isinstance(source, FederatedConfig):
        return source
    raw, text, _, where = read_yaml(source, f"'aggregator:' (see {DOCS})")
    check_keys(raw, TOP_KEYS, where, see=DOCS)
    d = FederatedConfig()
    dataset = _choice(raw.get("dataset", d.dataset), DATASETS, "dataset")
    text_run = dataset == TEXT
    for key in TEXT_ONLY if not text_run else VISION_ONLY:
        if key in raw:
            raise ConfigError(
                f"{key}: only a {'text' if key in TEXT_ONLY else 'vision'} run reads it "
                + ("(dataset: text)" if key in TEXT_ONLY else
                   "(a text run trains the bundled MiniLM, one client per task)")
            )  # fmt: skip
    tasks: tuple[str, ...] = ()
    if text_run:
        tasks = parse_tasks(raw.get("tasks"))
        raw = {**{k: v for k, v in TEXT_DEFAULTS.items() if k not in raw}, **raw}
        if raw.get("clients", len(tasks)) != len(tasks):
            raise ConfigError(f"clients: a text run has one client per task ({len(tasks)}: "
                              f"{', '.join(tasks)}); remove clients or change tasks")  # fmt: skip
        raw["clients"] = len(tasks)
    opt_int = {
        k: None if raw.get(k) is None else check_int(raw[k], k, 1) for k in ("n_train", "n_test")
    }
    cfg = FederatedConfig(
        aggregator=parse_aggregator(raw.get("aggregator")),
        dataset=dataset,
        tasks=tasks,
        head_lr=check_number(raw.get("head_lr", d.head_lr), "head_lr", low=0, low_open=True),
        max_length=check_int(raw.get("max_length", d.max_length), "max_length", 2),
        arch=_choice(raw.get("arch", d.arch), tuple(sorted(ARCHS)), "arch"),
        clients=check_int(raw.get("clients", d.clients), "clients", 1),
        partition=parse_partition(raw.get("partition")),
        rounds=check_int(raw.get("rounds", d.rounds), "rounds", 1),
        local_epochs=check_int(raw.get("local_epochs", d.local_epochs), "local_epochs", 1),
        lr=check_number(raw.get("lr", d.lr), "lr", low=0, low_open=True),
        optimizer=_choice(raw.get("optimizer", d.optimizer), ("sgd", "adam"), "optimizer"),
        momentum=check_number(raw.get("momentum", d.momentum), "momentum", low=0, high=1),
        weight_decay=check_number(raw.get("weight_decay", d.weight_decay), "weight_decay", low=0),
        batch_size=check_int(raw.get("batch_size", d.batch_size), "batch_size", 1),
        fraction=check_number(
            raw.get("fraction", d.fraction), "fraction", low=0, high=1, low_open=True
        ),  # fmt: skip
        evaluate_clients=bool(raw.get("evaluate_clients", d.evaluate_clients)),
        seed=check_int(raw.get("seed", d.seed), "seed", 0),
        out=None if raw.get("out") is None else str(raw["out"]),
        timeout=check_number(raw.get("timeout", d.timeout), "timeout", low=0, low_open=True),
        cpus_per_client=check_int(
            raw.get("cpus_per_client", d.cpus_per_client), "cpus_per_client", 1
        ),
        num_cpus=None if raw.get("num_cpus") is None else check_int(raw["num_cpus"], "num_cpus", 1),
        stats_examples=check_int(raw.get("stats_examples", d.stats_examples), "stats_examples", 1),
        text=text,
        **opt_int,
    )
    check_against_clients(cfg)
    return cfg


def parse_tasks(raw: Any) -> tuple[str, ...]:
    """``tasks:`` of a text run: text-suite task names, each once (default
    :data:`~mergeforge.federated.text.DEFAULT_TASKS`)."""
    from mergeforge.evaluate.text.tasks import TEXT_TASKS
    from mergeforge.federated.text import DEFAULT_TASKS

    if raw is None:
        return DEFAULT_TASKS
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list | tuple) or not raw:
        raise ConfigError(f"tasks: expected a list of text tasks, got {raw!r}")
    names = tuple(_choice(t, tuple(TEXT_TASKS), "tasks") for t in raw)
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks: each task once (one client per task), got {list(names)}")
    return names


def with_overrides(cfg: FederatedConfig, **changes: int) -> FederatedConfig:
    """``cfg`` with ``rounds`` / ``clients`` / ``seed`` replaced (command-line flags), checked."""
    low = {"rounds": 1, "clients": 1, "seed": 0}
    for key, value in changes.items():
        if key not in low:
            raise ConfigError(f"--{key}: not a setting the command line may change")
        check_int(value, f"--{key}", low[key])
    cfg = dataclasses.replace(cfg, **changes)
    check_against_clients(cfg)
    return cfg


def check_against_clients(cfg: FederatedConfig) -> None:
    """What depends on the number of clients: shards and the method's model count."""
    from mergeforge.methods import get_method

    if cfg.is_text:
        if cfg.clients != len(cfg.tasks):
            raise ConfigError(f"--clients: a text run has one client per task "
                              f"({len(cfg.tasks)}: {', '.join(cfg.tasks)})")  # fmt: skip
        if cfg.aggregator.fusion is not None:
            raise ConfigError(
                "aggregator: neuron_fusion fuses the vision models on a server fusion set; a "
                "text run cannot use it yet: use a merge method (fedavg, task_arithmetic, "
                "ties, dare_ties, swudi, ...)"
            )
        if cfg.aggregator.stats not in (None, "regmean"):
            raise ConfigError(
                f"aggregator: {cfg.aggregator.label} needs client statistics "
                f"({cfg.aggregator.stats}) that text clients do not send; use regmean (the "
                "clients send their encoder's input Grams) or a data-free method (fedavg, "
                "task_arithmetic, ties, dare_ties, swudi, ...)"
            )
    if cfg.partition.kind != "iid" and cfg.clients < 2:
        raise ConfigError(f"partition: {cfg.partition.kind} needs clients >= 2; use iid for one")
    fusion = cfg.aggregator.fusion
    if fusion is not None and fusion.grouping == "hf":
        trained = max(1, round(cfg.fraction * cfg.clients))
        if trained != 2:
            raise ConfigError(
                f"aggregator.parameters.grouping: hf pairs the neurons of exactly 2 clients, and "
                f"a round here trains {trained} (clients {cfg.clients}, fraction "
                f"{cfg.fraction:g}); use grouping: kf (any number of clients)"
            )
    if cfg.aggregator.method is not None:
        m = get_method(cfg.aggregator.method)
        if m.max_models is not None and cfg.clients > m.max_models:
            raise ConfigError(
                f"aggregator.method: {m.name} merges at most {m.max_models} model(s) with the "
                f"base, and a round may bring {cfg.clients} clients; use linear, "
                "task_arithmetic or ties for several clients"
            )
