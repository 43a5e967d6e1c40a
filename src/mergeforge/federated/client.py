"""The ClientApp: local training on the client's partition, and local evaluation.

The same ``app`` serves a simulation (one Ray actor per virtual SuperNode) and a real
deployment (``flower-supernode --node-config 'partition-id=K num-partitions=N'``): it holds no
configuration of its own. Each train message carries the task (:class:`ClientTask`, JSON in
the ConfigRecord under :data:`TASK_KEY`: dataset, partition, local training settings); the
client loads the bundled dataset (cached per process), recomputes its own part
(``partition.py``, seeded), trains the global model for ``local_epochs`` and replies with its
model, its example count and train loss (and, for RegMean, its input Grams; for
``neuron_fusion`` with ``class_fractions: reported``, its per-class example counts).

Local training is minibatch SGD (or Adam) on cross-entropy, batches drawn from a generator
seeded by (seed, round, partition), so a round is reproducible. FedProx (Li et al. 2020,
arXiv:1812.06127, eq. 2) adds μ/2 ‖w − w_t‖² to the loss, w_t the round's global model (the
paper's squared norm; Flower's example code uses the unsquared norm).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor, nn

from mergeforge.evaluate.vision.data import NUM_CLASSES, ImageSplit, load_dataset
from mergeforge.evaluate.vision.models import build_model
from mergeforge.federated import text
from mergeforge.federated.config import TEXT, FederatedConfig, PartitionSpec
from mergeforge.federated.neuron_fusion import CLASS_COUNTS
from mergeforge.federated.partition import partition
from mergeforge.federated.replies import CLIENT_RECORD, STATS_PREFIX, WEIGHT_KEY

TASK_KEY = "mergeforge-task"

Transform = Callable[[int, int, dict[str, Tensor], dict[str, Tensor]], dict[str, Tensor]]
"""``(partition id, round, trained state dict, global state dict) -> state dict to send``: a
hook for hostile or faulty clients in tests and benchmarks (scale the update, send NaN)."""


@dataclass(frozen=True)
class ClientTask:
    """What a client needs to know to train (sent by the server each round)."""

    dataset: str
    n_train: int | None
    n_test: int | None
    arch: str
    clients: int
    partition: dict
    seed: int
    local_epochs: int
    lr: float
    batch_size: int
    optimizer: str
    momentum: float
    weight_decay: float
    stats: str | None
    stats_examples: int
    tasks: tuple[str, ...] = ()
    head_lr: float = 3e-3
    max_length: int = 64

    @classmethod
    def from_config(cls, cfg: FederatedConfig) -> ClientTask:
        return cls(cfg.dataset, cfg.n_train, cfg.n_test, cfg.arch, cfg.clients,
                   asdict(cfg.partition), cfg.seed, cfg.local_epochs, cfg.lr, cfg.batch_size,
                   cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.aggregator.stats,
                   cfg.stats_examples, tuple(cfg.tasks), cfg.head_lr, cfg.max_length)  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClientTask:
        d = json.loads(text)
        return cls(**{**d, "tasks": tuple(d.get("tasks", ()))})

    @property
    def is_text(self) -> bool:
        return self.dataset == TEXT


def make_model(task: ClientTask | FederatedConfig) -> nn.Module:
    """A fresh model of the run (its weights to be loaded): the ``arch`` of a vision run, or
    the text run's MiniLM with its tasks' heads. Clients and server build it here alike."""
    return text.model_for(task) if task.is_text else build_model(task.arch)


@lru_cache(maxsize=2)
def load_data(dataset: str, n_train: int | None, n_test: int | None, seed: int) -> ImageSplit:
    """The bundled dataset, once per process (an actor serves many rounds)."""
    return load_dataset(dataset, n_train=n_train, n_test=n_test, seed=seed)


@lru_cache(maxsize=4)
def _parts(task_json: str) -> tuple[np.ndarray, ...]:
    task = ClientTask.from_json(task_json)
    data = load_data(task.dataset, task.n_train, task.n_test, task.seed)
    spec = PartitionSpec(**task.partition)
    return tuple(partition(data.train_y.numpy(), task.clients, spec, seed=task.seed))


def client_data(task: ClientTask, partition_id: int) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of one client's partition."""
    if not 0 <= partition_id < task.clients:
        raise ValueError(f"partition-id {partition_id} is outside 0..{task.clients - 1}: start "
                         f"the SuperNodes with --node-config 'partition-id=K "
                         f"num-partitions={task.clients}'")  # fmt: skip
    data = load_data(task.dataset, task.n_train, task.n_test, task.seed)
    idx = torch.as_tensor(_parts(task.to_json())[partition_id])
    return data.train_x[idx], data.train_y[idx]


