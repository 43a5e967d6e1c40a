"""Fine-tune one text expert: the whole encoder plus a linear head on mean-pooled embeddings.

An expert folder holds ``encoder/`` (a Hugging Face folder with the base's exact tensor names and
tokenizer, so experts of one base merge tensor by tensor), ``head.safetensors`` and ``labels.json``
(see :mod:`mergeforge.evaluate.text.eval`). Training is seeded: AdamW, one learning rate for the
encoder and a larger one for the freshly initialised head, linear decay to zero, dropout on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from mergeforge.evaluate.text.eval import (
    load_encoder,
    save_head,
    sentence_embedding,
    tokenize,
)
from mergeforge.evaluate.text.tasks import TextTask

ENCODER_DIR = "encoder"


@dataclass(frozen=True)
class FinetuneRecipe:
    steps: int = 30
    batch_size: int = 32
    max_length: int = 64
    lr: float = 1e-4
    head_lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "max_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"FinetuneRecipe.{key} must be >= 1, got {getattr(self, key)}")

    def to_dict(self) -> dict:
        return asdict(self)


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
    ``{"losses": [...], "seconds": wall time, "cpu_seconds": CPU time of all threads}``.
    """
    from transformers import AutoTokenizer

    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    encoder = load_encoder(base_dir).train()  # train(): dropout on, as in ordinary fine-tuning
    head = nn.Linear(encoder.config.hidden_size, len(task.labels))
    optimizer = torch.optim.AdamW(
        [
            {"params": list(encoder.parameters()), "lr": recipe.lr},
            {"params": list(head.parameters()), "lr": recipe.head_lr},
        ],
        weight_decay=recipe.weight_decay,
    )
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
    return {"losses": losses, "seconds": seconds, "cpu_seconds": cpu_seconds}


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` index batches walking through seeded permutations of ``range(n)`` (epochs)."""
    gen = torch.Generator().manual_seed(seed)
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        flat += torch.randperm(n, generator=gen).tolist()
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]
