"""RunLogger: metrics.csv stays aligned with its header when evaluation skips epochs, and on resume."""

from __future__ import annotations

import csv
import sys
import types
from pathlib import Path

import pytest

from convzoo.train.logger import RunLogger


def _row(epoch: int, evaluated: bool) -> dict[str, float]:
    row: dict[str, float] = {"epoch": epoch, "lr": 0.1, "train_loss": 2.0 / epoch}
    if evaluated:
        row.update(test_loss=1.0 / epoch, test_top1=0.5)
    row.update(epoch_seconds=10.0, images_per_s=100.0 * epoch)
    return row


def _read(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_epochs_without_evaluation_keep_every_column_aligned(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path)
    for epoch in range(1, 6):
        logger.log_epoch(_row(epoch, evaluated=epoch % 2 == 0))  # evaluated on epochs 2 and 4 only
    rows = _read(tmp_path / "metrics.csv")
    assert [r["images_per_s"] for r in rows] == ["100.0", "200.0", "300.0", "400.0", "500.0"]
    assert [r["test_top1"] for r in rows] == ["", "0.5", "", "0.5", ""]
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "epoch_seconds", "images_per_s", "test_loss", "test_top1"]
    with (tmp_path / "metrics.csv").open() as handle:
        assert all(len(line) == 7 for line in csv.reader(handle))


def test_resume_keeps_earlier_rows_and_drops_later_ones(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path)
    for epoch in range(1, 5):
        logger.log_epoch(_row(epoch, evaluated=epoch == 2))
    resumed = RunLogger(tmp_path, resume_epoch=2)
    resumed.log_epoch(_row(3, evaluated=False))
    rows = _read(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [r["images_per_s"] for r in rows] == ["100.0", "200.0", "300.0"]
    assert rows[1]["test_top1"] == "0.5" and rows[2]["test_top1"] == ""


def test_an_interrupted_rewrite_keeps_every_finished_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logger = RunLogger(tmp_path)
    for epoch in range(1, 5):
        logger.log_epoch(_row(epoch, evaluated=True))
    before = (tmp_path / "metrics.csv").read_text()

    def interrupted(self: csv.DictWriter, rows: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the resumed run rewrites metrics.csv

    monkeypatch.setattr(csv.DictWriter, "writerows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        RunLogger(tmp_path, resume_epoch=3)
    assert (tmp_path / "metrics.csv").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_resume_drops_a_damaged_row(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path)
    for epoch in range(1, 3):
        logger.log_epoch(_row(epoch, evaluated=True))
    with (tmp_path / "metrics.csv").open("a") as handle:
        handle.write("\n,0.1\n1,0.1\n")  # torn lines (e.g. "1" of an epoch-12 row)
    RunLogger(tmp_path, resume_epoch=2).log_epoch(_row(3, evaluated=True))
    assert [r["epoch"] for r in _read(tmp_path / "metrics.csv")] == ["1", "2", "3"]


def test_tensorboard_gets_every_epoch_and_forgets_the_ones_after_a_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, object]] = []

    class Writer:
        def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
            calls.append(("purge_step", purge_step))

        def add_scalar(self, key: str, value: float, step: int) -> None:
            calls.append((key, step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    logger = RunLogger(tmp_path)
    logger.log_epoch(_row(1, evaluated=False))
    logger.log_epoch(_row(2, evaluated=True))  # widens the header: the file is rewritten
    logger.log_epoch(_row(3, evaluated=False))
    assert calls[0] == ("purge_step", None)
    assert {step for key, step in calls if key == "train_loss"} == {1, 2, 3} and ("test_top1", 2) in calls
    calls.clear()
    RunLogger(tmp_path, resume_epoch=2)
    assert calls == [("purge_step", 3)]
