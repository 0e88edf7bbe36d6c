"""Batched augmentation on uint8 image tensors, on the training device.

Pad-4 random crop and horizontal flip are one ``gather`` on the zero-padded uint8
batch (the flip is folded into the column index), followed by one fused
``addcmul`` doing the float conversion and normalization. The random draws are made
per *sample* for a whole epoch (``draw_epoch``), so a sample gets the same crop
whichever process, batch or resumed run it lands in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

AUGMENTS = ("crop_flip", "crop", "flip", "none")


def parse_augment(value: str | bool) -> str:
    """Normalize an ``augment`` setting: True -> "crop_flip", False -> "none"; else one of AUGMENTS."""
    if value is True:
        return "crop_flip"
    if value is False or value is None:
        return "none"
    if value not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)} (or true/false), got {value!r}")
    return value


@dataclass(frozen=True)
class EpochDraws:
    """Per-sample random choices of one epoch: crop offsets (N, 2) in [0, 2*pad] and flips (N,) bool."""

    offsets: Tensor
    flips: Tensor


class BatchAugment:
    """Augment and normalize uint8 batches: (B, C, H, W) uint8 -> (B, C, H, W) float.

    Args:
        mean, std: per-channel statistics in 0..255 pixel units.
        mode: "crop_flip" (pad ``padding`` with zeros, random crop back, random flip),
            "crop" (no flip), "flip" (no crop) or "none" (normalize only; used for evaluation).
        padding: crop padding in pixels.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], mode: str = "crop_flip", *, padding: int = 4
    ) -> None:
        self.mode = parse_augment(mode)
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need one value per channel and std > 0, got {mean} and {std}")
        self.padding = padding if self.mode in ("crop_flip", "crop") else 0
        self.scale = torch.tensor([1.0 / s for s in std]).view(1, -1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, -1, 1, 1)

    def draw_epoch(self, count: int, generator: torch.Generator) -> EpochDraws:
        """Random crops and flips for ``count`` samples, from ``generator`` (on the CPU)."""
        offsets = torch.randint(0, 2 * self.padding + 1, (count, 2), generator=generator)
        flips = torch.rand(count, generator=generator) < 0.5
        if self.mode in ("none", "crop"):
            flips = torch.zeros_like(flips)
        return EpochDraws(offsets, flips)

    def __call__(
        self,
        images: Tensor,
        offsets: Tensor | None = None,
        flips: Tensor | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> Tensor:
        """Augment one batch.

        Args:
            images: (B, C, H, W) uint8 on the target device.
            offsets: (B, 2) crop offsets (row, column) in [0, 2*padding]; None = centre (no shift).
            flips: (B,) bool horizontal flips; None = no flip.
        """
        batch, channels, height, width = images.shape
        device = images.device
        if self.mode != "none" and (offsets is not None or flips is not None):
            pad = self.padding
            if offsets is None:
                offsets = torch.full((batch, 2), pad, dtype=torch.long)
            offsets = offsets.to(device)
            columns = torch.arange(width, device=device).expand(batch, width)
            if flips is not None:
                columns = torch.where(flips.to(device)[:, None], width - 1 - columns, columns)
            columns = columns + offsets[:, 1:]
            rows = torch.arange(height, device=device) + offsets[:, :1]
            padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
            index = rows[:, :, None] * (width + 2 * pad) + columns[:, None, :]
            flat = padded.reshape(batch, channels, -1)
            images = flat.gather(2, index.view(batch, 1, -1).expand(batch, channels, -1))
            images = images.view(batch, channels, height, width)
        scale, shift = self.scale.to(device, dtype), self.shift.to(device, dtype)
        out = torch.addcmul(shift, images.to(dtype), scale)
        return out.contiguous(memory_format=memory_format)
