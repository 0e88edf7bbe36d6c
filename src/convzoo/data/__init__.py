"""Datasets and fast in-memory augmentation.

Every source decodes once into an ``ImageSet`` (one uint8 tensor, cached on disk as
safetensors); ``TensorLoader`` serves augmented, normalized batches on the training device.
"""

from convzoo.data import caltech  # noqa: F401  (registers the caltech101 / caltech256 sources)
from convzoo.data.augment import AUGMENTS, BatchAugment, parse_augment
from convzoo.data.images import ImageSet
from convzoo.data.loader import TensorLoader
from convzoo.data.sources import list_datasets, load_imageset, register_dataset

__all__ = [
    "AUGMENTS",
    "BatchAugment",
    "ImageSet",
    "TensorLoader",
    "list_datasets",
    "load_imageset",
    "parse_augment",
    "register_dataset",
]
