"""The training loop on tiny models and fake data: outputs, resume equality, divergence, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from convzoo.train.checkpoint import load_checkpoint
from convzoo.train.config import TrainConfig
from convzoo.train.engine import Trainer, TrainingDivergedError, autocast_dtype, check_same_data, train

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


def _fit_killed_at_step(trainer: Trainer, step_number: int) -> None:
    """Run ``trainer.fit()`` as if the process were killed at its ``step_number``-th training step (1-based)."""
    step, calls = trainer._train_step, []

    def dies(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        if len(calls) == step_number:
            raise _KilledError
        return step(inputs, labels)

    trainer._train_step = dies
    with pytest.raises(_KilledError):
        trainer.fit()


def test_mid_epoch_resume_counts_the_time_before_the_cut(tmp_path: Path) -> None:
    config = _config(tmp_path, epochs=2, checkpoint_every=2)
    _fit_killed_at_step(Trainer(config), 9)
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


@pytest.mark.parametrize(
    ("changes", "shown"),
    [
        ({"lr": 0.1}, "lr=0.05 (now 0.1)"),
        ({"batch_size": 8}, "batch_size=16 (now 8)"),
        ({"seed": 1}, "seed=0 (now 1)"),
        ({"train_subset": 6}, "train_subset=8 (now 6)"),
        ({"scheduler": "constant"}, "scheduler='cosine' (now 'constant')"),
        ({"ema": 0.9}, "ema=0.0 (now 0.9)"),
        ({"optimizer": "adamw"}, "optimizer='sgd' (now 'adamw')"),
        ({"data": "digits", "lr": 0.2}, "data='fake' (now 'digits'), lr=0.05 (now 0.2)"),
    ],
)
def test_resume_with_other_settings_is_refused(tmp_path: Path, changes: dict[str, object], shown: str) -> None:
    config = _config(tmp_path, epochs=1)
    train(config)
    before = {name: (config.output_dir() / name).read_bytes() for name in ("checkpoint.safetensors", "config.yaml")}
    changed = _config(tmp_path, epochs=2, **changes)
    with pytest.raises(ValueError, match="with other settings than it was trained with") as error:
        Trainer(changed, resume="auto")
    assert shown in str(error.value) and "epochs" in str(error.value).split("only ")[1]
    assert before == {name: (config.output_dir() / name).read_bytes() for name in before}


def test_resume_may_change_run_options_and_grow_epochs(tmp_path: Path) -> None:
    train(_config(tmp_path, epochs=1))
    options = {"progress": False, "eval_every": 2, "checkpoint_every": 3, "device": "cpu", "deterministic": True}
    result = Trainer(_config(tmp_path, epochs=2, **options), resume="auto").fit()
    assert [int(r["epoch"]) for r in result.rows] == [1, 2]


def test_resume_with_fewer_epochs_than_trained_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, epochs=2)
    train(config)
    with pytest.raises(ValueError, match=r"with epochs=1: it has already trained 2 epochs; pass --epochs 2 or more"):
        Trainer(_config(tmp_path, epochs=1), resume="auto")
    Trainer(config, resume="auto")  # the same count: nothing left to train, which is fine
    # stopped within epoch 2 of a 3-epoch run: its weights hold more than 1 epoch, so epochs=1 is refused too
    _fit_killed_at_step(Trainer(_config(tmp_path, "cut", epochs=3, checkpoint_every=2)), 8)
    with pytest.raises(ValueError, match=r"already trained 1 epochs and 2 steps of epoch 2; pass --epochs 2 or more"):
        Trainer(_config(tmp_path, "cut", epochs=1, checkpoint_every=2), resume="auto")


@pytest.mark.parametrize(("trained", "claimed"), [("sgd", "adamw"), ("adamw", "sgd")])
def test_optimizer_state_of_another_optimizer_is_a_clear_error(tmp_path: Path, trained: str, claimed: str) -> None:
    from convzoo.train.checkpoint import save_checkpoint

    config = _config(tmp_path, epochs=1, optimizer=trained)
    train(config)
    path = config.output_dir() / "checkpoint.safetensors"
    checkpoint = load_checkpoint(path)  # one optimizer's state, metadata claiming the other: the settings check passes
    checkpoint.meta["config"]["optimizer"] = claimed
    save_checkpoint(path, checkpoint)
    message = rf"optimizer state does not fit optimizer='{claimed}' \(written by another optimizer.*\): it lacks '"
    with pytest.raises(ValueError, match=message):
        Trainer(_config(tmp_path, epochs=2, optimizer=claimed), resume="auto")
    del checkpoint.state["optimizer"]["param_groups"][1]  # a parameter layout that does not fit at all
    checkpoint.meta["config"]["optimizer"] = trained
    save_checkpoint(path, checkpoint)
    with pytest.raises(ValueError, match=rf"its optimizer state does not fit optimizer='{trained}'"):
        Trainer(_config(tmp_path, epochs=2, optimizer=trained), resume="auto")


def test_resume_into_a_folder_holding_another_run_is_refused(tmp_path: Path) -> None:
    source, target = _config(tmp_path, "source", epochs=1), _config(tmp_path, "target", epochs=1)
    train(source)
    train(target)
    before = {p.name: p.read_bytes() for p in target.output_dir().iterdir() if p.is_file()}
    moved = _config(tmp_path, "target", epochs=2)
    with pytest.raises(ValueError, match="already holds another run's checkpoint"):
        Trainer(moved, resume=str(source.output_dir()))
    assert before == {p.name: p.read_bytes() for p in target.output_dir().iterdir() if p.is_file()}
    # from the checkpoint already in the output folder, or into a folder without a run: fine
    Trainer(moved, resume=str(target.output_dir()))
    fresh = Trainer(_config(tmp_path, "fresh", epochs=2), resume=str(source.output_dir() / "checkpoint.safetensors"))
    result = fresh.fit()  # continued there, with the first epoch's row carried over
    assert [int(r["epoch"]) for r in csv.DictReader((result.run_dir / "metrics.csv").open())] == [1, 2]


@pytest.mark.parametrize("below", [False, True])
def test_output_that_is_a_file_is_refused_before_loading_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, below: bool
) -> None:
    import convzoo.train.engine as engine

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(engine, "prepare_data", lambda config: pytest.fail("data loaded before the output check"))
    name = "file/run" if below else "file"
    with pytest.raises(ValueError, match="is a file, not a folder; pass --output with a folder path"):
        Trainer(_config(tmp_path, name))
    assert (tmp_path / "file").read_text() == ""


def _without_timing(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "images_per_s")} for row in rows]


@pytest.mark.parametrize("stop", [1, 2, 3, 4, "log"])
def test_stop_during_evaluation_keeps_the_trained_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: int | str
) -> None:
    """Ctrl-C in the Nth evaluation (model, then EMA, per epoch), or after logging an evaluated epoch but before
    its checkpoint: the resumed run evaluates that epoch without training it again and ends as an uninterrupted
    run does."""
    import convzoo.train.engine as engine

    changes = {"epochs": 2, "ema": 0.5, "deterministic": True, "scheduler": "onecycle"}
    whole = train(_config(tmp_path, "whole", **changes))
    config = _config(tmp_path, "cut", **changes)
    evaluate, save, calls = engine.evaluate, Trainer._save, []

    def interrupted_evaluate(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == stop:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    def interrupted_save(self: Trainer, epoch: int, step: int, *args: object, **kwargs: object) -> None:
        if kwargs.get("evaluated", True) and not step and epoch == 1:  # epoch 1 logged, then stopped
            raise KeyboardInterrupt
        save(self, epoch, step, *args, **kwargs)

    if stop == "log":
        monkeypatch.setattr(Trainer, "_save", interrupted_save)
    else:
        monkeypatch.setattr(engine, "evaluate", interrupted_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.undo()
    meta = load_checkpoint(config.output_dir() / "checkpoint.safetensors").meta
    trained = 1 if stop in (1, 2, "log") else 2
    assert (meta["epoch"], meta["step"], meta["evaluated"]) == (trained, 0, False)

    resumed, steps = Trainer(config, resume="auto"), []
    train_step = resumed._train_step

    def counted(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steps.append(1)
        return train_step(inputs, labels)

    resumed._train_step = counted
    result = resumed.fit()
    assert len(steps) == 5 * (2 - trained)  # the trained epoch is not trained again
    reference, got_checkpoint = (
        load_checkpoint(run / "checkpoint.safetensors") for run in (whole.run_dir, result.run_dir)
    )
    assert got_checkpoint.ema is not None and reference.ema is not None
    for weights, expected_weights in ((got_checkpoint.model, reference.model), (got_checkpoint.ema, reference.ema)):
        for key, value in expected_weights.items():
            assert torch.equal(weights[key], value), key
    expected = list(csv.DictReader((whole.run_dir / "metrics.csv").open()))
    got = list(csv.DictReader((result.run_dir / "metrics.csv").open()))
    assert _without_timing(got) == _without_timing(expected)  # same columns in the same order, no duplicate row
    summaries = [json.loads((run / "results.json").read_text()) for run in (whole.run_dir, result.run_dir)]
    for key in ("top1", "top5", "loss", "per_class", "epoch"):
        assert summaries[0][key] == summaries[1][key], key
    assert load_checkpoint(config.output_dir() / "checkpoint.safetensors").meta["evaluated"] is True


def test_resume_on_other_data_is_refused(tmp_path: Path) -> None:
    """--data-dir may change on resume (another copy of the same images), the data set may not: for
    --data imagefolder the folder is the data set, so a resume on other folders used to train on."""
    config = _config(tmp_path, epochs=1)
    train(config)
    trainer = Trainer(_config(tmp_path, epochs=2), resume="auto")  # the same data: resumes
    meta = {"classes": ["cat", "dog"], "image_shape": list(trainer.data.train.image_shape)}
    with pytest.raises(ValueError, match=r"trained on data with classes=\['cat', 'dog'\], but the data loaded now"):
        check_same_data(meta, trainer.data, Path("run/checkpoint.safetensors"))
    meta = {"classes": list(trainer.data.train.classes), "image_shape": [1, 2, 2]}
    with pytest.raises(ValueError, match=r"image_shape=\[1, 2, 2\]"):
        check_same_data(meta, trainer.data, Path("run/checkpoint.safetensors"))


def test_resume_may_name_the_class_count_the_run_took_from_its_data(tmp_path: Path) -> None:
    """--num-classes equal to the data's count builds the same model as leaving it out: not a change."""
    train(_config(tmp_path, epochs=1))
    classes = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors").meta["num_classes"]
    result = Trainer(_config(tmp_path, epochs=2, num_classes=classes), resume="auto").fit()
    assert [int(r["epoch"]) for r in result.rows] == [1, 2]
    with pytest.raises(ValueError, match=rf"num_classes={classes}, not num_classes={classes + 2}"):
        Trainer(_config(tmp_path, epochs=3, num_classes=classes + 2), resume="auto")
