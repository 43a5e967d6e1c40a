"""Fine-tune one text expert: the whole encoder plus a linear head on mean-pooled embeddings.

An expert folder holds ``encoder/`` (a Hugging Face folder with the base's exact tensor names and
tokenizer, so experts of one base merge tensor by tensor), ``head.safetensors`` and ``labels.json``
(see :mod:`mergeforge.evaluate.text.eval`). Training is seeded: one learning rate for the
encoder and a larger one for the freshly initialised head, linear decay to zero, dropout on.

The recipe's ``optimizer`` (:data:`OPTIMIZERS`) picks how the expert trains and whether it comes
out merge-ready (a ``curvature`` sidecar in ``encoder/mergeforge-stats/``, issue 14):

* ``adamw`` (the default): ``torch.optim.AdamW``, no sidecar;
* ``adamw+recorder``: the same AdamW steps, with a
  :class:`~mergeforge.train.CurvatureRecorder` beside it (EMA R, C, β₂ 0.999, and AdamW's
  ``exp_avg_sq`` for OTA: one float per encoder parameter on disk);
* ``umtam``: :class:`~mergeforge.train.UMTAM` at the recipe's learning rates and weight decay
  with :data:`UMTAM_SETTINGS` (rank 32, randomized SVD every step: BENCHMARKS.md §6, 1.19×
  AdamW's step time), its R, C exported; ``umtam-subspace`` the same with the warm-started
  subspace refresh (``svd="subspace"``, cheaper on large matrices). Encoder parameters that
  never had a gradient (MiniLM's pooler, off the mean-pooling path) are written with UMTAM's
  initial statistics (R, C = ε; ``exp_avg_sq`` = 0), so a curvature merge finds every tensor.

Only the encoder's statistics are written: the head is not merged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from mergeforge.errors import ConfigError
from mergeforge.evaluate.text.eval import (
    load_encoder,
    save_head,
    sentence_embedding,
    tokenize,
)
from mergeforge.evaluate.text.tasks import TextTask

ENCODER_DIR = "encoder"
OPTIMIZERS = ("adamw", "adamw+recorder", "umtam", "umtam-subspace")
UMTAM_SETTINGS = {"rank": 32, "svd": "randomized"}
"""UMTAM's settings in the suite beyond the recipe's lr / head_lr / weight_decay (the rest are
the paper's defaults); part of a ``umtam`` expert's cache key."""
UMTAM_VARIANTS = {"umtam": UMTAM_SETTINGS, "umtam-subspace": {**UMTAM_SETTINGS, "svd": "subspace"}}
"""Each UMTAM optimizer name's settings: ``umtam-subspace`` refreshes the momentum by one
warm-started subspace iteration (``svd="subspace"``) instead of the randomized range finder."""


@dataclass(frozen=True)
class FinetuneRecipe:
    steps: int = 30
    batch_size: int = 32
    max_length: int = 64
    lr: float = 1e-4
    head_lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "max_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"FinetuneRecipe.{key} must be >= 1, got {getattr(self, key)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}"
            )

    def to_dict(self) -> dict:
        """The recipe as the cache key and the suite's settings record it. ``adamw`` leaves the
        ``optimizer`` out, so AdamW experts keep the keys they had before the choice existed;
        ``umtam`` adds :data:`UMTAM_SETTINGS`."""
        out = asdict(self)
        if self.optimizer == "adamw":
            del out["optimizer"]
        elif self.optimizer in UMTAM_VARIANTS:
            out["umtam"] = dict(UMTAM_VARIANTS[self.optimizer])
        return out


def finetune_expert(
    base_dir: str | Path,
    task: TextTask,
    out_dir: str | Path,
    *,
    recipe: FinetuneRecipe,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Fine-tune ``base_dir`` on ``task.train`` and write the expert folder ``out_dir``.

    ``on_step(step, loss)`` is called after each optimizer step (for a progress bar). Returns
    ``{"losses": [...], "seconds": wall time, "cpu_seconds": CPU time of all threads,
    "optimizer": recipe.optimizer}``; with ``adamw+recorder`` or ``umtam`` the encoder folder also
    gets its curvature sidecar (module docstring).
    """
    from transformers import AutoTokenizer

    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    encoder = load_encoder(base_dir).train()  # train(): dropout on, as in ordinary fine-tuning
    head = nn.Linear(encoder.config.hidden_size, len(task.labels))
    optimizer = _optimizer(recipe, encoder, head)
    recorder = None
    if recipe.optimizer == "adamw+recorder":
        from mergeforge.train import CurvatureRecorder

        recorder = CurvatureRecorder(encoder, optimizer=optimizer, keep_exp_avg_sq=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 - t / recipe.steps)
    batches = _batches(len(task.train), recipe.batch_size, recipe.steps, recipe.seed)

    start, cpu_start, losses = time.perf_counter(), time.process_time(), []
    for step, idx in enumerate(batches, 1):
        texts = [task.train[i][0] for i in idx]
        labels = torch.tensor([task.train[i][1] for i in idx])
        logits = head(
            sentence_embedding(encoder, tokenize(tokenizer, texts, max_length=recipe.max_length))
        )
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    out_dir = Path(out_dir)
    encoder.eval().save_pretrained(out_dir / ENCODER_DIR)
    tokenizer.save_pretrained(out_dir / ENCODER_DIR)
    save_head(head, task.labels, out_dir)
    seen = recipe.steps * recipe.batch_size  # examples the steps saw (with repeats)
    if recorder is not None:
        recorder.close()
        recorder.save(out_dir / ENCODER_DIR, examples=seen)
    elif recipe.optimizer in UMTAM_VARIANTS:
        _export_umtam(optimizer, encoder, out_dir / ENCODER_DIR, examples=seen)
    return {"losses": losses, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "optimizer": recipe.optimizer}  # fmt: skip


def _optimizer(recipe: FinetuneRecipe, encoder: nn.Module, head: nn.Linear):
    """The recipe's optimizer over the encoder (``lr``) and the head (``head_lr``)."""
    if recipe.optimizer in UMTAM_VARIANTS:
        from mergeforge.train import UMTAM

        groups = [
            {"params": list(encoder.named_parameters()), "lr": recipe.lr},
            {"params": [(f"head.{n}", p) for n, p in head.named_parameters()],
             "lr": recipe.head_lr},
        ]  # fmt: skip
        return UMTAM(groups, lr=recipe.lr, weight_decay=recipe.weight_decay,
                     seed=recipe.seed, **UMTAM_VARIANTS[recipe.optimizer])  # fmt: skip
    return torch.optim.AdamW(
        [
            {"params": list(encoder.parameters()), "lr": recipe.lr},
            {"params": list(head.parameters()), "lr": recipe.head_lr},
        ],
        weight_decay=recipe.weight_decay,
    )


def _export_umtam(optimizer, encoder: nn.Module, folder: Path, *, examples: int) -> Path:
    """Write the encoder's part of ``optimizer``'s curvature (not the head's) as ``folder``'s
    curvature sidecar; parameters never stepped get UMTAM's initial statistics (module
    docstring)."""
    from mergeforge.train import Curvature, CurvatureMeta, save_curvature

    tensors, meta = optimizer.curvature_state(examples=examples)
    fields: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, field = key.rpartition(":")
        fields.setdefault(name, {})[field] = t
    eps = optimizer.defaults["eps"]
    stats = {}
    for name, p in encoder.named_parameters():
        if name in fields:
            stats[name] = Curvature(**fields[name])
        elif p.dim() >= 2:
            m, n = p.shape[0], p.numel() // p.shape[0]
            stats[name] = Curvature(R=torch.full((m,), eps), C=torch.full((n,), eps))
        else:
            stats[name] = Curvature(R=torch.zeros(p.shape))
    info = CurvatureMeta(
        variant=meta["variant"],
        steps=int(meta["steps"]),
        source=meta["source"],
        beta2=float(meta["beta2"]),
        examples=examples,
    )
    return save_curvature(folder, stats, info)


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` index batches walking through seeded permutations of ``range(n)`` (epochs)."""
    gen = torch.Generator().manual_seed(seed)
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        flat += torch.randperm(n, generator=gen).tolist()
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]
