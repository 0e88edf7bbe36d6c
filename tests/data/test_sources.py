"""Data sources: digits, fake, imagefolder (decode, cache, errors), imagenet32 npz, torchvision layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from convzoo.data import list_datasets, load_imageset


def test_digits_split_is_fixed_and_disjoint() -> None:
    train, test = load_imageset("digits", "train"), load_imageset("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.image_shape == (3, 32, 32) and train.images.dtype == torch.uint8
    assert train.classes == [str(c) for c in range(10)]
    assert torch.equal(load_imageset("digits", "test").images, test.images)


def test_fake_is_deterministic_and_sized() -> None:
    a = load_imageset("fake", "train", image_size=8, num_classes=3)
    b = load_imageset("fake", "train", image_size=8, num_classes=3)
    assert a.image_shape == (3, 8, 8) and a.num_classes == 3 and torch.equal(a.images, b.images)


def _folder(root: Path, sizes: dict[str, tuple[int, int]] | None = None) -> None:
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(3):
                height, width = (sizes or {}).get(f"{split}/{name}/{index}", (6, 5))
                write_png(
                    torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator),
                    str(folder / f"{index:04d}.png"),
                )


def test_imagefolder_decodes_exactly_and_caches(tmp_path: Path) -> None:
    _folder(tmp_path / "data")
    cache = tmp_path / "cache"
    data = load_imageset("imagefolder", "train", data_dir=tmp_path / "data", cache_dir=cache)
    assert data.classes == ["cat", "dog"] and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    from torchvision.io import read_image

    torch.testing.assert_close(data.images[4], read_image(str(tmp_path / "data/train/dog/0001.png")))
    assert len(list(cache.iterdir())) == 1
    again = load_imageset("imagefolder", "train", data_dir=tmp_path / "data", cache_dir=cache)
    assert torch.equal(again.images, data.images)


def test_a_named_data_set_reads_an_imagefolder_copy_with_its_class_count(tmp_path: Path) -> None:
    root, cache = tmp_path / "cifar10-jpeg", tmp_path / "cache"
    for split in ("train", "test"):
        for index in range(10):
            (root / split / f"class{index}").mkdir(parents=True)
            write_png(torch.full((3, 4, 4), index, dtype=torch.uint8), str(root / split / f"class{index}" / "0.png"))
    assert torch.equal(  # cifar10 pointed at an ImageFolder copy reads it as one
        load_imageset("cifar10", "test", data_dir=root, cache_dir=cache).labels,
        load_imageset("imagefolder", "test", data_dir=root, cache_dir=cache).labels,
    )
    # a copy of another data set is refused, not trained on under the wrong name
    with pytest.raises(ValueError, match=r"--data cifar100 has 100 classes, but .* has 10 \(class0, .*imagefolder"):
        load_imageset("cifar100", "train", data_dir=root, cache_dir=cache)
    _folder(tmp_path / "two")
    with pytest.raises(ValueError, match=r"--data stl10 has 10 classes, but .* has 2 \(cat, dog\)"):
        load_imageset("stl10", "train", data_dir=tmp_path / "two", cache_dir=cache)


def test_imagefolder_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    _folder(tmp_path / "data", {"train/dog/2": (9, 9)})
    with pytest.raises(ValueError, match="pass --image-size"):
        load_imageset("imagefolder", "train", data_dir=tmp_path / "data", cache_dir=tmp_path / "c")
    data = load_imageset("imagefolder", "train", data_dir=tmp_path / "data", cache_dir=tmp_path / "c", image_size=4)
    assert data.image_shape == (3, 4, 4)


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    _folder(tmp_path / "data")
    bad = tmp_path / "data/train/dog/0001.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"cannot decode image .*dog/0001.png"):
        load_imageset("imagefolder", "train", data_dir=tmp_path / "data", cache_dir=tmp_path / "c")


def test_missing_data_says_the_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"expected root/train/<class>/<image>"):
        load_imageset("imagefolder", "train", data_dir=tmp_path / "nowhere")
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        load_imageset("imagefolder", "train", data_dir=tmp_path / "flat")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_imageset("cifar10", "train", data_dir=tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="train_data_batch_1.npz"):
        load_imageset("imagenet32", "train", data_dir=tmp_path)


def test_imagenet32_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (5, 3 * 32 * 32), dtype=np.uint8)
    np.savez(tmp_path / "train_data_batch_1.npz", data=data, labels=np.array([1, 2, 3, 1000, 5]))
    np.savez(tmp_path / "train_data_batch_2.npz", data=data[:2], labels=np.array([7, 8]))
    loaded = load_imageset("imagenet32", "train", data_dir=tmp_path, cache_dir=tmp_path / "c")
    assert len(loaded) == 7 and loaded.num_classes == 1000
    assert loaded.labels.tolist() == [0, 1, 2, 999, 4, 6, 7]
    assert torch.equal(loaded.images[1], torch.from_numpy(data[1]).view(3, 32, 32))


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown data 'mnist'; known: "):
        load_imageset("mnist", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_imageset("digits", "val")
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        load_imageset("digits", "train", image_size=0)
    assert {"cifar10", "cifar100", "stl10", "imagefolder", "imagenet32", "digits", "fake"} <= set(list_datasets())


def test_both_splits_label_a_class_alike(tmp_path: Path) -> None:
    """Each split used to index its own sorted class folders: a test split without 'cat' labelled its dogs
    0 (cat); Jupyter's hidden .ipynb_checkpoints folder in train became class 0 and shifted every label."""
    _folder(tmp_path / "data")
    root = tmp_path / "data"
    for image in (root / "test/cat").iterdir():
        image.unlink()
    (root / "test/cat").rmdir()
    (root / "train/.ipynb_checkpoints").mkdir()
    train = load_imageset("imagefolder", "train", data_dir=root, cache_dir=tmp_path / "c")
    test = load_imageset("imagefolder", "test", data_dir=root, cache_dir=tmp_path / "c")
    assert train.classes == test.classes == ["cat", "dog"]
    assert test.labels.tolist() == [1, 1, 1]
    (root / "test/zebra").mkdir()
    write_png(torch.zeros(3, 6, 5, dtype=torch.uint8), str(root / "test/zebra/0.png"))
    with pytest.raises(ValueError, match=r"has class folders \['zebra'\] that the train split has not"):
        load_imageset("imagefolder", "test", data_dir=root, cache_dir=tmp_path / "c")


