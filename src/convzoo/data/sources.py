"""Data sources: each turns (split, data_dir, options) into an ``ImageSet`` decoded once.

``load_imageset(name, split, ...)`` is the single entry point; decoded sets of files on
disk (imagefolder, imagenet32, cifar/stl10 through torchvision) are cached as
safetensors under ``cache_dir`` so later runs skip decoding.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from convzoo.data.cache import cache_key, default_cache_dir, read_cache, write_cache
from convzoo.data.images import ImageSet

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def default_data_dir(name: str) -> Path:
    """``$CONVZOO_DATA/<name>`` or ``~/.cache/convzoo/data/<name>``."""
    root = Path(os.environ.get("CONVZOO_DATA", Path.home() / ".cache" / "convzoo" / "data"))
    return root / name


def resize_images(images: Tensor, size: int | None) -> Tensor:
    """(N, C, H, W) uint8 -> (N, C, size, size) uint8, antialiased bilinear; no-op when already that size."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    chunks = []
    for chunk in images.split(1024):
        resized = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        chunks.append(resized.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(chunks)


# ---------------------------------------------------------------- embedded / synthetic
def digits(split: str, *, image_size: int | None = 32, **_: object) -> ImageSet:
    """scikit-learn's bundled 8x8 digits (1,797 images), upscaled to 32x32 RGB; a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)  # (N, 1, 8, 8)
    size = image_size or 32
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    images = pixels.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0, stratify=bunch.target)
    keep = torch.from_numpy(np.sort(train if split == "train" else test))
    return ImageSet(images[keep], labels[keep], [str(c) for c in range(10)])


def fake(
    split: str, *, image_size: int | None = 32, num_classes: int | None = 10, size: int | None = None, **_: object
) -> ImageSet:
    """Deterministic synthetic images: a class-dependent colour plus noise, so models can learn it."""
    classes = num_classes or 10
    count = size or (512 if split == "train" else 128)
    side = image_size or 32
    generator = torch.Generator().manual_seed(0 if split == "train" else 1)
    labels = torch.arange(count) % classes
    palette = torch.rand(classes, 3, 1, 1, generator=torch.Generator().manual_seed(42)) * 160 + 48
    noise = torch.randn(count, 3, side, side, generator=generator) * 40
    images = (palette[labels] + noise).round().clamp(0, 255).to(torch.uint8)
    return ImageSet(images, labels, [f"class{c}" for c in range(classes)])


# ---------------------------------------------------------------- folders of image files
def _split_dir(root: Path, split: str) -> Path:
    names = ("train",) if split == "train" else ("test", "val", "valid", "validation")
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(
        f"no {split!r} split under {root}: expected the ImageFolder layout {root}/train/<class>/<image> and "
        f"{root}/test/<class>/<image> (or val/)"
    )


def _class_folders(split_dir: Path) -> list[str]:
    """The class folder names of a split, sorted (hidden folders such as Jupyter's .ipynb_checkpoints skipped)."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"no class folders in {split_dir}: expected {split_dir}/<class>/<image>")
    return classes


def _list_images(split_dir: Path, classes: list[str], *, every_class: bool) -> list[tuple[Path, int]]:
    """(image, label) of a split, labels indexing ``classes``: the TRAIN split's classes, so that both splits
    label a class alike even when the test split lacks one. A class folder the train split does not have, or
    (``every_class``: the train split) a class folder without images, is refused (labels would silently shift
    or a class never be seen)."""
    present = _class_folders(split_dir)
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise ValueError(
            f"{split_dir} has class folders {unknown} that the train split has not ({classes}): "
            "every class must be a folder of the train split"
        )
    index = {name: label for label, name in enumerate(classes)}
    files = []
    for name in present:
        images = [p for p in sorted((split_dir / name).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images and every_class:
            raise ValueError(f"class folder {split_dir / name} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        files += [(path, index[name]) for path in images]
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {split_dir}")
    return files


def _decode(path: Path) -> Tensor:
    """One image as (3, H, W) uint8: torchvision's decoders (JPEG, PNG, WebP, GIF), PIL for the other formats
    (BMP, PPM / PGM, TIFF); 16-bit images scaled to 8 bits, an animated GIF's first frame."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import to_dtype

    try:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        image = decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as error:
        image = _decode_with_pil(path, error)
    if image.dim() == 4:  # an animated GIF: (frames, 3, H, W)
        image = image[0]
    if image.dtype != torch.uint8:  # a 16-bit PNG decodes to uint16
        image = to_dtype(image, torch.uint8, scale=True)
    return image


def _decode_with_pil(path: Path, error: Exception) -> Tensor:
    """(3, H, W) uint8 through PIL, for the formats torchvision cannot decode; ValueError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as pil_error:
        raise ValueError(f"cannot decode image {path}: {str(error).splitlines()[0]} ({pil_error})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _decode_files(files: list[tuple[Path, int]], image_size: int | None) -> Tensor:
    """Decode into one preallocated (N, 3, H, W) uint8 tensor; every image must share a size unless resized."""
    first = resize_images(_decode(files[0][0]).unsqueeze(0), image_size)[0]
    images = torch.empty((len(files), *first.shape), dtype=torch.uint8)
    for index, (path, _label) in enumerate(files):
        image = first if index == 0 else _decode(path)
        if tuple(image.shape) != tuple(first.shape):
            if image_size is None:
                raise ValueError(
                    f"image {path} is {tuple(image.shape[1:])} but {files[0][0]} is {tuple(first.shape[1:])}; "
                    "pass --image-size to resize them all"
                )
            image = resize_images(image.unsqueeze(0), image_size)[0]
        images[index] = image
    return images


def imagefolder(
    split: str, *, data_dir: Path | None, image_size: int | None = None, cache_dir: Path | None = None, **_: object
) -> ImageSet:
    """Any ``root/{train,test}/<class>/<image>`` tree (test may be named val); decoded once, then cached."""
    if data_dir is None:
        raise FileNotFoundError("--data-dir is required for imagefolder data (root/train/<class>/<image>)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist: expected root/train/<class>/<image>")
    classes = _class_folders(_split_dir(root, "train"))
    files = _list_images(_split_dir(root, split), classes, every_class=split == "train")
    stats = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p, _ in files]
    key = cache_key("imagefolder", str(root.resolve()), split, image_size, classes, stats)
    return _cached(
        cache_dir,
        f"imagefolder-{split}-{key}",
        lambda: ImageSet(_decode_files(files, image_size), torch.tensor([label for _, label in files]), classes),
    )


def _cached(cache_dir: Path | None, name: str, build: Callable[[], ImageSet]) -> ImageSet:
    path = Path(cache_dir or default_cache_dir()) / f"{name}.safetensors"
    data = read_cache(path)
    if data is None:
        data = build()
        try:
            write_cache(path, data)
        except OSError as error:  # a read-only cache location only costs speed
            print(f"convzoo: could not write the data cache {path}: {error}")
    return data


# ---------------------------------------------------------------- torchvision and ImageNet32 formats
_CLASS_COUNTS = {"cifar10": 10, "cifar100": 100, "stl10": 10}


def _torchvision(name: str) -> Callable[..., ImageSet]:
    def load(
        split: str,
        *,
        data_dir: Path | None,
        image_size: int | None = None,
        download: bool = False,
        cache_dir: Path | None = None,
        **_: object,
    ) -> ImageSet:
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir(name)
        if (root / "train").is_dir():  # an ImageFolder copy, e.g. ../shared/data/cifar10-jpeg
            classes = _class_folders(root / "train")
            if len(classes) != _CLASS_COUNTS[name]:  # e.g. --data cifar100 on a CIFAR-10 copy
                raise ValueError(
                    f"--data {name} has {_CLASS_COUNTS[name]} classes, but the ImageFolder copy at {root} has "
                    f"{len(classes)} ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}): "
                    "pass the --data it holds, or --data imagefolder for a folder of any classes"
                )
            return imagefolder(split, data_dir=root, image_size=image_size, cache_dir=cache_dir)
        import torchvision.datasets as tvd

        folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "stl10": "stl10_binary"}[name]
        try:
            with _download_timeout():
                if name == "stl10":
                    dataset = tvd.STL10(str(root), split=split, download=download)
                    images = torch.from_numpy(dataset.data)
                    labels = torch.from_numpy(dataset.labels.astype(np.int64))
                else:
                    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
                    dataset = cls(str(root), train=split == "train", download=download)
                    images, labels = torch.from_numpy(dataset.data).permute(0, 3, 1, 2), torch.tensor(dataset.targets)
        except OSError as error:  # no network, a refused or timed-out connection (URLError, socket.timeout)
            raise FileNotFoundError(
                f"{name}: --download failed ({str(error).splitlines()[0]}); put torchvision's {root}/{folder}/ there "
                f"by hand, or an ImageFolder copy {root}/train/<class>/<image>"
            ) from None
        except RuntimeError as error:
            raise FileNotFoundError(
                f"{name} not found under {root}: expected torchvision's {root}/{folder}/ (pass --download when "
                f"online) or an ImageFolder copy {root}/train/<class>/<image> ({str(error).splitlines()[0]})"
            ) from None
        return ImageSet(resize_images(images.contiguous(), image_size), labels, list(dataset.classes))

    return load


@contextlib.contextmanager
def _download_timeout(seconds: float = 60.0) -> Iterator[None]:
    """A socket timeout for torchvision's downloads (its urlopen has none: a blocked network would hang)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(previous if previous is not None else seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def imagenet32(
    split: str, *, data_dir: Path | None, image_size: int | None = None, cache_dir: Path | None = None, **_: object
) -> ImageSet:
    """Downsampled ImageNet 32x32 (Chrabaszcz et al. 2017), npz batches: ``train_data_batch_<i>.npz``,
    ``val_data.npz`` with ``data`` (N, 3072) uint8 in CHW order and ``labels`` 1..1000. Read with
    ``allow_pickle=False``; the pickled variant of the release is refused."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir("imagenet32")
    pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
    files = sorted(root.rglob(pattern), key=lambda p: (len(p.name), p.name))
    if not files:
        raise FileNotFoundError(
            f"no {pattern} under {root}: expected the npz release of ImageNet32x32 "
            "(train_data_batch_1.npz ... train_data_batch_10.npz and val_data.npz)"
        )
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]

    def build() -> ImageSet:
        images, labels = [], []
        for path in files:
            with np.load(path, allow_pickle=False) as batch:
                data = batch["data"]
                side = round((data.shape[1] // 3) ** 0.5)
                images.append(torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, side, side))
                labels.append(torch.from_numpy(batch["labels"].astype(np.int64)) - 1)
        return ImageSet(resize_images(torch.cat(images), image_size), torch.cat(labels), [str(c) for c in range(1000)])

    return _cached(cache_dir, f"imagenet32-{split}-{cache_key(stats, image_size)}", build)


DATASETS: dict[str, Callable[..., ImageSet]] = {
    "cifar10": _torchvision("cifar10"),
    "cifar100": _torchvision("cifar100"),
    "stl10": _torchvision("stl10"),
    "imagefolder": imagefolder,
    "imagenet32": imagenet32,
    "digits": digits,
    "fake": fake,
}


def register_dataset(name: str) -> Callable[[Callable[..., ImageSet]], Callable[..., ImageSet]]:
    """Decorator adding a source ``fn(split, *, data_dir, image_size, download, cache_dir, num_classes)``."""

    def decorator(fn: Callable[..., ImageSet]) -> Callable[..., ImageSet]:
        DATASETS[name] = fn
        return fn

    return decorator


def list_datasets() -> list[str]:
    """Names accepted by ``load_imageset``."""
    return sorted(DATASETS)


def load_imageset(
    name: str,
    split: str,
    *,
    data_dir: str | Path | None = None,
    image_size: int | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
    num_classes: int | None = None,
) -> ImageSet:
    """Load split ``"train"`` or ``"test"`` of data set ``name`` into memory as uint8.

    Raises:
        ValueError: unknown name or split, a corrupt image (named), inconsistent image sizes.
        FileNotFoundError: missing data, with the layout that was expected.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data {name!r}; known: {', '.join(list_datasets())}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    return DATASETS[name](
        split,
        data_dir=Path(data_dir) if data_dir is not None else None,
        image_size=image_size,
        download=download,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        num_classes=num_classes,
    )
