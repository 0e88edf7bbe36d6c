"""On-disk cache of decoded ``ImageSet``s: safetensors (no pickle), written atomically."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from convzoo.atomic_files import atomic_path
from convzoo.data.images import ImageSet


def default_cache_dir() -> Path:
    """``$CONVZOO_CACHE`` or ``~/.cache/convzoo/tensors``."""
    return Path(os.environ.get("CONVZOO_CACHE", Path.home() / ".cache" / "convzoo" / "tensors"))


def cache_key(*parts: object) -> str:
    """A short hex digest of ``parts`` (JSON-encoded), naming one cache file."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def write_cache(path: Path, data: ImageSet) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``: readers never see half a file."""
    tensors = {"images": data.images.contiguous(), "labels": data.labels.contiguous()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={"classes": json.dumps(data.classes)})


def read_cache(path: Path) -> ImageSet | None:
    """Read a cache file; None when it is missing or unreadable (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        return ImageSet(tensors["images"], tensors["labels"], json.loads(metadata["classes"]))
    except Exception:  # any damage (truncation, foreign file, SafetensorError): rebuild the cache
        return None