def test_a_class_folder_added_later_is_not_served_from_a_stale_cache(tmp_path: Path) -> None:
    _folder(tmp_path / "data")
    root, cache = tmp_path / "data", tmp_path / "c"
    assert load_imageset("imagefolder", "test", data_dir=root, cache_dir=cache).labels.tolist() == [0, 0, 0, 1, 1, 1]
    (root / "train/aardvark").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*aardvark holds no image files"):
        load_imageset("imagefolder", "train", data_dir=root, cache_dir=cache)
    write_png(torch.zeros(3, 6, 5, dtype=torch.uint8), str(root / "train/aardvark/0.png"))
    test = load_imageset("imagefolder", "test", data_dir=root, cache_dir=cache)
    assert test.classes == ["aardvark", "cat", "dog"] and test.labels.tolist() == [1, 1, 1, 2, 2, 2]


def test_other_image_formats_decode_like_pil(tmp_path: Path) -> None:
    """BMP / PPM / TIFF were listed as image suffixes but refused; a 16-bit PNG wrapped modulo 256; an
    animated GIF's frames broke the batch."""
    from PIL import Image

    _folder(tmp_path / "data")
    folder = tmp_path / "data/train/cat"
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    for suffix in ("bmp", "ppm", "tiff"):
        Image.fromarray(rgb).save(folder / f"x.{suffix}")
    Image.fromarray(np.full((6, 5), 51500, dtype=np.uint16)).save(folder / "y16.png")
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(folder / "z.gif", save_all=True, append_images=frames[1:])
    data = load_imageset("imagefolder", "train", data_dir=tmp_path / "data", cache_dir=tmp_path / "c")
    names = sorted(p.name for p in folder.iterdir())
    by_name = {name: data.images[index] for index, name in enumerate(names)}
    for suffix in ("bmp", "ppm", "tiff"):
        torch.testing.assert_close(by_name[f"x.{suffix}"], torch.from_numpy(rgb).permute(2, 0, 1))
    assert by_name["y16.png"].unique().tolist() == [51500 >> 8]  # torchvision scales 16 to 8 bits by a shift
    expected_gif = np.asarray(Image.open(folder / "z.gif").convert("RGB"))  # the first frame (GIF palette)
    torch.testing.assert_close(by_name["z.gif"], torch.from_numpy(expected_gif.copy()).permute(2, 0, 1))


def test_a_failed_download_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, --download used to end in a urllib traceback (URLError is an OSError, not a RuntimeError)."""
    import urllib.error

    import torchvision.datasets as tvd

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(FileNotFoundError, match=r"cifar10: --download failed .*Name or service not known.*by hand"):
        load_imageset("cifar10", "train", data_dir=tmp_path / "empty", download=True)
