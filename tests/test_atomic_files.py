"""Atomic files: an interruption leaves the old file or the new one, and killed writers' leftovers go."""

from __future__ import annotations

from pathlib import Path

import pytest

from convzoo.atomic_files import atomic_path, atomic_write_text, remove_stale_temporaries


def test_an_interrupted_block_leaves_nothing_and_a_completed_one_replaces(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as temporary:
        temporary.write_text("{")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    atomic_write_text(target, "{}")
    assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".checkpoint.safetensors.123.abcd.tmp").write_bytes(b"half")  # SIGKILL leaves this behind
    (tmp_path / "metrics.csv").write_text("epoch\n1\n")
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
