"""Evaluate a saved checkpoint: rebuild its model, check it fits, run it on its data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convzoo.data import BatchAugment, TensorLoader, load_imageset
from convzoo.train.checkpoint import load_checkpoint
from convzoo.train.config import config_from_json
from convzoo.train.distributed import resolve_device
from convzoo.train.engine import model_from_checkpoint
from convzoo.train.metrics import evaluate


def evaluate_checkpoint(
    path: str | Path,
    *,
    model: str | None = None,
    conv: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    ema: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Top-1/top-5/per-class accuracy of the checkpoint at ``path`` (file or run folder).

    ``model``/``conv``, when given, must match the checkpoint's (else ValueError): a
    checkpoint from another model is refused, never half loaded.
    """
    import json

    path = Path(path)
    checkpoint = load_checkpoint(path)
    meta = checkpoint.meta
    if not meta:
        raise ValueError(f"{path} holds bare weights without run facts; evaluate a convzoo training checkpoint")
    for key, wanted in (("model", model), ("conv", conv)):
        if wanted is not None and meta[key] != wanted:
            raise ValueError(f"checkpoint {path} is for {key}={meta[key]!r}, not {key}={wanted!r}")
    config = config_from_json(json.dumps(meta["config"]))
    network = model_from_checkpoint(checkpoint, path, ema=ema)
    target = resolve_device(device)
    network.to(target)
    same_data = data in (None, meta["data"])
    images = load_imageset(
        data or meta["data"],
        split,
        data_dir=data_dir or config.data_dir,
        image_size=config.image_size,
        cache_dir=config.cache_dir,
        num_classes=config.num_classes if same_data else None,  # as trained (e.g. fake data's class count)
    )
    subset = config.test_subset if split == "test" else config.train_subset
    if subset and data is None:  # the same slice the run was evaluated on
        images = images.subset(subset)
    if images.image_shape != tuple(meta["image_shape"]):
        raise ValueError(
            f"data images are {images.image_shape} but the checkpoint was trained on {meta['image_shape']}"
        )
    num_classes = int(meta["num_classes"])
    if images.num_classes > num_classes:  # labels past the classifier: cross_entropy would fail deep in torch
        raise ValueError(
            f"data {data or meta['data']!r} has {images.num_classes} classes but the checkpoint {path} has "
            f"num_classes={num_classes}; evaluate it on data with at most {num_classes} classes"
        )
    loader = TensorLoader(
        images, 256, BatchAugment(meta["mean"], meta["std"], "none"), shuffle=False, drop_last=False, device=target
    )
    result = evaluate(network, loader, num_classes)
    # the class names of the data evaluated on (the checkpoint's are those of the data it was trained on)
    classes = (meta.get("classes") if same_data else None) or images.classes
    return {
        "model": meta["model"],
        "conv": meta["conv"],
        "data": data or meta["data"],
        "split": split,
        "count": result.count,
        "top1": result.top1,
        "top5": result.top5,
        "loss": result.loss,
        "classes": classes[: len(result.per_class)],
        "per_class": result.per_class[: len(classes)],
    }
