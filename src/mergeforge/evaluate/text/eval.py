"""Accuracy of a text encoder plus a linear head on ``(text, label)`` examples.

The encoder is a Hugging Face encoder (``BertModel`` in the quick start); a sentence embedding is
the attention-masked mean of its last hidden states, as all-MiniLM-L6-v2 was trained with. A task
head is a plain ``nn.Linear(hidden, K)`` saved as ``head.safetensors`` (``weight`` (K, H),
``bias`` (K,)) beside ``labels.json`` (the label names, index = class id).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mergeforge.errors import CheckpointError
from mergeforge.evaluate.metrics import accuracy

HEAD_FILE = "head.safetensors"
LABELS_FILE = "labels.json"


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` (B, T, H) over the positions where ``mask`` (B, T) is 1 -> (B, H)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def tokenize(tokenizer, texts: Sequence[str], *, max_length: int) -> dict[str, Tensor]:
    """Pad to the longest text of the batch, truncate at ``max_length`` tokens."""
    return tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )


def sentence_embedding(encoder: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """(B, H) mean-pooled embeddings of one tokenized batch (keeps gradients: used in training)."""
    return mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"])


@torch.inference_mode()
def embed(
    encoder: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 64,
    batch_size: int = 64,
) -> Tensor:
    """(N, H) embeddings of ``texts`` in eval mode (no dropout), in the order given."""
    was_training = encoder.training
    encoder.eval()
    # Batch texts of similar length together: far less padding, same result.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    for start in range(0, len(order), batch_size):
        batch = tokenize(
            tokenizer, [texts[i] for i in order[start : start + batch_size]], max_length=max_length
        )
        chunks.append(sentence_embedding(encoder, batch).float())
    encoder.train(was_training)
    out = torch.empty(len(texts), chunks[0].shape[1]) if chunks else torch.empty(0, 0)
    if chunks:
        out[torch.tensor(order)] = torch.cat(chunks)
    return out


@torch.inference_mode()
def head_accuracy(head: nn.Linear, embeddings: Tensor, labels: Sequence[int]) -> float:
    return accuracy(head(embeddings.to(head.weight.dtype)), labels)


def evaluate_accuracy(
    encoder: nn.Module,
    tokenizer,
    head: nn.Linear,
    examples: Sequence[tuple[str, int]],
    *,
    max_length: int = 64,
    batch_size: int = 64,
) -> float:
    """Accuracy of ``head(mean_pool(encoder(text)))`` on ``(text, label)`` examples."""
    texts = [t for t, _ in examples]
    emb = embed(encoder, tokenizer, texts, max_length=max_length, batch_size=batch_size)
    return head_accuracy(head, emb, [y for _, y in examples])


def save_head(head: nn.Linear, labels: Sequence[str], folder: str | Path) -> None:
    if head.out_features != len(labels):
        raise ValueError(f"head has {head.out_features} outputs for {len(labels)} labels")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}
    save_file(tensors, folder / HEAD_FILE)
    (folder / LABELS_FILE).write_text(json.dumps(list(labels)) + "\n")


def load_head(folder: str | Path) -> tuple[nn.Linear, tuple[str, ...]]:
    """The ``nn.Linear`` head and label names saved by :func:`save_head` in ``folder``."""
    folder = Path(folder)
    try:
        tensors = load_file(folder / HEAD_FILE)
        labels = tuple(json.loads((folder / LABELS_FILE).read_text()))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot read {HEAD_FILE} / {LABELS_FILE}: {exc}") from exc
    k, h = tensors["weight"].shape
    if k != len(labels):
        raise CheckpointError(f"{folder / HEAD_FILE}: {k} outputs for {len(labels)} labels")
    head = nn.Linear(h, k)
    head.load_state_dict(tensors)
    return head.eval(), labels


def load_encoder(folder: str | Path) -> nn.Module:
    """The Hugging Face encoder in ``folder``; every weight must come from its files."""
    from transformers import AutoModel

    try:
        model, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)
    except OSError as exc:
        raise CheckpointError(f"{folder}: not a loadable Hugging Face model folder: {exc}") from exc
    if info["missing_keys"] or info["mismatched_keys"]:
        raise CheckpointError(
            f"{folder}: weights missing {sorted(info['missing_keys'])[:5]} or mismatched "
            f"{list(info['mismatched_keys'])[:5]}; the folder does not hold a full "
            f"{type(model).__name__}"
        )
    return model.eval()
