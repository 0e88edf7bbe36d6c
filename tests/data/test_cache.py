"""The decode cache: safetensors round trip, atomic write, damaged files are rebuilt."""

from __future__ import annotations

from pathlib import Path

import torch

from convzoo.data.cache import read_cache, write_cache
from convzoo.data.images import ImageSet


def test_round_trip_and_no_temporaries(tmp_path: Path) -> None:
    data = ImageSet(torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8), torch.tensor([0, 1, 1, 0]), ["x", "y"])
    path = tmp_path / "sub" / "set.safetensors"
    write_cache(path, data)
    loaded = read_cache(path)
    assert loaded is not None and loaded.classes == ["x", "y"]
    assert torch.equal(loaded.images, data.images) and torch.equal(loaded.labels, data.labels)
    assert [p.name for p in path.parent.iterdir()] == ["set.safetensors"]


def test_missing_or_damaged_cache_reads_as_none(tmp_path: Path) -> None:
    assert read_cache(tmp_path / "none.safetensors") is None
    damaged = tmp_path / "bad.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert read_cache(damaged) is None
