"""Caltech protocol: the seeded 2,000-image test split, on generated folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from convzoo.data.caltech import caltech_datasets, caltech_split, load_caltech


def _make_folder(root: Path, counts: dict[str, int], *, size: tuple[int, int] = (12, 9)) -> Path:
    """A Caltech-like folder: one sub-folder per class, varied sizes, one greyscale image per class."""
    for label, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            w, h = size[0] + i % 3, size[1] + label
            mode = "L" if i == 0 else "RGB"
            color = (label * 40 + i) % 256 if mode == "L" else ((label * 40) % 256, i % 256, 7)
            Image.new(mode, (w, h), color).save(root / name / f"{i:04d}.jpg")
    return root


def test_split_is_disjoint_complete_and_seeded() -> None:
    train, test = caltech_split(9145)
    assert len(test) == 2000 and len(train) == 7145
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(9145))
    again_train, again_test = caltech_split(9145)
    assert torch.equal(again_test, test) and torch.equal(again_train, train)
    _, other_test = caltech_split(9145, seed=1)
    assert not torch.equal(other_test, test)
    assert torch.equal(test, test.sort().values)


def test_split_does_not_depend_on_global_rng() -> None:
    torch.manual_seed(123)
    first = caltech_split(500, test_size=50)[1]
    torch.manual_seed(456)
    assert torch.equal(caltech_split(500, test_size=50)[1], first)


@pytest.mark.parametrize(("num_images", "test_size"), [(10, 0), (10, 10), (10, 11), (10, -1)])
def test_split_rejects_bad_test_size(num_images: int, test_size: int) -> None:
    with pytest.raises(ValueError, match=rf"test_size must be an int in \[1, {num_images - 1}\].*got {test_size}"):
        caltech_split(num_images, test_size=test_size)


def test_split_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="num_images must be an int >= 2, got 1"):
        caltech_split(1, test_size=1)
    with pytest.raises(TypeError, match="seed must be an int, got '0'"):
        caltech_split(10, test_size=2, seed="0")


def test_datasets_on_a_generated_folder(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "caltech", {"accordion": 7, "BACKGROUND_Google": 5, "zebra": 8})
    train, test = caltech_datasets(root, test_size=6, seed=3)
    assert len(train) == 14 and len(test) == 6
    assert set(train.indices).isdisjoint(test.indices)
    assert train.dataset.classes == ["BACKGROUND_Google", "accordion", "zebra"]
    image, label = test[0]
    assert image.mode == "RGB" and 0 <= label < 3
    # same folder, same seed: same files in the test set, whatever the transforms
    _, again = caltech_datasets(root, test_size=6, seed=3, test_transform=lambda im: im.size)
    assert [again.dataset.samples[i] for i in again.indices] == [test.dataset.samples[i] for i in test.indices]


def test_load_caltech_imageset(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "c101", {"ant": 4, "bee": 6})
    test = load_caltech("test", data_dir=root, image_size=8, test_size=3, seed=0)
    train = load_caltech("train", data_dir=root, image_size=8, test_size=3, seed=0)
    assert test.images.shape == (3, 3, 8, 8) and train.images.shape == (7, 3, 8, 8)
    assert test.images.dtype == torch.uint8 and test.classes == ["ant", "bee"]
    _, expected = caltech_datasets(root, test_size=3, seed=0)
    assert test.labels.tolist() == [expected.dataset.targets[i] for i in expected.indices]


def test_missing_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no Caltech folder at"):
        caltech_datasets(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="--data-dir is required"):
        load_caltech("train", data_dir=None)
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        load_caltech("val", data_dir=tmp_path)
