"""Train one model with several operators over several seeds and tabulate them like the papers do.

Runs live in ``<output>/<conv>-s<seed>/``; a finished run is reused and an interrupted one
resumed, so a long comparison can be stopped and started again.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from convzoo.atomic_files import atomic_path, atomic_write_text
from convzoo.train.checkpoint import load_checkpoint
from convzoo.train.config import TrainConfig, make_config
from convzoo.train.engine import (
    CHECKPOINT_NAME,
    FREE_SETTINGS,
    DataBundle,
    TrainingDivergedError,
    build_model,
    check_output_dir,
    model_from_checkpoint,
    prepare_data,
    train,
)


@dataclass
class CompareRow:
    """One operator's results over its seeds. Accuracies in percent."""

    conv: str
    params: int
    macs: int
    deployed_macs: int
    train_seconds: list[float] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    top5: list[float] = field(default_factory=list)
    images_per_s: list[float] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)
    effective_macs: list[float] = field(default_factory=list)

    @property
    def trained_macs(self) -> float:
        """MACs per image of the trained, deployed model: for content-aware kinds (CAC) the test-set mean
        of each seed's effective MACs (eq. 17 of the CAC paper), else ``deployed_macs``."""
        return statistics.fmean(self.effective_macs) if self.effective_macs else float(self.deployed_macs)

    @property
    def top1_mean(self) -> float:
        return statistics.fmean(self.top1)

    @property
    def top1_std(self) -> float:
        return statistics.stdev(self.top1) if len(self.top1) > 1 else 0.0


@dataclass
class Comparison:
    rows: list[CompareRow]
    skipped: list[tuple[str, str]]
    output: Path


def available(conv: str) -> str | None:
    """None when ``conv`` can be used, else why not (e.g. a kind another helper has not registered yet)."""
    from convzoo.ops import list_convs

    if conv == "standard" or conv in list_convs():
        return None
    return f"conv kind {conv!r} is not registered (registered: standard, {', '.join(list_convs())})"


