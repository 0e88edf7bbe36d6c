"""Registers the tiny test models for tests/train and tests/commands."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: F401
