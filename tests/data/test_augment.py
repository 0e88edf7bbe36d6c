"""BatchAugment: the one-gather crop/flip equals torchvision's pad-crop-flip, normalization is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from convzoo.data.augment import BatchAugment, parse_augment


def _reference(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-image torchvision ops: zero pad, crop at the offset, flip."""
    out = []
    height, width = images.shape[-2:]
    for image, (top, left), flip in zip(images, offsets.tolist(), flips.tolist()):
        padded = F.pad(image, (pad, pad, pad, pad))
        crop = TF.crop(padded, top, left, height, width)
        out.append(TF.horizontal_flip(crop) if flip else crop)
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(5, 3, 32, 32), (4, 1, 7, 9), (3, 3, 8, 5)])
def test_crop_flip_matches_torchvision(shape: tuple[int, int, int, int]) -> None:
    images = torch.randint(0, 256, shape, dtype=torch.uint8)
    augment = BatchAugment([0.0] * shape[1], [1.0] * shape[1], "crop_flip")
    draws = augment.draw_epoch(shape[0], torch.Generator().manual_seed(3))
    out = augment(images, draws.offsets, draws.flips, dtype=torch.float64)
    expected = _reference(images, draws.offsets, draws.flips, 4).double()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_normalization_is_exact_in_float64() -> None:
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = [10.0, 20.0, 30.0], [2.0, 4.0, 8.0]
    out = BatchAugment(mean, std, "none")(images, dtype=torch.float64)
    expected = (images.double() - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=1e-12)


def test_modes_draw_what_they_say() -> None:
    generator = torch.Generator().manual_seed(0)
    crop = BatchAugment([0.0], [1.0], "crop").draw_epoch(200, generator)
    assert not crop.flips.any() and crop.offsets.min() == 0 and crop.offsets.max() == 8
    flip = BatchAugment([0.0], [1.0], "flip").draw_epoch(200, generator)
    assert flip.flips.any() and (flip.offsets == 0).all()
    images = torch.randint(0, 256, (6, 1, 5, 5), dtype=torch.uint8)
    out = BatchAugment([0.0], [1.0], "flip")(images, flip.offsets[:6], flip.flips[:6], dtype=torch.float64)
    torch.testing.assert_close(out, _reference(images, flip.offsets[:6], flip.flips[:6], 0).double())


def test_channels_last_output() -> None:
    images = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8)
    out = BatchAugment([0.0] * 3, [1.0] * 3)(images, memory_format=torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="augment must be one of"):
        parse_augment("rotate")
    with pytest.raises(ValueError, match="padding must be >= 0"):
        BatchAugment([0.0], [1.0], padding=-1)
    with pytest.raises(ValueError, match="std > 0"):
        BatchAugment([0.0], [0.0])
    assert parse_augment(True) == "crop_flip" and parse_augment(False) == "none"
