"""DDP under torchrun (2 gloo processes) matches one process with the same global batch (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convzoo.train.checkpoint import load_checkpoint
from convzoo.train.distributed import all_reduce_sum, resolve_device, setup

ENTRY = Path(__file__).parent / "entry.py"
ARGS = [
    "train",
    "--model",
    "test_tiny_nobn",
    "--data",
    "fake",
    "--image-size",
    "8",
    "--train-subset",
    "8",
    "--test-subset",
    "2",
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--lr",
    "0.1",
    "--progress",
    "false",
    "--device",
    "cpu",
    "--seed",
    "3",
]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    single, double = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(ENTRY), *ARGS, "--output", str(single)], check=True, env=_env(), timeout=600)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ENTRY),
        *ARGS,
        "--output",
        str(double),
    ]
    subprocess.run(command, check=True, env=_env(), timeout=600)
    one = load_checkpoint(single / "checkpoint.safetensors")
    two = load_checkpoint(double / "checkpoint.safetensors")
    assert two.meta["world_size"] == 2 and one.meta["world_size"] == 1
    for key, value in one.model.items():
        torch.testing.assert_close(two.model[key], value, rtol=1e-5, atol=1e-6)
    # and training moved the weights, so the comparison is not vacuous
    assert one.meta["metrics"]["train_loss"] > 0


def test_single_process_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = setup("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert torch.equal(all_reduce_sum(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda, cuda:N or mps, got 'tpu9'"):
        resolve_device("tpu9")
