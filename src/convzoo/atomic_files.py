"""Files written so that an interruption at any moment leaves the old version or the new one, never part of one."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A new temporary path in ``path``'s folder for the block to write; ``os.replace``d over ``path`` when the
    block completes (after an fsync), removed when it raises. So an interruption at any moment leaves the old
    file or the new one, never part of one (a killed process leaves the temporary file: see
    ``remove_stale_temporaries``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``Path(path).write_text(text)`` through ``atomic_path``."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, newline="")
    return Path(path)


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete the temporary files ``atomic_path`` leaves behind when its process is killed (``.<name>.*.tmp``)."""
    for stale in Path(folder).glob(".*.tmp"):
        stale.unlink(missing_ok=True)
