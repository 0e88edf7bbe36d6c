"""Run logging on rank 0: per-epoch CSV, TensorBoard when installed, PNG curves at the end."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from convzoo.atomic_files import atomic_path, atomic_write_text


class RunLogger:
    """Appends one row per epoch to ``<run>/metrics.csv`` (and TensorBoard scalars under ``<run>/tb``).

    A resumed run keeps the rows of epochs before the resume point and drops later ones (also from
    TensorBoard). Rewrites of the file are atomic, so an interruption never loses finished epochs' rows.
    """

    def __init__(self, run_dir: Path, *, enabled: bool = True, resume_epoch: int = 0) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.csv_path = self.run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self._header: list[str] = []
        self.tb: Any = None
        if not enabled:
            return
        if resume_epoch and self.csv_path.is_file():
            with self.csv_path.open() as handle:
                self.rows = [row for row in csv.DictReader(handle) if _epoch(row) <= resume_epoch]
            self._rewrite()
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events of epochs after the resume point, which are logged again
            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_epoch + 1 if resume_epoch else None)
        except (ImportError, ModuleNotFoundError):
            self.tb = None

    def _columns(self) -> list[str]:
        """Every key of every row, in order of first appearance (epochs without evaluation lack test_*)."""
        return list(dict.fromkeys(key for row in self.rows for key in row))

    def _rewrite(self) -> None:
        if not self.rows:
            self.csv_path.unlink(missing_ok=True)
            return
        self._header = self._columns()
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self._header, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv_path, text.getvalue())

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Record one epoch's summary (``epoch`` is 1-based); missing columns are written empty.

        A row with a column the file's header lacks (the first evaluated epoch) rewrites the file
        with the wider header, so every row stays aligned with it.
        """
        if not self.enabled:
            return
        self.rows.append(row)
        if not self.csv_path.is_file() or any(key not in self._header for key in row):
            self._rewrite()
        else:
            with self.csv_path.open("a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self._header, restval="").writerow(row)
        if self.tb is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, int(row["epoch"]))
            self.tb.flush()

    def close(self) -> None:
        """Write ``curves.png`` (loss and accuracy per epoch) and close TensorBoard."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        if self.rows:
            plot_curves(self.rows, self.run_dir / "curves.png")


def _epoch(row: dict[str, Any]) -> float:
    """A CSV row's epoch; infinity for a damaged (torn) row, dropped on resume like the rows after the checkpoint."""
    if None in row or None in row.values():  # more or fewer fields than the header
        return float("inf")
    try:
        return int(row["epoch"])
    except (KeyError, TypeError, ValueError):
        return float("inf")


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Loss (left) and top-1 accuracy (right) against epoch, with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(float(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "", "nan")]
        return [p[0] for p in points], [p[1] for p in points]

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "test_loss"):
        left.plot(*series(key), marker="o", label=key)
    for key in ("train_top1", "test_top1"):
        right.plot(*series(key), marker="o", label=key)
    left.set(xlabel="epoch", ylabel="loss")
    right.set(xlabel="epoch", ylabel="top-1 accuracy")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
