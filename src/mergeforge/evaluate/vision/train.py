"""Train, cache and evaluate independently trained vision parents (the inputs of fusion).

A :class:`VisionRecipe` fixes everything that determines a family of parents: dataset and
subsample, architecture, regime (see :func:`mergeforge.evaluate.vision.data.make_regime`) and the
training hyper-parameters. Parent ``k`` of ``P`` is initialised and shuffled from seed
``recipe.seed * P + k``, so parents are independent (different inits) even on the same data,
and the parents of two recipe seeds never share a seed. Parents are cached under
``$MERGEFORGE_CACHE/vision/<recipe hash>/`` (default ``~/.cache/mergeforge/vision``):
``parent<k>.safetensors`` (the state dict) and ``parent<k>.json`` (recipe, arch, dataset, regime,
parent index, class shares/fractions, test accuracy, training time).

Evaluation: :func:`accuracy`, :func:`ensemble_probs` (the mean of the parents' softmax, the
reference every fusion method is compared with; optionally class-wise weighted by each parent's
share of the class, for non-IID parents) and :func:`average_state_dicts` (plain weight averaging,
which collapses for parents trained from different inits: OT-fusion paper, 1910.05653, Table 1).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mergeforge.cache import cache_folder
from mergeforge.checkpoint.atomic import atomic_file, write_text_atomic
from mergeforge.evaluate.metrics import accuracy
from mergeforge.evaluate.vision.data import ImageSplit, ParentSplit, load_dataset, make_regime
from mergeforge.evaluate.vision.models import ARCHS, build_model

SCHEDULES = ("constant", "cosine")
_LATER_FIELDS = {"schedule": "constant"}  # field -> the value recipes had before it existed


@dataclass(frozen=True)
class VisionRecipe:
    """One family of parents. ``n_train``/``n_test``: stratified subsample sizes (None = all)."""

    dataset: str = "fashion_mnist"
    arch: str = "mlp"
    regime: str = "seeds2"
    alpha: float = 0.3
    n_train: int | None = 10_000
    n_test: int | None = 2_000
    epochs: int = 3
    steps: int | None = None  # if set: this many optimizer steps per parent, whatever its data size
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    schedule: str = "constant"  # or "cosine": the lr decays to 0 over the run (plateau recipe)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(
                f"VisionRecipe.arch: unknown {self.arch!r}; choose one of {sorted(ARCHS)}"
            )
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(
                f"VisionRecipe.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"VisionRecipe.schedule must be one of {SCHEDULES}, got {self.schedule!r}"
            )
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"VisionRecipe.steps must be >= 1 or None, got {self.steps}")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"VisionRecipe.{key} must be >= 1, got {getattr(self, key)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        """16 hex digits of the SHA-256 of the recipe's JSON: the cache folder name. Fields
        added later are left out while they hold the value every older recipe implied
        (:data:`_LATER_FIELDS`), so existing caches keep their key."""
        fields = {k: v for k, v in self.to_dict().items() if _LATER_FIELDS.get(k, object()) != v}
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- training


def train_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    seed: int = 0,
    max_steps: int | None = None,
    schedule: str = "constant",
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place with cross-entropy; minibatch order drawn from ``seed``.

    ``x``: N×1×28×28, ``y``: N. Returns the loss of every step. ``max_steps`` stops early
    (smoke tests); ``on_step(step, loss)`` is called after each step (progress bars).
    ``schedule="cosine"``: the learning rate follows lr·½(1 + cos(π t/T)) over the T steps of
    the run (Loshchilov & Hutter 2017, no restarts), so the run ends at a plateau.
    """
    params = list(model.parameters())
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    total = epochs * -(-len(x) // batch_size)
    if max_steps is not None:
        total = min(total, max_steps)
    sched = None
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    elif schedule != "constant":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(len(losses), losses[-1])
            if max_steps is not None and len(losses) >= max_steps:
                return losses
    return losses


def new_parent(arch: str, seed: int) -> nn.Module:
    """A freshly initialised model; the init depends on ``seed`` only."""
    torch.manual_seed(seed)
    return build_model(arch)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000) -> torch.Tensor:
    """N×C logits in eval mode."""
    model.eval()
    return torch.cat([model(chunk) for chunk in x.split(batch_size)])


def ensemble_probs(
    logits: Sequence[torch.Tensor], *, class_weights: np.ndarray | torch.Tensor | None = None
) -> torch.Tensor:
    """Output ensemble: mean over parents of softmax(logits_k), N×C.

    ``class_weights`` (P×C, e.g. ``ParentSplit.class_share``) weights parent ``k``'s probability
    of class ``c`` by ``w[k, c] / Σ_k w[k, c]`` (classes no parent saw: uniform over parents).
    """
    probs = torch.stack([F.softmax(z.float(), dim=1) for z in logits])  # P×N×C
    if class_weights is None:
        return probs.mean(dim=0)
    w = torch.as_tensor(np.asarray(class_weights), dtype=probs.dtype)  # P×C
    if w.shape != (probs.shape[0], probs.shape[2]):
        raise ValueError(
            f"class_weights must be {probs.shape[0]}×{probs.shape[2]}, got {tuple(w.shape)}"
        )
    total = w.sum(dim=0, keepdim=True)
    w = torch.where(total > 0, w / total.clamp_min(1e-12), torch.full_like(w, 1 / len(w)))
    return (w[:, None, :] * probs).sum(dim=0)


