"""Fitness: how one in-memory merged state dict is scored (higher is better).

A fitness is built once in the driver (files read and checked there, so a pool without
examples fails before anything runs), pickled to every worker, and set up there once
(:meth:`setup`: the model skeleton, the tokenised inputs, the task heads — everything that does
not change between candidates); each candidate then only loads its merged tensors into the
skeleton and runs the inputs. Kinds:

* :class:`ClassifierPool` — a user's pool (YAML ``fitness: {tasks: [...]}``): per task, texts
  with labels and the folder of its head (``head.safetensors`` + ``labels.json``, as the text
  suite's experts keep them, ``evaluate/text/eval.py``); the encoder's mean-pooled embedding
  goes through each task's own head. Score: the weighted mean accuracy (or minus the mean
  cross-entropy, ``metric: loss``). The text suite's fitness is one of these (``suite.py``).
* :class:`LanguageModelPool` — ``fitness: {texts: ...}``: minus the mean token cross-entropy of
  a causal language model on the texts.
* :class:`CallableFitness` — a Python callable ``f(state_dict) -> float`` (or ``(float,
  metrics)``), given to :func:`~mergeforge.evolve.search.evolve`; never named in YAML.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from mergeforge.config import check_int
from mergeforge.errors import ConfigError

METRICS = ("accuracy", "loss")
SUITE_KEYS = {"suite", "tasks", "validation", "quick", "backbone", "n_train", "n_test", "cache",
              "metric", "seed", "batch_size", "optimizer", "selection"}  # fmt: skip
POOL_KEYS = {"tasks", "model", "tokenizer", "max_length", "batch_size", "metric"}
TASK_KEYS = {"name", "examples", "head", "weight"}
TEXTS_KEYS = {"texts", "model", "tokenizer", "max_length", "batch_size"}


@dataclass(frozen=True)
class Score:
    value: float
    metrics: Mapping[str, float] = field(default_factory=dict)


def as_score(result: Any) -> Score:
    """A fitness result as a :class:`Score`: a number, ``(number, metrics)`` or a ``Score``;
    a non-finite value is a failed candidate (``ValueError``)."""
    if isinstance(result, Score):
        score = result
    elif isinstance(result, tuple) and len(result) == 2:
        score = Score(float(result[0]), dict(result[1]))
    else:
        score = Score(float(result))
    if not math.isfinite(score.value):
        raise ValueError(f"the fitness is {score.value} (not a finite number)")
    return score


class Fitness(Protocol):
    def setup(self) -> None:
        """Once per worker, before the first candidate."""

    def __call__(self, state_dict: Mapping[str, Tensor]) -> Score | float: ...


class CallableFitness:
    """A plain callable ``f(state_dict)``; it must be picklable to reach the Ray workers (a
    module-level function of an importable module, or one defined in ``__main__``)."""

    def __init__(self, fn: Callable[[Mapping[str, Tensor]], Any]) -> None:
        if not callable(fn):
            raise ConfigError(f"fitness: {fn!r} is not callable")
        self.fn = fn

    def setup(self) -> None:
        pass

    def __call__(self, state_dict: Mapping[str, Tensor]) -> Score:
        return as_score(self.fn(state_dict))


@dataclass(frozen=True)
class PoolTask:
    name: str
    examples: tuple[tuple[str, int], ...]
    head: str
    """Folder of ``head.safetensors`` and ``labels.json`` (``evaluate.text.eval.save_head``)."""
    weight: float = 1.0


class _Skeleton:
    """A model built once per worker; each candidate's tensors are loaded into it. A candidate
    with another number of layers (the data-flow space stacks layers) gets a model of that
    depth, built from the same config once and kept (the last :attr:`KEEP` depths)."""

    model: str
    _net: Any = None
    KEEP = 4

    def _load(self, state_dict: Mapping[str, Tensor]) -> None:
        from mergeforge.evolve.genome import count_layers, layer_pattern

        depth = count_layers(state_dict.keys())
        self._net = self._nets[depth] if depth in self._nets else self._deeper(depth)
        missing, unexpected = self._net.load_state_dict(dict(state_dict), strict=False)
        missing = {n for n in missing if layer_pattern(n) not in self._optional}
        if unexpected or missing:
            raise ValueError(
                f"the merged tensors do not fit the model built from {self.model}: unexpected "
                f"{sorted(unexpected)[:3]}, missing {sorted(missing)[:3]}"
            )

    def _deeper(self, depth: int):
        """A model of ``depth`` layers from the first model's config (random weights: every
        merged tensor is loaded over them, the others are buffers and tied weights)."""
        import copy

        from mergeforge.evolve.genome import NUM_LAYERS_KEYS

        config = copy.deepcopy(self._nets[self._depth].config)
        key = next((k for k in NUM_LAYERS_KEYS if isinstance(getattr(config, k, None), int)),
                   None)  # fmt: skip
        if key is None or depth < 1:
            raise ValueError(f"the merged model has {depth} layers and the config of "
                             f"{self.model} names no layer count to set")  # fmt: skip
        setattr(config, key, depth)
        kinds = getattr(config, "layer_types", None)
        if isinstance(kinds, list) and kinds:
            if len(set(kinds)) > 1:
                raise ValueError(f"{self.model} mixes layer types {sorted(set(kinds))}: a stack "
                                 "of another depth has no defined type per layer")  # fmt: skip
            config.layer_types = [kinds[0]] * depth
        net = type(self._nets[self._depth])(config).eval()
        extra = [d for d in self._nets if d != self._depth]
        if len(extra) >= self.KEEP:
            del self._nets[extra[0]]
        self._nets[depth] = net
        return net

    def _built(self, net) -> None:
        from mergeforge.checkpoint import open_checkpoint
        from mergeforge.evolve.genome import count_layers, layer_pattern

        ck = open_checkpoint(self.model)
        try:  # buffers and tied weights the files do not store need not be merged
            self._optional = {layer_pattern(n) for n in set(net.state_dict()) - set(ck.keys())}
        finally:
            ck.close()
        self._net = net.eval()
        self._depth = count_layers(net.state_dict().keys())
        self._nets = {self._depth: self._net}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class ClassifierPool(_Skeleton):
    """Weighted mean accuracy (``metric: loss``: minus cross-entropy) of ``head_t(mean_pool(
    encoder(text)))`` over each task's examples; ``model``: the folder the encoder is built
    from (its tensor names are the merge's output names)."""

    def __init__(
        self,
        model: str,
        tasks: Sequence[PoolTask],
        *,
        tokenizer: str | None = None,
        max_length: int = 64,
        batch_size: int = 64,
        metric: str = "accuracy",
    ) -> None:
        if not tasks:
            raise ConfigError("fitness: the pool has no tasks; list at least one")
        for t in tasks:
            if not t.examples:
                raise ConfigError(f"fitness task {t.name!r}: no examples to score a candidate "
                                  "on; give it a non-empty examples file or list")  # fmt: skip
        if metric not in METRICS:
            raise ConfigError(f"fitness.metric: {metric!r}; use one of {', '.join(METRICS)}")
        check_task_weights([t.weight for t in tasks], [t.name for t in tasks], "fitness.tasks")
        self.model, self.tasks, self.tokenizer = model, tuple(tasks), tokenizer or model
        self.max_length, self.batch_size, self.metric = max_length, batch_size, metric

    def setup(self) -> None:
        from transformers import AutoTokenizer

        from mergeforge.evaluate.text.cache import quiet_transformers
        from mergeforge.evaluate.text.eval import load_encoder, load_head, tokenize

        with quiet_transformers():
            self._built(load_encoder(self.model))
            tok = AutoTokenizer.from_pretrained(self.tokenizer)
        self._heads = {t.name: load_head(t.head)[0] for t in self.tasks}
        self._batches = {}
        for t in self.tasks:  # similar lengths together: less padding
            order = sorted(t.examples, key=lambda ex: len(ex[0]))
            self._batches[t.name] = [
                (tokenize(tok, [x for x, _ in part], max_length=self.max_length),
                 torch.tensor([y for _, y in part]))
                for part in (order[i : i + self.batch_size]
                             for i in range(0, len(order), self.batch_size))
            ]  # fmt: skip

    @torch.inference_mode()
    def __call__(self, state_dict: Mapping[str, Tensor]) -> Score:
        from mergeforge.evaluate.text.eval import sentence_embedding

        self._load(state_dict)
        metrics: dict[str, float] = {}
        for t in self.tasks:
            right, loss, n = 0, 0.0, 0
            for batch, labels in self._batches[t.name]:
                logits = self._heads[t.name](sentence_embedding(self._net, batch).float())
                right += int((logits.argmax(-1) == labels).sum())
                loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                n += len(labels)
            metrics[t.name], metrics[f"{t.name}/loss"] = right / n, loss / n
        total = sum(t.weight for t in self.tasks)
        key = "" if self.metric == "accuracy" else "/loss"
        mean = sum(t.weight * metrics[t.name + key] for t in self.tasks) / total
        return Score(mean if self.metric == "accuracy" else -mean, metrics)


class LanguageModelPool(_Skeleton):
    """Minus the mean token cross-entropy of the causal language model built from ``model``
    on ``texts`` (the merged model predicting each next token); metrics: loss, perplexity."""

    def __init__(self, model: str, texts: Sequence[str], *, tokenizer: str | None = None,
                 max_length: int = 128, batch_size: int = 8) -> None:  # fmt: skip
        if not texts:
            raise ConfigError("fitness.texts: no texts to score a candidate on")
        self.model, self.texts, self.tokenizer = model, tuple(texts), tokenizer or model
        self.max_length, self.batch_size = max_length, batch_size

    def setup(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mergeforge.evaluate.text.cache import quiet_transformers

        with quiet_transformers():
            self._built(AutoModelForCausalLM.from_pretrained(self.model))
            tok = AutoTokenizer.from_pretrained(self.tokenizer)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self._batches = []
        for i in range(0, len(self.texts), self.batch_size):
            b = tok(list(self.texts[i : i + self.batch_size]), padding=True, truncation=True,
                    max_length=self.max_length, return_tensors="pt")  # fmt: skip
            b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            self._batches.append(b)

    @torch.inference_mode()
    def __call__(self, state_dict: Mapping[str, Tensor]) -> Score:
        self._load(state_dict)
        total, tokens = 0.0, 0
        for b in self._batches:
            n = int((b["labels"][:, 1:] != -100).sum())  # the loss averages the shifted tokens
            total += float(self._net(**b).loss) * n
            tokens += n
        loss = total / max(tokens, 1)
        return Score(-loss, {"loss": loss, "perplexity": math.exp(min(loss, 50.0))})


# ----------------------------------------------------------------------------------------------
# YAML: checked when the config is read, built (files read) when the search starts


def _keys(f: Mapping, allowed: set[str], where: str) -> None:
    from mergeforge.config import check_keys
    from mergeforge.evolve.config import DOCS

    check_keys(f, allowed, where, see=DOCS)


def check_task_weights(weights: Sequence[Any], names: Sequence[str], where: str) -> None:
    """Each task's ``weight``: a finite number >= 0 (not a bool), and their sum positive (the
    pool's score divides by it); checked when the config is read, before any worker starts."""
    for i, (w, name) in enumerate(zip(weights, names, strict=True)):
        at = f"{where}[{i}] ({name}).weight"
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ConfigError(f"{at}: {w!r} is not a number; give a finite number >= 0 (the "
                              "task's share of the pool's score, default 1)")  # fmt: skip
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"{at}: {w!r}; a weight is a finite number >= 0")
    if weights and sum(weights) <= 0:
        raise ConfigError(f"{where}: the task weights sum to 0; give at least one task a "
                          "positive weight")  # fmt: skip


def _positive_int(f: Mapping, key: str, default: int, where: str) -> int:
    return check_int(f.get(key, default), f"{where}.{key}", 1)


def check_fitness_options(kind: str, f: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of one fitness kind, checked (structure only: files are read by
    :func:`build_fitness`); an inline pool without examples is refused here."""
    if kind == "suite":
        _keys(f, SUITE_KEYS, "fitness")
        if f["suite"] != "text":
            raise ConfigError(f"fitness.suite: {f['suite']!r}; the suite with task heads is "
                              "'text' (MiniLM, or backbone: smollm2)")  # fmt: skip
        from mergeforge.evaluate.text.tasks import TEXT_TASKS

        tasks = f.get("tasks")
        if tasks is not None and (not isinstance(tasks, list) or not tasks or
                                  any(t not in TEXT_TASKS for t in tasks)):  # fmt: skip
            raise ConfigError(f"fitness.tasks: {tasks!r}; a non-empty list of text tasks: "
                              f"{', '.join(TEXT_TASKS)}")  # fmt: skip
        _positive_int(f, "validation", 64, "fitness")
        _positive_int(f, "selection", 256, "fitness")
        from mergeforge.evaluate.text.experts import OPTIMIZERS

        if f.get("optimizer") is not None and f["optimizer"] not in OPTIMIZERS:
            raise ConfigError(f"fitness.optimizer: {f['optimizer']!r}; how the suite's experts "
                              f"train, one of {', '.join(OPTIMIZERS)}")  # fmt: skip
    elif kind == "tasks":
        _keys(f, POOL_KEYS, "fitness")
        tasks = f["tasks"]
        if not isinstance(tasks, list) or not tasks:
            raise ConfigError("fitness.tasks: the pool has no tasks; list {name, examples, "
                              "head} mappings")  # fmt: skip
        for i, t in enumerate(tasks):
            where = f"fitness.tasks[{i}]"
            if not isinstance(t, Mapping) or not {"name", "examples", "head"} <= set(t):
                raise ConfigError(f"{where}: expected {{name, examples, head}} (examples: a "
                                  "JSONL file of {text, label} or a list of them)")  # fmt: skip
            _keys(t, TASK_KEYS, where)
            if isinstance(t["examples"], list) and not t["examples"]:
                raise ConfigError(f"{where} ({t['name']}): no examples; the pool needs at least "
                                  "one {text, label} per task")  # fmt: skip
        check_task_weights([t.get("weight", 1.0) for t in tasks], [t["name"] for t in tasks],
                           "fitness.tasks")  # fmt: skip
    else:
        _keys(f, TEXTS_KEYS, "fitness")
        if isinstance(f["texts"], list) and not f["texts"]:
            raise ConfigError("fitness.texts: no texts; give a text file or a non-empty list")
    for key in ("max_length", "batch_size"):
        if key in f:
            _positive_int(f, key, 1, "fitness")
    if f.get("metric", "accuracy") not in METRICS:
        raise ConfigError(f"fitness.metric: {f['metric']!r}; use one of {', '.join(METRICS)}")
    return dict(f)


def local_path(value: str, root: Path | None) -> str:
    """A path of the config: against the YAML's folder when it exists there, else as given."""
    p = Path(value).expanduser()
    if not p.is_absolute() and root is not None and (root / p).exists():
        return str((root / p).resolve())
    return str(p.resolve()) if p.exists() else value


def _read_examples(value: Any, labels: Sequence[str], where: str) -> tuple[tuple[str, int], ...]:
    """``{text, label}`` rows (a JSONL file or a list); a label is an index or a label name."""
    if isinstance(value, str):
        try:
            lines = Path(value).read_text(encoding="utf-8").splitlines()
            rows = [json.loads(x) for x in lines if x.strip()]
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"{where}: cannot read {value} as JSONL of {{text, label}}: {e}"
            ) from None
        where = f"{where} ({value})"
    else:
        rows = list(value)
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping) or not isinstance(r.get("text"), str) or "label" not in r:
            raise ConfigError(f"{where}: row {i} is not {{text: STR, label: INDEX or NAME}}")
        y = r["label"]
        if isinstance(y, str) and y in labels:
            y = labels.index(y)
        if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < len(labels):
            raise ConfigError(f"{where}: row {i}: label {r['label']!r} is not one of the head's "
                              f"labels {list(labels)} nor an index into them")  # fmt: skip
        out.append((r["text"], y))
    if not out:
        raise ConfigError(f"{where}: no examples; the pool needs at least one {{text, label}}")
    return tuple(out)


