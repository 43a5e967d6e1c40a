"""The vision suite of ``mergeforge bench``: fuse independently trained image classifiers.

One *family* per run, chosen with ``--tasks DATASET/ARCH/REGIME`` (default
:data:`DEFAULT_FAMILY`; ``--quick``: :data:`QUICK_FAMILY` with a few training steps): the
parents of a :class:`~mergeforge.evaluate.vision.train.VisionRecipe`, trained (or loaded from
``$MERGEFORGE_CACHE/vision/<recipe hash>/``) by
:func:`~mergeforge.evaluate.vision.train.get_parents`.
The default recipe (:func:`recipe_for`) is that of ``benchmarks/vision/results/vision.json``
(6,000 train / 2,000 test, digits: all 1,437 / 360; 200 Adam steps of batch 64, lr 1e-3), so the
parents cached by ``benchmarks/vision/run.py --n-train 6000 --steps 200 --batch-size 64`` are
reused and a default run does not train.

Each parent is written once as a model folder the merge engine reads
(``<recipe hash>/models/parent<k>/``: ``model.safetensors`` with the state dict and a
``config.json`` naming the architecture). The pool has one task, named after the dataset: a
merged folder is loaded into the architecture and scored on the test subsample.

There is no shared base: the parents are trained from scratch from different inits, so a task
vector (θ_k − θ₀) means nothing. Methods with ``base: none`` (``linear``: plain weight averaging;
``passthrough``) merge every parent; a two-model interpolation (``max_models == 1``: ``slerp``)
takes ``parent0`` as its base (t = 0) and ``parent1`` as the other end (t = 1), for 2-parent
regimes only. Every other method fails before anything is trained, naming those that run
(:meth:`VisionSuite.check_run`). Data-using methods (RegMean, Fisher) are not supported yet.

Fusion rows (a methods-file row naming a fusion method, e.g. ``kf``: see
:mod:`mergeforge.evaluate.bench`) fuse the parents in memory on the *fusion set* — a seeded,
class-stratified sample of ``fusion_n`` (default 400) examples of the union of the parents'
training data, with each parent's class share of the regime (``ParentSplit.class_share``) as
its class fractions — and write the fused model with
:func:`~mergeforge.fusion.output.write_fused`; it is scored like a merge.

``parents="plateau"`` (``mergeforge bench vision --parents plateau``) uses the plateau recipe
(:func:`recipe_for`): parents trained on every example until the loss flattens, cached apart.

Normalized accuracy: merged ÷ the **output ensemble** (mean of the parents' softmax), the
reference every fusion method tries to reach in one model (the ``experts (own task)`` row is the
ensemble). Reference rows (no merge): ``ensemble``, ``ensemble_weighted`` (class-wise weighted
by each parent's share of the class; the same as ``ensemble`` for ``seeds`` regimes) and
``parent<k>`` (each parent alone).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from mergeforge.errors import ConfigError, MergeforgeError

DATASETS = ("fashion_mnist", "mnist", "digits")
REGIME_KINDS = ("seeds", "halves", "dirichlet")
DEFAULT_FAMILY = "fashion_mnist/mlp/seeds2"
QUICK_FAMILY = "digits/mlp/seeds2"
QUICK_STEPS = 30  # per parent: a couple of seconds for the MLP on 1 CPU thread
QUICK_SIZES = {"n_train": 1000, "n_test": 500}  # digits keeps its 1,437 / 360
ENSEMBLES = ("ensemble", "ensemble_weighted")
MODEL_FILE = "model.safetensors"
FUSION_N = 400  # the fusion set of fusion rows (2507.00037's v1 code: 400 for VGG / CIFAR-10)


def parse_family(tasks: Sequence[str] | None, *, quick: bool = False) -> tuple[str, str, str]:
    """``["dataset/arch/regime"]`` (or None: the default family) -> (dataset, arch, regime)."""
    from mergeforge.evaluate.vision.models import ARCHS

    valid = (
        f"datasets {list(DATASETS)}, archs {sorted(ARCHS)}, regimes "
        "seeds<P> / halves<P> / dirichlet<P> with P >= 2 parents (e.g. seeds2, dirichlet4)"
    )
    if not tasks:
        tasks = [QUICK_FAMILY if quick else DEFAULT_FAMILY]
    if len(tasks) != 1:
        raise ConfigError(
            f"the vision suite runs one family at a time, got {len(tasks)}: {list(tasks)}; "
            f"give one --tasks DATASET/ARCH/REGIME (e.g. {DEFAULT_FAMILY}); {valid}"
        )
    parts = str(tasks[0]).strip().split("/")
    if len(parts) != 3:
        raise ConfigError(
            f"vision family {tasks[0]!r}: expected DATASET/ARCH/REGIME (e.g. {DEFAULT_FAMILY}); "
            f"{valid}"
        )
    dataset, arch, regime = parts
    match = re.fullmatch(r"(seeds|halves|dirichlet)(\d+)", regime)
    if dataset not in DATASETS or arch not in ARCHS or not match or int(match.group(2)) < 2:
        raise ConfigError(f"vision family {tasks[0]!r} is not valid; {valid}")
    if match.group(1) == "halves" and int(match.group(2)) > 10:
        raise ConfigError(f"vision family {tasks[0]!r}: halves<P> needs P <= 10; {valid}")
    return dataset, arch, regime


PARENTS = ("short", "plateau")
PLATEAU_EPOCHS = {"fashion_mnist": 10, "mnist": 20, "digits": 100}
"""Epochs of the plateau recipe: ~4,700 Adam steps of batch 128 per same-data parent on
Fashion-MNIST's 60k, ~1,250 on MNIST's 8k and ~1,200 on digits' 1,437 (small sets need more
passes for as many updates)."""


def recipe_for(
    dataset: str,
    arch: str,
    regime: str,
    *,
    quick: bool = False,
    full: bool = False,
    plateau: bool = False,
):
    """The suite's recipe: that of ``benchmarks/vision/results/vision.json`` (the cached
    parents); ``quick``: :data:`QUICK_STEPS` steps on a smaller subsample; ``full``: every
    training example.

    ``plateau``: parents worth fusing. Every training example of the dataset (each parent its
    regime's part of it), :data:`PLATEAU_EPOCHS` epochs of Adam (lr 1e-3, batch 128) with the
    learning rate decayed to 0 along a cosine, so training ends where the loss has flattened
    (Fashion-MNIST VGG seeds2: 91.0 / 90.5 %, 2.7 min per parent on one CPU thread; measured in
    ``benchmarks/vision/README.md``).
    Its own cache key; ``quick`` and ``full`` do not apply to it."""
    from mergeforge.evaluate.vision.train import VisionRecipe

    digits = dataset == "digits"
    if plateau:
        if quick or full:
            raise ConfigError(
                "the plateau recipe trains on every example for a fixed number of epochs; it "
                "takes neither --quick nor --full"
            )
        return VisionRecipe(
            dataset=dataset,
            arch=arch,
            regime=regime,
            alpha=0.3,
            n_train=None,
            n_test=360 if digits else 2000,
            epochs=PLATEAU_EPOCHS[dataset],
            steps=None,
            batch_size=128,
            lr=1e-3,
            optimizer="adam",
            schedule="cosine",
        )
    recipe = VisionRecipe(
        dataset=dataset,
        arch=arch,
        regime=regime,
        alpha=0.3,
        n_train=None if digits else 6000,
        n_test=360 if digits else 2000,
        epochs=3,  # unused: steps override epochs (kept: it is part of the cache key)
        steps=200,
        batch_size=64,
        lr=1e-3,
        optimizer="adam",
    )
    if quick:
        sizes = {} if digits else QUICK_SIZES
        recipe = replace(recipe, steps=QUICK_STEPS, **sizes)
    if full:
        recipe = replace(recipe, n_train=None)
    return recipe


def n_parents(regime: str) -> int:
    return int(re.fullmatch(r"[a-z]+(\d+)", regime).group(1))


@dataclass
class VisionPool:
    """One task (the dataset): a merged folder loaded into ``arch``, scored on the test set."""

    task: str
    arch: str
    test_x: object  # N×1×28×28 float32
    test_y: object  # N int64

    @property
    def tasks(self) -> tuple[str, ...]:
        return (self.task,)

    def evaluate(self, model_dir: Path, *, tasks: Sequence[str] | None = None) -> dict[str, float]:
        from mergeforge.evaluate.metrics import accuracy
        from mergeforge.evaluate.vision.train import load_into, predict_logits

        model = load_into(self.arch, read_state_dict(model_dir, self.arch))
        return {self.task: accuracy(predict_logits(model, self.test_x), self.test_y)}


def read_state_dict(model_dir: Path, arch: str | None = None) -> dict:
    """Every tensor of a model folder (an input or a merge output), as float32 CPU tensors."""
    import torch

    from mergeforge.checkpoint import open_checkpoint
    from mergeforge.errors import CheckpointError

    cfg_file = Path(model_dir) / "config.json"
    if arch is not None and cfg_file.is_file():
        found = json.loads(cfg_file.read_text()).get("arch")
        if found is not None and found != arch:
            raise CheckpointError(f"{model_dir} holds a {found!r} model, not {arch!r}")
    ck = open_checkpoint(str(model_dir))
    try:
        return {k: ck.get(k).to(torch.float32) for k in ck.keys()}
    finally:
        ck.close()


class VisionSuite:
    """The ``vision`` suite of ``mergeforge bench`` (see the module docstring)."""

    name = "vision"
    fuses = True  # the bench runs fusion rows through fusion_job()
    settings_defaults = {"fusion": {"n": FUSION_N, "seed": 0}}  # results.json before fusion

    def __init__(
        self,
        *,
        quick: bool = False,
        full: bool = False,
        cache_dir: str | Path | None = None,
        tasks: Sequence[str] | None = None,
        recipe=None,
        console=None,
        parents: str = "short",
        fusion_n: int = FUSION_N,
        fusion_seed: int = 0,
    ) -> None:
        from rich.console import Console

        from mergeforge.evaluate.vision.train import cache_root

        if parents not in PARENTS:
            raise ConfigError(f"vision suite: parents {parents!r} is not one of {PARENTS}")
        if fusion_n < 1:
            raise ConfigError(f"vision suite: fusion_n must be >= 1, got {fusion_n}")
        self.dataset, self.arch, self.regime = parse_family(tasks, quick=quick)
        self.family = f"{self.dataset}/{self.arch}/{self.regime}"
        plateau = parents == "plateau"
        self.recipe = recipe or recipe_for(
            self.dataset, self.arch, self.regime, quick=quick, full=full, plateau=plateau
        )
        self.fusion_n, self.fusion_seed = fusion_n, fusion_seed
        self.n_parents = n_parents(self.recipe.regime)
        self.cache_dir = cache_dir
        self.folder = cache_root(cache_dir) / self.recipe.key()
        # No shared base: merge_inputs never hands this folder (it holds no weights) to a merge.
        self.base_dir = self.folder / "models"
        self.expert_dirs = {
            f"parent{k}": self.base_dir / f"parent{k}" for k in range(self.n_parents)
        }
        self.reference_methods = (*ENSEMBLES, *self.expert_dirs)
        self.console = console or Console()
        self.timings: dict = {}

    # -- Suite protocol ---------------------------------------------------------------------

    def prepare(self) -> None:
        from mergeforge.evaluate.metrics import accuracy
        from mergeforge.evaluate.vision.data import load_dataset
        from mergeforge.evaluate.vision.train import (
            ensemble_probs,
            get_parents,
            load_into,
            predict_logits,
        )

        r = self.recipe
        t0 = time.perf_counter()
        data = load_dataset(r.dataset, n_train=r.n_train, n_test=r.n_test, seed=0)
        self.timings["data_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.parents, self.split, _ = self._parents(get_parents, data)
        self.timings["parents_s"] = time.perf_counter() - t0
        self.timings["train_s"] = [p.meta.get("train_seconds") for p in self.parents]
        for k, parent in enumerate(self.parents):
            self._write_folder(k, parent)
        self.pool = VisionPool(r.dataset, r.arch, data.test_x, data.test_y)
        self.train_x, self.train_y = data.train_x, data.train_y  # the fusion set's source
        logits = [
            predict_logits(load_into(r.arch, p.state_dict), data.test_x) for p in self.parents
        ]
        self.references = {f"parent{k}": accuracy(z, data.test_y) for k, z in enumerate(logits)}
        self.references["ensemble"] = accuracy(ensemble_probs(logits), data.test_y)
        self.references["ensemble_weighted"] = accuracy(
            ensemble_probs(logits, class_weights=self.split.class_share), data.test_y
        )
        self.sizes = [len(data.train_y), len(data.test_y)]

    def expert_accuracy(self) -> dict[str, float]:
        """The output ensemble on the test set: normalized accuracy is merged ÷ ensemble."""
        return {self.pool.task: self.references["ensemble"]}

    def reference(self, method: str) -> dict[str, float]:
        """A row that merges nothing: ``ensemble``, ``ensemble_weighted`` or ``parent<k>``."""
        if method not in self.references:
            raise ConfigError(f"vision suite: no reference row {method!r}; known: "
                              f"{list(self.reference_methods)}")  # fmt: skip
        return {self.pool.task: self.references[method]}

    def check_run(self, run) -> None:
        """Fail (ConfigError) on a method the vision parents cannot be merged with: one that
        needs a base (unless it interpolates two models) or per-model statistics."""
        self._inputs_kind(run)

    def merge_inputs(self, run) -> tuple[Path, list[Path]]:
        """Base-free methods read every parent; a two-model interpolation (slerp) reads
        parent0 as its base and parent1 as the other model."""
        dirs = list(self.expert_dirs.values())
        if self._inputs_kind(run) == "endpoints":
            if len(dirs) != 2:  # a failed row, not a failed file: the rest of the file runs
                raise MergeforgeError(
                    f"{run.name}: {run.method} interpolates between 2 models, but "
                    f"{self.family} has {len(dirs)} parents"
                )
            return dirs[0], dirs[1:]
        return self.base_dir, dirs  # base left out by merge_config (method base "none")

    def settings(self) -> dict:
        return {
            "family": self.family,
            "dataset": self.dataset,
            "arch": self.arch,
            "regime": self.regime,
            "recipe": self.recipe.to_dict(),
            "recipe_key": self.recipe.key(),
            "sizes": self.sizes,
            "n_parents": self.n_parents,
            "normalized_by": "ensemble",
            "references": self.references,
            "parents": {k: str(d) for k, d in self.expert_dirs.items()},
            "fusion": {"n": self.fusion_n, "seed": self.fusion_seed},
            "timings": self.timings,
        }

    def fusion_job(self, run, out: Path):
        """The call that fuses the parents for a fusion row and writes ``out`` (the bench runs
        it in a fresh process): ``(fn, args, kwargs)``, see the module docstring."""
        import numpy as np

        from mergeforge.evaluate.vision.fuse import fuse_to_folder, fusion_set
        from mergeforge.evaluate.vision.models import build_model
        from mergeforge.fusion.output import resolved_parameters

        union = np.unique(np.concatenate(self.split.indices))
        data = fusion_set(
            self.train_x[union],
            self.train_y[union],
            self.fusion_n,
            seed=self.fusion_seed,
            class_fractions=self.split.class_share,
        )
        dirs = [str(d) for d in self.expert_dirs.values()]
        source = f"union of the parents' training data ({self.family}, {self.recipe.key()})"
        config = {
            "method": run.method,
            "parameters": resolved_parameters(run.method, run.parameters),
            "parents": dirs,
            "architecture": self.arch,
            "levels": list(build_model(self.arch).levels),
            "data": {
                "dataset": self.dataset,
                "n": len(data),
                "seed": self.fusion_seed,
                "from": source,
            },  # fmt: skip
            "class_fractions": self.split.class_share.round(6).tolist(),
            "seed": self.fusion_seed,
        }
        states = [p.state_dict for p in self.parents]
        args = (self.arch, states, dirs, data, run.method, dict(run.parameters), out)
        kwargs = {"config": config, "seed": self.fusion_seed, "overwrite": True,
                  "inputs": list(self.expert_dirs.values())}  # fmt: skip
        return fuse_to_folder, args, kwargs

    # -- helpers -----------------------------------------------------------------------------

    def _inputs_kind(self, run) -> str:
        from mergeforge.methods import all_methods, get_method

        if run.method in self.reference_methods:
            return "reference"
        if getattr(run, "kind", "merge") == "fusion":
            return "fusion"  # fusion_job fuses every parent
        method = get_method(run.method)
        if method.sidecar_inputs is not None:
            raise ConfigError(
                f"{run.name}: {run.method} reads per-model statistics (RegMean Grams / Fisher), "
                "which the vision suite does not compute yet"
            )
        if method.base == "none":
            return "all"
        if method.max_models == 1:
            return "endpoints"  # merge_inputs checks that the regime has 2 parents
        free = sorted(m.name for m in all_methods() if m.base == "none")
        pairs = sorted(m.name for m in all_methods() if m.base != "none" and m.max_models == 1
                       and m.sidecar_inputs is None)  # fmt: skip
        raise ConfigError(
            f"{run.name}: {run.method} needs a base model (it merges differences from a shared "
            f"starting point), but the vision parents ({self.family}) are trained from scratch "
            f"from different inits and share no base. Base-free methods: {free}; two-model "
            f"interpolations {pairs} take parent0 as the base when the regime has 2 parents; "
            f"reference rows: {list(self.reference_methods)}"
        )

    def _parents(self, get_parents, data):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.fields[loss]}"), TimeElapsedColumn())  # fmt: skip
        with Progress(*columns, console=self.console, transient=True) as bar:
            jobs: dict[int, int] = {}

            def started(k: int, total: int) -> None:
                self.console.print(f"training {self.family} parent {k} ({total} steps)")
                jobs[k] = bar.add_task(f"{self.family} parent {k}", total=total, loss="")

            def stepped(k: int, step: int, loss: float) -> None:
                bar.update(jobs[k], completed=step, loss=f"loss {loss:.3f}")

            return get_parents(self.recipe, data=data, cache_dir=self.cache_dir,
                               on_step=stepped, on_parent_start=started)  # fmt: skip

    def _write_folder(self, k: int, parent) -> None:
        """``models/parent<k>/``: the cached weights file and a config.json (once)."""
        folder = self.expert_dirs[f"parent{k}"]
        config = {
            "model_type": f"mergeforge-vision-{self.arch}",
            "arch": self.arch,
            "dataset": self.dataset,
            "regime": self.regime,
            "parent": k,
            "recipe_key": self.recipe.key(),
            "num_classes": 10,
        }
        cfg_file = folder / "config.json"
        if (folder / MODEL_FILE).is_file() and cfg_file.is_file():
            if json.loads(cfg_file.read_text()) == config:
                return
        from safetensors.torch import save_file

        from mergeforge.checkpoint.atomic import atomic_folder

        def build(tmp: Path) -> None:
            sd = {key: t.contiguous() for key, t in parent.state_dict.items()}
            save_file(sd, str(tmp / MODEL_FILE), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

        atomic_folder(folder, build)  # a killed run never leaves a half-written folder