def average_state_dicts(
    state_dicts: Sequence[dict[str, torch.Tensor]], *, weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Plain (optionally weighted) weight averaging, key by key; inputs are not mutated."""
    if not state_dicts:
        raise ValueError("average_state_dicts needs at least one state dict")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if list(sd) != keys:
            raise ValueError(f"state dict {i} has different keys from state dict 0")
    w = torch.tensor(
        weights if weights is not None else [1.0] * len(state_dicts), dtype=torch.float64
    )
    w = w / w.sum()
    out = {}
    for key in keys:
        stacked = torch.stack([sd[key].to(torch.float64) for sd in state_dicts])
        out[key] = torch.tensordot(w, stacked, dims=1).to(state_dicts[0][key].dtype)
    return out


# --------------------------------------------------------------------------- parents + cache


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The parents' cache: ``cache_dir`` when given, else ``<cache home>/vision``."""
    return cache_folder("vision", cache_dir)


@dataclass(frozen=True)
class Parent:
    state_dict: dict[str, torch.Tensor]
    meta: dict


def get_parents(
    recipe: VisionRecipe,
    *,
    data: ImageSplit | None = None,
    cache_dir: str | Path | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    on_parent_start: Callable[[int, int], None] | None = None,
) -> tuple[list[Parent], ParentSplit, ImageSplit]:
    """Load the recipe's parents from the cache, training (and caching) those that are missing.

    ``data``: the already-loaded dataset of ``recipe`` (else loaded here). ``on_parent_start(k,
    total_steps)`` and ``on_step(k, step, loss)`` report progress. Returns the parents, the split
    and the data.
    """
    if data is None:
        data = load_dataset(recipe.dataset, n_train=recipe.n_train, n_test=recipe.n_test, seed=0)
    split = make_regime(recipe.regime, data.train_y.numpy(), alpha=recipe.alpha, seed=recipe.seed)
    folder = cache_root(cache_dir) / recipe.key()
    parents = []
    for k, idx in enumerate(split.indices):
        weights_file, meta_file = folder / f"parent{k}.safetensors", folder / f"parent{k}.json"
        if weights_file.is_file() and meta_file.is_file():
            parents.append(Parent(load_file(weights_file), json.loads(meta_file.read_text())))
            continue
        seed = recipe.seed * len(split.indices) + k  # seed 0: k; seeds never shared
        model = new_parent(recipe.arch, seed)
        idx_t = torch.as_tensor(idx)
        per_epoch = -(-len(idx) // recipe.batch_size)
        epochs = recipe.epochs if recipe.steps is None else -(-recipe.steps // per_epoch)
        steps = epochs * per_epoch if recipe.steps is None else recipe.steps
        if on_parent_start is not None:
            on_parent_start(k, steps)
        start = time.perf_counter()
        losses = train_model(
            model,
            data.train_x[idx_t],
            data.train_y[idx_t],
            epochs=epochs,
            batch_size=recipe.batch_size,
            lr=recipe.lr,
            optimizer=recipe.optimizer,
            weight_decay=recipe.weight_decay,
            seed=seed,
            max_steps=recipe.steps,
            schedule=recipe.schedule,
            on_step=None if on_step is None else lambda s, loss, k=k: on_step(k, s, loss),
        )
        seconds = time.perf_counter() - start
        meta = {
            "recipe": recipe.to_dict(),
            "recipe_key": recipe.key(),
            "arch": recipe.arch,
            "dataset": recipe.dataset,
            "regime": split.regime,
            "parent": k,
            "seed": seed,
            "n_train": len(idx),
            "class_share": split.class_share[k].tolist(),
            "class_fractions": split.class_fractions[k].tolist(),
            "test_accuracy": accuracy(predict_logits(model, data.test_x), data.test_y),
            "steps": len(losses),
            "final_loss": float(np.mean(losses[-10:])),
            "train_seconds": round(seconds, 2),
            "threads": torch.get_num_threads(),
        }
        sd = {key: t.detach().contiguous() for key, t in model.state_dict().items()}
        folder.mkdir(parents=True, exist_ok=True)
        # atomic: a killed run never leaves a half-written parent (the meta file comes second:
        # both present is what marks a parent as cached)
        with atomic_file(weights_file) as tmp:
            save_file(sd, str(tmp), metadata={"recipe_key": recipe.key(), "parent": str(k)})
        write_text_atomic(meta_file, json.dumps(meta, indent=1))
        parents.append(Parent(sd, meta))
    write_text_atomic(folder / "recipe.json", json.dumps(recipe.to_dict(), indent=1))
    return parents, split, data


def load_into(arch: str, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    model = build_model(arch)
    model.load_state_dict(state_dict)
    return model


def evaluate_family(
    recipe: VisionRecipe, parents: list[Parent], split: ParentSplit, data: ImageSplit
) -> dict:
    """Accuracy of each parent, the output ensembles and plain weight averaging on the test set."""
    logits = [predict_logits(load_into(recipe.arch, p.state_dict), data.test_x) for p in parents]
    averaged = load_into(recipe.arch, average_state_dicts([p.state_dict for p in parents]))
    return {
        "parents": [accuracy(z, data.test_y) for z in logits],
        "ensemble": accuracy(ensemble_probs(logits), data.test_y),
        "ensemble_weighted": accuracy(
            ensemble_probs(logits, class_weights=split.class_share), data.test_y
        ),
        "weight_average": accuracy(predict_logits(averaged, data.test_x), data.test_y),
        "train_seconds": [p.meta["train_seconds"] for p in parents],
        "train_threads": [p.meta["threads"] for p in parents],
        "n_train_per_parent": [len(i) for i in split.indices],
        "class_share": split.class_share.round(4).tolist(),
    }
