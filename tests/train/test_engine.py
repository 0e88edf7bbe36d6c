"""The training loop on tiny models and fake data: outputs, resume equality, divergence, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from convzoo.train.checkpoint import load_checkpoint
from convzoo.train.config import TrainConfig
from convzoo.train.engine import Trainer, TrainingDivergedError, autocast_dtype, train

TINY = {
    "model": "test_tiny",
    "data": "fake",
    "image_size": 8,
    "train_subset": 8,
    "test_subset": 4,
    "batch_size": 16,
    "lr": 0.05,
    "progress": False,
    "scheduler": "cosine",
}


def _config(tmp_path: Path, name: str = "run", **changes: object) -> TrainConfig:
    return TrainConfig(**{**TINY, "output": str(tmp_path / name), **changes})


def test_run_writes_everything(tmp_path: Path) -> None:
    result = train(_config(tmp_path, epochs=2, ema=0.9, channels_last=True))
    files = {p.name for p in result.run_dir.iterdir()}
    assert {"checkpoint.safetensors", "config.yaml", "metrics.csv", "results.json", "curves.png"} <= files
    rows = list(csv.DictReader((result.run_dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and "ema_top1" in rows[0]
    assert result.final is not None and result.final.count == 40
    summary = json.loads((result.run_dir / "results.json").read_text())
    assert summary["top1"] == result.final.top1 and len(summary["per_class"]) == 10
    checkpoint = load_checkpoint(result.checkpoint)
    assert checkpoint.meta["epoch"] == 2 and checkpoint.meta["model"] == "test_tiny" and checkpoint.ema is not None
    for key, value in result.model.state_dict().items():
        assert torch.equal(checkpoint.model[key], value)


class _KilledError(Exception):
    pass


def test_mid_epoch_resume_is_exact(tmp_path: Path) -> None:
    whole = train(_config(tmp_path, "whole", epochs=2, scheduler="onecycle", ema=0.5))
    config = _config(tmp_path, "cut", epochs=2, scheduler="onecycle", ema=0.5, checkpoint_every=2)
    trainer = Trainer(config)
    assert len(trainer.train_loader) == 5
    step, calls = trainer._train_step, []

    def dies_in_epoch_two(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        if len(calls) == 9:  # the 4th step of epoch 2, after its step-2 checkpoint
            raise _KilledError
        return step(inputs, labels)

    trainer._train_step = dies_in_epoch_two
    with pytest.raises(_KilledError):
        trainer.fit()
    assert load_checkpoint(config.output_dir() / "checkpoint.safetensors").meta["step"] == 2
    resumed = Trainer(config, resume="auto")
    assert (resumed.start_epoch, resumed.start_step) == (1, 2)
    result = resumed.fit()
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[key], value, rtol=0, atol=0)
    assert resumed.ema is not None and whole.rows[-1]["ema_top1"] == result.rows[-1]["ema_top1"]
    assert [int(r["epoch"]) for r in result.rows] == [1, 2]
    finished = Trainer(config, resume="auto")
    assert finished.start_epoch == 2


def test_nonfinite_loss_stops_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    config = _config(tmp_path, model="test_nan", epochs=3, checkpoint_every=3, batch_size=8)
    with pytest.raises(TrainingDivergedError, match=r"loss became nan .* last good checkpoint .* is kept"):
        train(config)
    checkpoint = load_checkpoint(config.output_dir() / "checkpoint.safetensors")
    assert checkpoint.meta["step"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint.model.values() if v.is_floating_point())


def test_refuses_to_overwrite_and_checks_resume(tmp_path: Path) -> None:
    config = _config(tmp_path, epochs=1)
    train(config)
    before = (config.output_dir() / "checkpoint.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        Trainer(config)
    other = TrainConfig(**{**config.to_dict(), "model": "test_tiny_nobn"})
    with pytest.raises(ValueError, match="is for model='test_tiny', not model='test_tiny_nobn'"):
        Trainer(other, resume="auto")
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        Trainer(_config(tmp_path, "empty"), resume="auto")
    assert (config.output_dir() / "checkpoint.safetensors").read_bytes() == before


def test_bad_input_fails_before_writing(tmp_path: Path) -> None:
    for changes, message in [
        ({"model": "no_such_model"}, "unknown model 'no_such_model'"),
        ({"conv": "no_such_conv"}, "unknown conv kind 'no_such_conv'"),
        ({"data": "no_such_data"}, "unknown data 'no_such_data'"),
        ({"batch_size": 4096}, "exceeds the 80 training images"),
    ]:
        with pytest.raises(ValueError, match=message):
            Trainer(_config(tmp_path, **changes))
    assert not (tmp_path / "run").exists()


def test_autocast_choice() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("off", cpu) is None
    assert autocast_dtype("auto", cpu) == torch.bfloat16 and autocast_dtype("auto", cuda) == torch.float16
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        autocast_dtype("fp16", cpu)


def test_bf16_autocast_trains(tmp_path: Path) -> None:
    result = train(_config(tmp_path, epochs=1, amp="bf16"))
    assert result.final is not None and 0.0 <= result.final.top1 <= 1.0


def test_stopped_before_results_json_keeps_time_and_rate(tmp_path: Path) -> None:
    config = _config(tmp_path, epochs=2, checkpoint_every=2)
    whole = train(config)
    results = config.output_dir() / "results.json"
    expected = json.loads(results.read_text())
    assert expected["epoch"] == 2 and expected["train_seconds"] == whole.train_seconds > 0
    results.unlink()  # killed after the last checkpoint, before results.json
    again = Trainer(config, resume="auto").fit()
    summary = json.loads(results.read_text())
    assert again.train_seconds == whole.train_seconds and summary["train_seconds"] == expected["train_seconds"]
    assert summary["images_per_s"] == pytest.approx(expected["images_per_s"]) and summary["top1"] == expected["top1"]


def test_mid_epoch_resume_counts_the_time_before_the_cut(tmp_path: Path) -> None:
    config = _config(tmp_path, epochs=2, checkpoint_every=2)
    trainer, calls = Trainer(config), []
    step = trainer._train_step

    def dies_in_epoch_two(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        if len(calls) == 9:
            raise _KilledError
        return step(inputs, labels)

    trainer._train_step = dies_in_epoch_two
    with pytest.raises(_KilledError):
        trainer.fit()
    cut = load_checkpoint(config.output_dir() / "checkpoint.safetensors").meta
    assert (cut["epoch"], cut["step"]) == (1, 2) and cut["train_seconds"] > 0
    result = Trainer(config, resume="auto").fit()
    assert result.train_seconds > cut["train_seconds"]
    assert json.loads((config.output_dir() / "results.json").read_text())["train_seconds"] == result.train_seconds


def test_resume_before_the_first_checkpoint_starts_over(tmp_path: Path) -> None:
    config = _config(tmp_path, epochs=1)
    config.output_dir().mkdir()
    (config.output_dir() / "config.yaml").write_text(config.to_yaml())  # killed in epoch 1, no checkpoint yet
    with pytest.warns(UserWarning, match="holds no checkpoint yet; starting the run from scratch"):
        trainer = Trainer(config, resume="auto")
    assert trainer.resume_from is None and trainer.fit().final is not None


def test_onecycle_resumed_with_more_epochs(tmp_path: Path) -> None:
    train(_config(tmp_path, epochs=1, scheduler="onecycle"))
    with pytest.warns(UserWarning, match="one-cycle schedule was planned over 5 steps and now spans 10"):
        longer = Trainer(_config(tmp_path, epochs=2, scheduler="onecycle"), resume="auto")
    result = longer.fit()
    assert [int(r["epoch"]) for r in result.rows] == [1, 2]


def test_ema_added_on_resume_starts_at_the_loaded_weights(tmp_path: Path) -> None:
    first = train(_config(tmp_path, epochs=1))
    resumed = Trainer(_config(tmp_path, epochs=2, ema=0.9), resume="auto")
    assert resumed.ema is not None
    for key, value in first.model.state_dict().items():
        assert torch.equal(resumed.ema.module.state_dict()[key], value), key
