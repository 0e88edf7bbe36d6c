"""Evaluation: loss, top-1, top-5 and per-class accuracy over a loader."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class EvalResult:
    """Accuracies are fractions in [0, 1]; ``per_class[c]`` is the top-1 accuracy on class c (nan if absent)."""

    loss: float
    top1: float
    top5: float
    count: int
    per_class: list[float]


def topk_correct(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """(B,) bool: whether the label is among the ``k`` highest logits (B, num_classes)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Run ``model`` in eval mode over ``batches`` of (inputs, labels); restores its training mode."""
    training = model.training
    model.eval()
    loss_sum = correct1 = correct5 = None
    class_correct = class_count = None
    count = 0
    try:
        for inputs, labels in batches:
            device_type = inputs.device.type
            with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = model(inputs)
            logits = logits.float()
            loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
            top1 = topk_correct(logits, labels, 1)
            top5 = topk_correct(logits, labels, 5)
            if loss_sum is None:
                zeros = torch.zeros((), device=logits.device)
                loss_sum, correct1, correct5 = zeros.clone(), zeros.clone(), zeros.clone()
                class_correct = torch.zeros(num_classes, device=logits.device)
                class_count = torch.zeros(num_classes, device=logits.device)
            loss_sum += loss
            correct1 += top1.sum()
            correct5 += top5.sum()
            class_correct.index_add_(0, labels, top1.float())
            class_count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float))
            count += len(labels)
    finally:
        model.train(training)
    if count == 0:
        raise ValueError("evaluate() got no batches")
    per_class = (class_correct / class_count).tolist()  # nan where a class has no sample
    return EvalResult(loss_sum.item() / count, correct1.item() / count, correct5.item() / count, count, per_class)
