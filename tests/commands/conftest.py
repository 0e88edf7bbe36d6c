"""The tiny test models of tests/train, for the command tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
import tiny_models  # noqa: F401
