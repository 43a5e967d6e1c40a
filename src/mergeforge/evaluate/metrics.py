"""The one accuracy: every suite and the quick start score a model with it (the pool's
arithmetic over several tasks — averages, normalized accuracy — is in :mod:`.pool`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def accuracy(scores: Tensor, labels: Sequence[int] | Tensor) -> float:
    """Top-1 accuracy: the fraction of rows of ``scores`` (N, K: logits or probabilities) whose
    argmax equals the label (ties: the lowest index). ``ValueError`` when the counts differ or
    there is nothing to score."""
    labels = torch.as_tensor(labels)
    if scores.shape[0] != labels.shape[0] or labels.numel() == 0:
        raise ValueError(f"{scores.shape[0]} predictions for {labels.shape[0]} labels")
    return (scores.argmax(-1) == labels).float().mean().item()
