"""evaluate(): top-1, top-5, per-class accuracy and mean loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from convzoo.train.metrics import evaluate, topk_correct


def test_topk_and_per_class() -> None:
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
    labels = torch.tensor([0, 2, 0, 1])
    assert topk_correct(logits, labels, 1).tolist() == [True, False, False, False]
    assert topk_correct(logits, labels, 5).tolist() == [True, True, False, True]
    model = nn.Identity()
    batches = [(logits[:3], labels[:3]), (logits[3:], labels[3:])]
    result = evaluate(model, batches, num_classes=4)
    assert (result.top1, result.top5, result.count) == (0.25, 0.75, 4)
    assert result.per_class[0] == 0.5 and result.per_class[1:3] == [0.0, 0.0] and math.isnan(result.per_class[3])
    expected = nn.functional.cross_entropy(logits, labels).item()
    assert result.loss == pytest.approx(expected)


def test_restores_training_mode_and_needs_batches() -> None:
    model = nn.Linear(2, 2).train()
    evaluate(model, [(torch.randn(3, 2), torch.tensor([0, 1, 0]))], num_classes=2)
    assert model.training
    with pytest.raises(ValueError, match="no batches"):
        evaluate(model, [], num_classes=2)
