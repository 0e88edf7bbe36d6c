"""TensorLoader: sharding reproduces one process's global batches; resuming mid-epoch skips exactly."""

from __future__ import annotations

import pytest
import torch

from convzoo.data import BatchAugment, ImageSet, TensorLoader
from convzoo.data.loader import gather_rows


def _data(count: int = 48) -> ImageSet:
    images = torch.randint(0, 256, (count, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return ImageSet(images, torch.arange(count) % 4, ["a", "b", "c", "d"])


def _batches(loader: TensorLoader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch, start)
    return list(loader)


def test_two_shards_make_the_global_batch() -> None:
    data, augment = _data(), BatchAugment([100.0] * 3, [50.0] * 3, "crop_flip")
    single = TensorLoader(data, 8, augment, seed=5)
    shards = [TensorLoader(data, 4, augment, seed=5, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        whole = _batches(single, epoch)
        parts = [_batches(s, epoch) for s in shards]
        assert len(whole) == len(parts[0]) == len(parts[1]) == 6
        for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
            # DistributedSampler interleaves: rank r holds positions r, r+2, ... of the global order.
            torch.testing.assert_close(x[0::2], x0, rtol=0, atol=0)
            torch.testing.assert_close(x[1::2], x1, rtol=0, atol=0)
            assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


def test_epochs_differ_and_resume_skips_steps() -> None:
    loader = TensorLoader(_data(), 8, BatchAugment([0.0] * 3, [1.0] * 3, "crop_flip"), seed=2)
    first, second = _batches(loader, 0), _batches(loader, 1)
    assert not torch.equal(first[0][1], second[0][1])
    resumed = _batches(loader, 0, start=4)
    assert len(resumed) == 2
    for (x, y), (xr, yr) in zip(first[4:], resumed):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_evaluation_order_covers_every_sample_once() -> None:
    data = _data(21)
    loader = TensorLoader(data, 8, BatchAugment([0.0] * 3, [1.0] * 3, "none"), shuffle=False, drop_last=False)
    labels = torch.cat([y for _, y in loader])
    assert len(loader) == 3 and torch.equal(labels, data.labels)
    images = torch.cat([x for x, _ in loader])
    torch.testing.assert_close(images, data.images.float())


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TensorLoader(_data(), 0, BatchAugment([0.0] * 3, [1.0] * 3))


def test_chunking_does_not_change_batches() -> None:
    data, augment = _data(), BatchAugment([100.0] * 3, [50.0] * 3, "crop_flip")
    one_by_one = TensorLoader(data, 8, augment, seed=4, chunk_bytes=1)
    chunked = TensorLoader(data, 8, augment, seed=4, chunk_bytes=3 * 8 * 3 * 6 * 6 * 4)  # three batches a chunk
    for start in (0, 2):
        for (x, y), (xc, yc) in zip(_batches(one_by_one, 1, start), _batches(chunked, 1, start)):
            assert torch.equal(x, xc) and torch.equal(y, yc)
    partial = TensorLoader(_data(21), 8, augment, shuffle=False, drop_last=False, chunk_bytes=1 << 20)
    assert [len(y) for _, y in partial] == [8, 8, 5]


def test_rows_bound_for_cuda_are_gathered_into_pinned_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a pinned source of the host-to-device copy makes ``non_blocking=True`` asynchronous."""
    source, rows = torch.arange(24.0).view(6, 4), torch.tensor([4, 0, 2])
    pinned = []

    def empty(*args, pin_memory: bool = False, **kwargs):  # CPU-only machine: record, do not pin
        pinned.append(pin_memory)
        return torch.zeros(*args, **kwargs)

    assert torch.equal(gather_rows(source, rows, torch.device("cpu")), source[rows]) and not pinned
    monkeypatch.setattr(torch, "empty", empty)
    assert torch.equal(gather_rows(source, rows, torch.device("cuda")), source[rows])
    assert pinned == [True]