def _check_same_run(meta: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
    """ValueError when the run in ``run_dir`` was trained with other settings than ``config`` (or for more
    epochs): reusing or continuing it would put another experiment in the table.

    Only the engine's ``FREE_SETTINGS`` (the ones ``convzoo train --resume`` also lets change) may differ;
    ``epochs`` may grow, and the run is then resumed to the new count."""
    stored = meta.get("config") or {}
    for key, value in config.to_dict().items():
        if key not in FREE_SETTINGS and key in stored and stored[key] != value:
            raise ValueError(
                f"{run_dir} holds a run with {key}={stored[key]!r}, not {key}={value!r}; "
                "pass another --output (or delete that run folder)"
            )
    epoch, step = int(meta.get("epoch", 0)), int(meta.get("step", 0))
    if epoch + (1 if step else 0) > config.epochs:
        held = f"{epoch} epochs and {step} steps" if step else f"{epoch} epochs"
        raise ValueError(
            f"{run_dir} holds a run trained for {held}, more than epochs={config.epochs}; "
            "pass another --output (or delete that run folder)"
        )


def _finished(run_dir: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The results of the run in ``run_dir`` if it has trained all ``config.epochs``, else None (to be trained,
    resumed, or only evaluated again when it stopped between its last checkpoint and its results.json)."""
    results, checkpoint = run_dir / "results.json", run_dir / CHECKPOINT_NAME
    if not checkpoint.is_file():
        return None
    meta = load_checkpoint(checkpoint).meta
    _check_same_run(meta, config, run_dir)
    if int(meta.get("epoch", 0)) < config.epochs or meta.get("evaluated") is False or not results.is_file():
        return None
    try:
        summary = json.loads(results.read_text())
    except ValueError:  # damaged: the resumed run evaluates the checkpoint and writes it again
        return None
    # results.json written before the checkpoint's last epochs (e.g. of a shorter run since extended) is stale
    return summary if isinstance(summary, dict) and summary.get("epoch") == meta["epoch"] else None


def compare(
    model: str,
    convs: Sequence[str],
    *,
    data: str = "digits",
    seeds: int = 1,
    recipe: str | None = None,
    output: str | Path = "runs/compare",
    log: Callable[[str], None] = print,
    **overrides: Any,
) -> Comparison:
    """Train ``model`` with each of ``convs`` for ``seeds`` seeds (0..seeds-1) and collect the results.

    ``overrides`` are ``TrainConfig`` fields (epochs, batch_size, lr, ...). A kind that is not
    registered or does not fit the model is skipped with a note, not an error.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if not convs:
        raise ValueError("convs must name at least one conv kind, e.g. standard,doconv")
    repeated = [conv for conv in dict.fromkeys(convs) if list(convs).count(conv) > 1]
    if repeated:  # each kind is one row of the table and one set of run folders
        raise ValueError(
            f"convs must name each conv kind once, got {','.join(convs)!r} (repeated: {', '.join(repeated)})"
        )
    output = Path(output)
    check_output_dir(output)
    base = make_config(recipe, **{"progress": False, **overrides, "model": model, "data": data})
    bundle = prepare_data(base)
    shape = bundle.train.image_shape
    rows: list[CompareRow] = []
    skipped: list[tuple[str, str]] = []
    for conv in convs:
        reason = available(conv)
        network: nn.Module | None = None
        if reason is None:
            try:
                network = build_model(_with(base, conv=conv), bundle.num_classes)
            except (ValueError, TypeError) as error:
                reason = str(error)
        if reason is not None or network is None:
            log(f"note: skipping {conv}: {reason}")
            skipped.append((conv, str(reason)))
            continue
        row = CompareRow(conv, sum(p.numel() for p in network.parameters()), *_macs(network, shape))
        try:
            _train_seeds(row, model, base, bundle, seeds, output, log, content_aware=_content_aware(network))
        except TrainingDivergedError as error:  # one unstable operator must not sink the whole table
            log(f"note: dropping {conv}: {error}")
            skipped.append((conv, f"training diverged: {error}"))
            continue
        rows.append(row)
    return Comparison(rows, skipped, output)


def _train_seeds(
    row: CompareRow,
    model: str,
    base: TrainConfig,
    bundle: DataBundle,
    seeds: int,
    output: Path,
    log: Callable[[str], None],
    *,
    content_aware: bool,
) -> None:
    """Train (or reuse / resume) every seed of ``row.conv`` and append its results to ``row``.

    ``content_aware``: the model has CAC layers, so each seed's effective MACs are measured too.
    """
    conv = row.conv
    for seed in range(seeds):
        run_dir = output / f"{conv}-s{seed}"
        config = _with(base, conv=conv, seed=seed, output=str(run_dir))
        summary = _finished(run_dir, config)
        if summary is None:
            resume = "auto" if (run_dir / CHECKPOINT_NAME).is_file() else None
            log(f"training {model} conv={conv} seed={seed} ({config.epochs} epochs) -> {run_dir}")
            train(config, resume=resume, data=bundle)
            summary = json.loads((run_dir / "results.json").read_text())
        else:
            log(f"reusing finished run {run_dir}")
        row.top1.append(100 * summary["top1"])
        row.top5.append(100 * summary["top5"])
        row.train_seconds.append(summary["train_seconds"])
        row.images_per_s.append(summary["images_per_s"])
        row.run_dirs.append(run_dir)
        if content_aware:
            row.effective_macs.append(_effective_macs(run_dir, bundle))
        log(f"  {conv} seed {seed}: top-1 {row.top1[-1]:.2f}%")


def _content_aware(network: nn.Module) -> bool:
    """Whether ``network``'s cost follows its input (it has CAC layers)."""
    from convzoo.ops.cac import CACStatsMixin

    return any(isinstance(module, CACStatsMixin) for module in network.modules())


def _effective_macs(run_dir: Path, bundle: DataBundle) -> float:
    """Mean effective MACs per test image (CAC eq. 17) of the trained content-aware model in ``run_dir``."""
    from convzoo.data import BatchAugment, TensorLoader
    from convzoo.ops.cac_cost import cac_statistics

    network = model_from_checkpoint(load_checkpoint(run_dir / CHECKPOINT_NAME), run_dir)
    loader = TensorLoader(
        bundle.test, 256, BatchAugment(bundle.mean, bundle.std, "none"), shuffle=False, drop_last=False
    )
    return float(cac_statistics(network, loader).image_macs.mean())


def _macs(network: nn.Module, shape: tuple[int, int, int]) -> tuple[int, int]:
    """MACs per image of the training form (eval mode) and of its ``convzoo.deploy`` form."""
    import warnings

    from convzoo.convert import deploy
    from convzoo.profiling import count_macs

    macs = count_macs(network, shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            deployed = count_macs(deploy(network), shape)
    except Exception:  # an operator without a deploy form still gets its training-form count
        deployed = macs
    return macs, deployed


def _with(config: TrainConfig, **changes: Any) -> TrainConfig:
    return TrainConfig(**{**config.to_dict(), **changes})


HEADER = (
    "conv",
    "params",
    "MACs (M)",
    "deployed MACs (M)",
    "trained MACs (M)",
    "train time (s)",
    "images/s",
    "top-1 (%)",
    "Δ top-1 vs standard",
)


def table_rows(comparison: Comparison) -> list[list[str]]:
    """Rows of the paper-style table: top-1 as mean ± std over seeds, Δ against the standard conv."""
    reference = next((r.top1_mean for r in comparison.rows if r.conv == "standard"), None)
    rows = []
    for row in comparison.rows:
        delta = "" if reference is None or row.conv == "standard" else f"{row.top1_mean - reference:+.2f}"
        rows.append(
            [
                row.conv,
                f"{row.params:,}",
                f"{row.macs / 1e6:.2f}",
                f"{row.deployed_macs / 1e6:.2f}",
                f"{row.trained_macs / 1e6:.2f}",
                f"{statistics.fmean(row.train_seconds):.1f}",
                f"{statistics.fmean(row.images_per_s):,.0f}",
                f"{row.top1_mean:.2f} ± {row.top1_std:.2f}",
                delta,
            ]
        )
    return rows


def markdown(comparison: Comparison, title: str) -> str:
    lines = [f"## {title}", "", "| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(comparison)]
    seeds = max((len(r.top1) for r in comparison.rows), default=0)
    lines += [
        "",
        f"top-1: mean ± std over {seeds} seed(s), final epoch; MACs per image, eval mode. Trained MACs: the "
        "deployed MACs, except for content-aware kinds (cac), whose cost follows the input: there, the mean over "
        "the test images and seeds of the trained model's effective MACs (CAC eq. 17).",
    ]
    lines += [f"Skipped {conv}: {reason}" for conv, reason in comparison.skipped]
    return "\n".join(lines) + "\n"


def write_outputs(comparison: Comparison, title: str) -> dict[str, Path]:
    """``compare.md``, ``compare.csv`` and ``compare.png`` (top-1 against MACs) in the output folder."""
    out = comparison.output
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "compare.md", "csv": out / "compare.csv", "png": out / "compare.png"}
    atomic_write_text(paths["md"], markdown(comparison, title))
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(
        [
            "conv",
            "params",
            "macs",
            "deployed_macs",
            "trained_macs",
            "train_seconds_mean",
            "images_per_s_mean",
            "top1_mean",
            "top1_std",
            "seeds",
            "top1_per_seed",
        ]
    )
    for row in comparison.rows:
        writer.writerow(
            [
                row.conv,
                row.params,
                row.macs,
                row.deployed_macs,
                row.trained_macs,
                statistics.fmean(row.train_seconds),
                statistics.fmean(row.images_per_s),
                row.top1_mean,
                row.top1_std,
                len(row.top1),
                " ".join(f"{v:.2f}" for v in row.top1),
            ]
        )
    atomic_write_text(paths["csv"], table.getvalue())
    plot_accuracy_vs_macs(comparison, paths["png"], title)
    return paths


def plot_accuracy_vs_macs(comparison: Comparison, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.5))
    for row in comparison.rows:
        macs = row.trained_macs / 1e6
        axis.errorbar(macs, row.top1_mean, yerr=row.top1_std, fmt="o", capsize=3)
        axis.annotate(row.conv, (macs, row.top1_mean), textcoords="offset points", xytext=(5, 5))
    axis.set(xlabel="MACs per image, trained and deployed (M)", ylabel="top-1 accuracy (%)", title=title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
