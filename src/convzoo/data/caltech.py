"""The DDS paper's Caltech-101 / Caltech-256 protocol: a fixed, seeded random test split of 2,000 images.

The data sets ship as one folder per class with no official split (Caltech-101:
``101_ObjectCategories/<class>/<image>``, 102 classes with ``BACKGROUND_Google``, 9,145 images;
Caltech-256: ``256_ObjectCategories/<class>/<image>``, 257 classes with ``257.clutter``, 30,607
images). The paper draws 2,000 test images at random from all of them and trains on the rest.

The split here depends only on the sorted file list (torchvision ``ImageFolder`` order: classes
sorted by folder name, files sorted by name) and the seed: ``torch.randperm`` under a
``torch.Generator`` seeded with ``seed`` picks the test positions. The same folder and seed give
the same split on every machine and torch version that keeps ``randperm``'s stream.

Two ways in:

* :func:`caltech_datasets` returns torchvision ``Subset``s of ``ImageFolder`` with your transforms
  (the classic loader pipeline);
* the ``caltech101`` / ``caltech256`` sources of ``convzoo.data.load_imageset`` (registered on
  import of this module) decode the split once into an in-memory ``ImageSet``, each image resized
  on its shorter side to ``image_size`` (default 224) and centre-cropped square.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder

from convzoo.data.images import ImageSet
from convzoo.data.sources import register_dataset

TEST_SIZE = 2000
DEFAULT_IMAGE_SIZE = 224


def caltech_split(num_images: int, *, test_size: int = TEST_SIZE, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices of a seeded random split of ``num_images`` into train and ``test_size`` test images.

    Returns:
        (train, test): sorted int64 index tensors, disjoint, together ``range(num_images)``.

    Raises:
        ValueError: ``test_size`` is not in [1, num_images - 1].
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
        raise ValueError(f"num_images must be an int >= 2, got {num_images!r}")
    if isinstance(test_size, bool) or not isinstance(test_size, int) or not 1 <= test_size < num_images:
        raise ValueError(
            f"test_size must be an int in [1, {num_images - 1}] (some images must remain for training), "
            f"got {test_size!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return order[test_size:].sort().values, order[:test_size].sort().values


def _image_folder(root: str | Path, transform: Callable | None = None) -> ImageFolder:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"no Caltech folder at {root}: expected the extracted layout <root>/<class>/<image> "
            "(e.g. 101_ObjectCategories or 256_ObjectCategories); it cannot be downloaded here"
        )
    return ImageFolder(str(root), transform=transform)


def caltech_datasets(
    root: str | Path,
    *,
    test_size: int = TEST_SIZE,
    seed: int = 0,
    train_transform: Callable | None = None,
    test_transform: Callable | None = None,
) -> tuple[Subset, Subset]:
    """Train and test ``Subset``s of ``ImageFolder(root)`` under the paper's protocol.

    Args:
        root: a folder of class folders of images.
        test_size: number of test images (2,000 in the paper).
        seed: the split's seed.
        train_transform, test_transform: applied to PIL images of each subset.

    Returns:
        (train, test) subsets; both expose ``.dataset.classes``.
    """
    train_folder = _image_folder(root, train_transform)
    test_folder = _image_folder(root, test_transform)
    train, test = caltech_split(len(train_folder.samples), test_size=test_size, seed=seed)
    return Subset(train_folder, train.tolist()), Subset(test_folder, test.tolist())


def _decode_square(path: str, size: int) -> Tensor:
    """(3, size, size) uint8: RGB, shorter side resized to ``size`` (antialiased), centre-cropped."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as TF

    try:
        image = decode_image(path, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"cannot decode image {path}: {str(error).splitlines()[0]}") from None
    image = TF.resize(image, size, antialias=True)
    return TF.center_crop(image, [size, size])


def load_caltech(
    split: str,
    *,
    data_dir: Path | None,
    image_size: int | None = None,
    test_size: int = TEST_SIZE,
    seed: int = 0,
    **_: object,
) -> ImageSet:
    """One split (``"train"`` / ``"test"``) of a Caltech folder as an in-memory ``ImageSet``."""
    if data_dir is None:
        raise FileNotFoundError("--data-dir is required for Caltech data (<root>/<class>/<image>)")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = _image_folder(data_dir)
    train, test = caltech_split(len(folder.samples), test_size=test_size, seed=seed)
    size = image_size or DEFAULT_IMAGE_SIZE
    keep = (train if split == "train" else test).tolist()
    images = torch.empty((len(keep), 3, size, size), dtype=torch.uint8)
    for row, index in enumerate(keep):
        images[row] = _decode_square(folder.samples[index][0], size)
    labels = torch.tensor([folder.targets[i] for i in keep], dtype=torch.long)
    return ImageSet(images, labels, list(folder.classes))


for _name in ("caltech101", "caltech256"):
    register_dataset(_name)(load_caltech)
