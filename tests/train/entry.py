"""``python tests/train/entry.py <convzoo args>``: the convzoo command with the tiny test models registered
(used by the multi-process and kill/resume tests, also under torchrun)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: F401

from convzoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
