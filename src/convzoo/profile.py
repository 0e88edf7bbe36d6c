"""Parameter and MAC counts (MACs = FLOPs / 2 from ``torch.utils.flop_counter``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32), *, batch_size: int = 1) -> int:
    """Multiply-accumulates of one eval-mode forward pass per image, counted as FLOPs / 2.

    Args:
        model: any module; it is run once in eval mode and its mode is restored.
        input_size: (C, H, W) of one image.
    """
    training = model.training
    model.eval()
    try:
        parameter = next(model.parameters(), None)
        like = {"device": parameter.device, "dtype": parameter.dtype} if parameter is not None else {}
        x = torch.zeros(batch_size, *input_size, **like)
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(training)
    return counter.get_total_flops() // 2 // batch_size
