"""SIGKILL mid-epoch, then --resume: the same final weights as an uninterrupted run (slow)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from convzoo.train.checkpoint import load_checkpoint

ENTRY = Path(__file__).parent / "entry.py"
ARGS = [
    "train",
    "--model",
    "test_tiny",
    "--data",
    "fake",
    "--image-size",
    "16",
    "--train-subset",
    "16",
    "--test-subset",
    "2",
    "--batch-size",
    "8",
    "--epochs",
    "3",
    "--scheduler",
    "onecycle",
    "--ema",
    "0.9",
    "--progress",
    "false",
    "--device",
    "cpu",
    "--deterministic",
    "--checkpoint-every",
    "3",
]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}


@pytest.mark.slow
def test_sigkill_then_resume_matches(tmp_path: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run([sys.executable, str(ENTRY), *ARGS, "--output", str(reference)], check=True, env=_env(), timeout=600)
    process = subprocess.Popen([sys.executable, str(ENTRY), *ARGS, "--output", str(killed)], env=_env())
    checkpoint = killed / "checkpoint.safetensors"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if (
            checkpoint.exists()
            and load_checkpoint(checkpoint).meta["step"] > 0
            and (load_checkpoint(checkpoint).meta["epoch"] >= 1)
        ):
            break
        time.sleep(0.01)
    assert process.poll() is None, "training finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    cut = load_checkpoint(checkpoint).meta
    # killed after it started and before it ended; usually mid-epoch, but a checkpoint written at the next
    # epoch boundary (step 0) between the last poll and the kill is as valid a place to resume from
    assert (cut["epoch"], cut["step"]) > (0, 0) and cut["epoch"] < 3, cut
    subprocess.run(
        [sys.executable, str(ENTRY), *ARGS, "--output", str(killed), "--resume"], check=True, env=_env(), timeout=600
    )
    expected, got = load_checkpoint(reference / "checkpoint.safetensors"), load_checkpoint(checkpoint)
    assert got.meta["epoch"] == 3
    for key, value in expected.model.items():
        assert torch.equal(got.model[key], value), key
    for key, value in (expected.ema or {}).items():
        assert torch.equal(got.ema[key], value), key
