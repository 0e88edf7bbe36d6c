"""RunLogger: metrics.csv stays aligned with its header when evaluation skips epochs, and on resume."""

from __future__ import annotations

import csv
from pathlib import Path

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