def local_train(model: nn.Module, x: Tensor, y: Tensor, task: ClientTask, *, mu: float,
                seed: int) -> float:  # fmt: skip
    """Train ``model`` in place for ``task.local_epochs``; returns the mean loss of the steps
    (cross-entropy, without the proximal term)."""
    params = list(model.parameters())
    if task.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=task.lr,
                                                      weight_decay=task.weight_decay)  # fmt: skip
    else:
        opt = torch.optim.SGD(params, lr=task.lr, momentum=task.momentum,
                              weight_decay=task.weight_decay)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    model.train()
    batches = (idx for _ in range(task.local_epochs)
               for idx in torch.randperm(len(x), generator=gen).split(task.batch_size))  # fmt: skip
    losses = run_steps(opt, batches, lambda idx: F.cross_entropy(model(x[idx]), y[idx]), params,
                       mu=mu)  # fmt: skip
    return float(np.mean(losses)) if losses else 0.0


def run_steps(opt: torch.optim.Optimizer, batches, cross_entropy, params: list[Tensor], *,
              mu: float) -> list[float]:  # fmt: skip
    """One step of ``opt`` per batch on ``cross_entropy(batch)``, plus FedProx's μ/2 ‖w − w_t‖²
    (w_t: ``params`` as they are when called, the round's global model) when ``mu`` > 0.
    Returns each step's cross-entropy. Shared by the vision and the text clients."""
    anchor = [p.detach().clone() for p in params] if mu > 0 else []
    losses = []
    for batch in batches:
        ce = cross_entropy(batch)
        loss = ce
        if mu > 0:
            prox = sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))
            loss = ce + mu / 2 * prox
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(ce.item())
    return losses


@torch.no_grad()
def score(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` in eval mode, in batches of 1000."""
    model.eval()
    logits = torch.cat([model(c) for c in x.split(1000)])
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def _grams(model: nn.Module, x: Tensor, n: int) -> dict[str, Tensor]:
    from mergeforge.stats.grams import GramRecorder

    model.eval()
    with torch.no_grad(), GramRecorder(model) as rec:
        model(x[:n])
    return rec.grams()


def _setup(msg: Message, context: Context) -> tuple[ClientTask, int, nn.Module, dict]:
    config = msg.content["config"]
    if TASK_KEY not in config:
        raise ValueError(f"the train/evaluate config has no {TASK_KEY!r}: this ClientApp serves "
                         "mergeforge's federated ServerApp (mergeforge.federated)")  # fmt: skip
    task = ClientTask.from_json(str(config[TASK_KEY]))
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no partition-id: start it with --node-config "
                         f"'partition-id=K num-partitions={task.clients}'")  # fmt: skip
    pid = int(context.node_config["partition-id"])
    global_sd = dict(msg.content["arrays"].to_torch_state_dict())
    model = make_model(task)
    model.load_state_dict(global_sd)
    return task, pid, model, global_sd


def train_reply(msg: Message, context: Context, transform: Transform | None = None) -> Message:
    """The train handler: local training, then the reply (see the module docstring)."""
    task, pid, model, global_sd = _setup(msg, context)
    config = msg.content["config"]
    rnd = int(config.get("server-round", 0))
    mu = float(config.get("proximal-mu", 0.0))
    seed = task.seed * 1_000_003 + rnd * 1009 + pid
    if task.is_text:
        data = text.client_task(task, pid)
        loss, n = text.local_train(model, data, task, mu=mu, seed=seed), len(data.train)
    else:
        x, y = client_data(task, pid)
        loss, n = local_train(model, x, y, task, mu=mu, seed=seed), len(x)
    sd = {k: t.detach().clone() for k, t in model.state_dict().items()}
    if transform is not None:
        sd = transform(pid, rnd, sd, global_sd)
    content = RecordDict({
        "arrays": ArrayRecord(sd),
        "metrics": MetricRecord({WEIGHT_KEY: n, "train-loss": loss}),
        CLIENT_RECORD: ConfigRecord({"partition-id": pid}),
    })  # fmt: skip
    if task.stats == "regmean":
        grams = (text.grams(model, data, task) if task.is_text
                 else _grams(model, x, task.stats_examples))  # fmt: skip
        content[STATS_PREFIX + "regmean"] = ArrayRecord(grams)
    elif task.stats == CLASS_COUNTS:  # neuron_fusion's non-IID head (class_fractions: reported)
        counts = torch.bincount(y, minlength=NUM_CLASSES)
        content[STATS_PREFIX + CLASS_COUNTS] = ArrayRecord({CLASS_COUNTS: counts})
    return Message(content=content, reply_to=msg)


def evaluate_reply(msg: Message, context: Context) -> Message:
    """The evaluate handler: the global model scored on the client's own partition."""
    task, pid, model, _ = _setup(msg, context)
    if task.is_text:  # its own task's training texts, with its own head
        data = text.client_task(task, pid)
        (acc, loss), n = text.score_task(model, data, data.train, max_length=task.max_length), \
            len(data.train)  # fmt: skip
    else:
        x, y = client_data(task, pid)
        (acc, loss), n = score(model, x, y), len(x)
    metrics = {WEIGHT_KEY: n, "local-accuracy": acc, "local-loss": loss}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def make_client_app(transform: Transform | None = None) -> ClientApp:
    """A ClientApp with mergeforge's train and evaluate handlers; ``transform`` changes what
    the client sends (see :data:`Transform`)."""
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_reply(msg, context, transform)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return evaluate_reply(msg, context)

    return client_app


app = make_client_app()
"""The ClientApp a deployment names (``mergeforge.federated.client:app``)."""
