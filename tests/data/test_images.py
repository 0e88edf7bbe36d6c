"""ImageSet validation, subsets and channel statistics."""

from __future__ import annotations

import pytest
import torch

from convzoo.data import ImageSet


def test_channel_stats_match_torch() -> None:
    images = torch.randint(0, 256, (10, 3, 5, 4), dtype=torch.uint8)
    mean, std = ImageSet(images, torch.zeros(10, dtype=torch.long), ["x"]).channel_stats()
    values = images.double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), values.mean(1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(
        torch.tensor(std, dtype=torch.float64), values.std(1, unbiased=False), rtol=1e-9, atol=1e-9
    )


def test_subset_takes_first_of_each_class_in_order() -> None:
    labels = torch.tensor([0, 1, 0, 1, 0, 2, 2])
    data = ImageSet(torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1), labels, ["a", "b", "c"])
    sub = data.subset(2)
    assert sub.images.flatten().tolist() == [0, 1, 2, 3, 5, 6]


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="uint8"):
        ImageSet(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        ImageSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match="labels must lie in"):
        ImageSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), ["a"])
