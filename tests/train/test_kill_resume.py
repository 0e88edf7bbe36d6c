"""SIGKILL mid-epoch, then --resume: the same final weights as an uninterrupted run (slow)."""

from __future__ import annotations

import csv
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


COMPARE = [
    "compare",
    "--model",
    "test_tiny",
    "--convs",
    "standard",
    "--seeds",
    "2",
    *ARGS[3:13],  # fake data, 16x16, subsets, batch 8
    "--epochs",
    "4",
    "--progress",
    "false",
    "--device",
    "cpu",
    "--deterministic",
    "--checkpoint-every",
    "3",
]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_compare_stopped_in_its_second_run_then_rerun_matches(tmp_path: Path, signum: int) -> None:
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    run = [sys.executable, str(ENTRY), *COMPARE, "--output"]
    subprocess.run([*run, str(reference)], check=True, env=_env(), timeout=600, capture_output=True)
    process = subprocess.Popen(
        [*run, str(stopped)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None and not (stopped / "standard-s1").exists():
        time.sleep(0.005)
    assert process.poll() is None, "the comparison finished before it could be stopped"
    process.send_signal(signum)
    _, err = process.communicate(timeout=600)
    if signum == signal.SIGINT:  # Ctrl-C: one line, no traceback, exit code 130
        assert process.returncode == 130
        assert err == "convzoo compare: interrupted; rerun the same command to continue (finished runs are reused)\n"
    else:
        assert process.returncode == -signal.SIGKILL
    rerun = subprocess.run([*run, str(stopped)], check=True, env=_env(), timeout=600, capture_output=True, text=True)
    assert f"reusing finished run {stopped / 'standard-s0'}" in rerun.stdout
    assert "training test_tiny conv=standard seed=1" in rerun.stdout
    for seed in (0, 1):
        expected = load_checkpoint(reference / f"standard-s{seed}" / "checkpoint.safetensors")
        got = load_checkpoint(stopped / f"standard-s{seed}" / "checkpoint.safetensors")
        assert got.meta["epoch"] == 4
        for key, value in expected.model.items():
            assert torch.equal(got.model[key], value), (seed, key)
        epochs = [line.split(",")[0] for line in (stopped / f"standard-s{seed}" / "metrics.csv").read_text().split()]
        assert epochs == ["epoch", "1", "2", "3", "4"]
    columns = ("top1_mean", "top1_per_seed", "seeds")
    with (reference / "compare.csv").open() as a, (stopped / "compare.csv").open() as b:
        assert [[r[c] for c in columns] for r in csv.DictReader(a)] == [
            [r[c] for c in columns] for r in csv.DictReader(b)
        ]
    assert not list(stopped.rglob(".*.tmp"))
