"""Shared pytest set-up: deterministic seeds and one intra-op thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    # One intra-op thread: the unit tests use tiny tensors, where a second thread only adds
    # synchronisation, and on a shared 2-core machine oversubscribed float64 convs get 10-40x slower.
    torch.set_num_threads(1)
