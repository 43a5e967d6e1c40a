"""The one accuracy helper against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from mergeforge.evaluate.metrics import accuracy


def test_accuracy_by_hand():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0], [5.0, -1.0]])
    # argmax: 0, 1, 0 (tie -> lowest index), 0
    assert accuracy(logits, [0, 1, 1, 1]) == 0.5
    with pytest.raises(ValueError, match="3 labels"):
        accuracy(logits, [0, 1, 1])


def test_accuracy_takes_probabilities_and_label_tensors():
    probs = torch.tensor([[0.75, 0.25], [0.6, 0.4], [0.25, 0.75]])
    assert accuracy(probs, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="0 labels"):
        accuracy(torch.empty(0, 2), [])
