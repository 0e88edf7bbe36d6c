"""``TensorLoader``: batches of an in-memory ``ImageSet``, sharded like ``DistributedSampler``.

The order of epoch ``e`` comes from ``torch.utils.data.DistributedSampler`` (seeded with
``seed`` and ``e``), and each sample's crop/flip is drawn per epoch from a generator
seeded with ``(seed, e)``. So a batch's content depends only on (seed, epoch, step):
``k`` processes with batch ``B/k`` see exactly the samples and augmentations one process
sees with batch ``B``, and a resumed run can start mid-epoch by skipping steps.

Batches are augmented a chunk of batches at a time (about ``chunk_bytes`` of output):
each op then runs once per chunk rather than once per batch, which cuts per-op launch
and thread-synchronization costs on CPU and kernel launches on GPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from convzoo.data.augment import BatchAugment
from convzoo.data.images import ImageSet


def gather_rows(source: Tensor, rows: Tensor, device: torch.device) -> Tensor:
    """``source[rows]``, gathered into page-locked memory when it is headed for a CUDA device.

    A copy from pinned memory can run asynchronously (``non_blocking=True``); one from the pageable
    result of a plain ``index_select`` cannot, so pinning the source alone gains nothing. torch's caching
    host allocator keeps each pinned buffer alive until its copy has finished.
    """
    if device.type != "cuda":
        return source.index_select(0, rows)
    out = torch.empty((len(rows), *source.shape[1:]), dtype=source.dtype, pin_memory=True)
    return torch.index_select(source, 0, rows, out=out)


class TensorLoader:
    """Iterate ``(inputs, labels)`` batches: inputs (B, C, H, W) float on ``device``, labels (B,) int64.

    Args:
        data: the images.
        batch_size: per-process batch size.
        augment: the ``BatchAugment`` (its mode decides crop/flip; normalization always).
        shuffle: reshuffle every epoch (training) or keep order (evaluation).
        drop_last: drop the last partial batch (training).
        seed: base seed of order and augmentation.
        rank, world_size: this process's shard; every rank gets the same number of samples
            (``DistributedSampler`` pads by repeating samples when shuffling and drops nothing).
        device, dtype, memory_format: where and how batches are delivered.
        chunk_bytes: size of the output augmented in one go (several batches, sliced as views).
    """

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        augment: BatchAugment,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        memory_format: torch.memory_format = torch.contiguous_format,
        chunk_bytes: int = 64 << 20,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.data, self.batch_size, self.augment = data, batch_size, augment
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype, self.memory_format = dtype, memory_format
        self.chunk_bytes = chunk_bytes
        # With shuffle off and one process there is nothing to pad: evaluate every sample once.
        self.sampler: DistributedSampler | None = None
        if shuffle or world_size > 1:
            self.sampler = DistributedSampler(
                range(len(data)), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
            )
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select epoch ``epoch`` (its order and augmentation) and skip its first ``start_step`` batches."""
        self.epoch, self.start_step = epoch, start_step

    def _indices(self) -> Tensor:
        if self.sampler is None:
            return torch.arange(len(self.data))
        self.sampler.set_epoch(self.epoch)
        return torch.tensor(list(iter(self.sampler)), dtype=torch.long)

    @property
    def num_samples(self) -> int:
        """Samples this process sees per epoch (before ``drop_last``)."""
        return len(self.data) if self.sampler is None else self.sampler.num_samples

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        indices = self._indices()
        draws = None
        if self.augment.mode != "none":
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            draws = self.augment.draw_epoch(len(self.data), generator)
        non_blocking = self.device.type == "cuda"
        size, steps = self.batch_size, len(self)
        per_batch = size * self.data.images[0].numel() * torch.finfo(self.dtype).bits // 8
        group = max(1, self.chunk_bytes // max(per_batch, 1))
        for first in range(self.start_step, steps, group):
            last = min(first + group, steps)
            chunk = indices[first * size : last * size]
            images = gather_rows(self.data.images, chunk, self.device).to(self.device, non_blocking=non_blocking)
            labels = gather_rows(self.data.labels, chunk, self.device).to(self.device, non_blocking=non_blocking)
            offsets = flips = None
            if draws is not None:
                offsets, flips = draws.offsets[chunk], draws.flips[chunk]
            inputs = self.augment(images, offsets, flips, dtype=self.dtype, memory_format=self.memory_format)
            for start in range(0, len(chunk), size):
                yield inputs[start : start + size], labels[start : start + size]