def build_fitness(spec, *, root: Path | None, default_model: str | None) -> Fitness:
    """The fitness of a ``tasks`` or ``texts`` spec, its files read and checked now.
    ``default_model``: the skeleton's folder when ``model:`` is not given (the base model)."""
    f = spec.options
    model = local_path(f["model"], root) if f.get("model") else default_model
    if model is None or not Path(model).is_dir():
        raise ConfigError(f"fitness.model: {model!r} is not a model folder; the pool builds its "
                          "model (with its config.json) from a folder: set fitness.model or "
                          "genome.base_model")  # fmt: skip
    tok = local_path(f["tokenizer"], root) if f.get("tokenizer") else None
    if spec.kind == "texts":
        texts = f["texts"]
        if isinstance(texts, str):  # one text a line, or JSONL rows with "text"
            path = local_path(texts, root)
            try:
                lines = Path(path).read_text(encoding="utf-8").splitlines()
                lines = [x for x in lines if x.strip()]
                texts = [json.loads(x)["text"] for x in lines] if path.endswith(".jsonl") else lines
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(
                    f"fitness.texts: cannot read {path} (one text a line, or "
                    f"JSONL of {{text}}): {e}"
                ) from None
        return LanguageModelPool(model, [str(t) for t in texts], tokenizer=tok,
                                 max_length=f.get("max_length", 128),
                                 batch_size=f.get("batch_size", 8))  # fmt: skip
    tasks = []
    for i, t in enumerate(f["tasks"]):
        where = f"fitness.tasks[{i}] ({t['name']})"
        head = local_path(t["head"], root)
        try:
            labels = json.loads((Path(head) / "labels.json").read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"{where}.head: {head} has no readable labels.json beside "
                f"head.safetensors (evaluate.text.eval.save_head): {e}"
            ) from None
        ex = t["examples"]
        ex = local_path(ex, root) if isinstance(ex, str) else ex
        weight = float(t.get("weight", 1.0))
        tasks.append(PoolTask(str(t["name"]), _read_examples(ex, labels, where), head, weight))
    return ClassifierPool(model, tasks, tokenizer=tok, max_length=f.get("max_length", 64),
                          batch_size=f.get("batch_size", 64),
                          metric=f.get("metric", "accuracy"))  # fmt: skip
