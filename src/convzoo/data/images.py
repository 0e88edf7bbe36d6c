"""``ImageSet``: a labelled image data set held in memory as one uint8 tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ImageSet:
    """Images decoded once into memory.

    Attributes:
        images: (N, C, H, W) uint8, channels RGB (or 1 for grey).
        labels: (N,) int64 class indices in ``[0, len(classes))``.
        classes: class names, index = label.
    """

    images: Tensor
    labels: Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise TypeError(f"images must be a (N, C, H, W) uint8 tensor, got {_describe(self.images)}")
        if not isinstance(self.labels, Tensor) or self.labels.dim() != 1:
            raise TypeError(f"labels must be a (N,) tensor, got {_describe(self.labels)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.long()
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(
                f"labels must lie in [0, {len(self.classes)}), got [{self.labels.min()}, {self.labels.max()}]"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, count: int) -> ImageSet:
        """The first ``count`` images of each class, in order, as a fixed small slice for tests."""
        keep = torch.cat([torch.nonzero(self.labels == c).flatten()[:count] for c in range(self.num_classes)])
        keep = keep.sort().values
        return ImageSet(self.images[keep], self.labels[keep], list(self.classes))

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the pixels, in 0..255 units (computed in chunks, float64)."""
        channels = self.images.shape[1]
        total = torch.zeros(channels, dtype=torch.float64)
        squares = torch.zeros(channels, dtype=torch.float64)
        for chunk in self.images.split(4096):
            values = chunk.transpose(0, 1).reshape(channels, -1).double()
            total += values.sum(1)
            squares += values.square().sum(1)
        count = max(1, self.images.numel() // channels)
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
        return mean.tolist(), std.tolist()


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
