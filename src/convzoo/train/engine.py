"""The training loop: data -> model -> optimizer/schedule -> epochs -> checkpoints and logs.

One ``Trainer`` runs the same way on one process or under ``torchrun`` (DDP with
``DistributedSampler`` order; rank 0 alone logs and writes). Every input is checked
(data, model, checkpoint compatibility) before anything is written, so bad input
overwrites nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from convzoo.atomic_files import atomic_write_text, remove_stale_temporaries
from convzoo.data import BatchAugment, ImageSet, TensorLoader, load_imageset
from convzoo.train import distributed
from convzoo.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from convzoo.train.config import TrainConfig
from convzoo.train.logger import RunLogger
from convzoo.train.metrics import EvalResult, evaluate
from convzoo.train.optim import LRSchedule, build_optimizer

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECK_EVERY = 10  # steps between finiteness checks of the running loss (each one syncs the device)


# Settings a resumed (or reused) run may have other values of than the stored run: they change how or where it
# runs, what it prints or how often it checkpoints and evaluates, not what it learns. ``epochs`` may change too, but
# not below what the checkpoint has already trained (see ``check_resume_settings``). Everything else (data, model,
# optimizer, rate, schedule, batch size, seed, subsets, EMA, AMP, ...) must match.
FREE_SETTINGS = frozenset(
    {"description", "epochs", "progress", "device", "data_dir", "cache_dir", "download", "output", "compile"}
    | {"checkpoint_every", "eval_every", "deterministic", "channels_last", "sync_bn"}
)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def check_output_dir(path: str | Path, what: str = "output") -> None:
    """ValueError up front when ``path`` (a run folder to create or reuse) is a file or lies below one."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            if not candidate.is_dir():
                where = "is a file" if candidate == path else f"lies below {candidate}, which is a file"
                raise ValueError(f"{what} {str(path)!r} {where}, not a folder; pass --output with a folder path")
            return


def check_resume_settings(meta: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """ValueError when ``config`` differs from the run stored in checkpoint ``path`` (metadata ``meta``) in a
    setting outside ``FREE_SETTINGS``, or asks for fewer epochs than the checkpoint has already trained."""
    stored = dict(meta.get("config") or {})
    if stored.get("num_classes") is None and config.num_classes == meta.get("num_classes"):
        stored["num_classes"] = config.num_classes  # the data's class count, now given explicitly: the same model
    changed = [
        f"{key}={stored[key]!r} (now {value!r})"
        for key, value in config.to_dict().items()
        if key not in FREE_SETTINGS and key in stored and stored[key] != value
    ]
    if changed:
        free = ", ".join(sorted(FREE_SETTINGS - {"description"}))
        raise ValueError(
            f"cannot resume {path} with other settings than it was trained with: {', '.join(changed)}; "
            f"only {free} may change on resume (pass the run's settings, see its config.yaml, "
            "or another --output for a new run)"
        )
    epoch, step = int(meta.get("epoch", 0)), int(meta.get("step", 0))
    trained = epoch + (1 if step else 0)
    if trained > config.epochs:
        held = f"{epoch} epochs and {step} steps of epoch {epoch + 1}" if step else f"{epoch} epochs"
        raise ValueError(
            f"cannot resume {path} with epochs={config.epochs}: it has already trained {held}; "
            f"pass --epochs {trained} or more"
        )


@dataclass
class DataBundle:
    """Train and test images with the normalization statistics of the training images (0..255 units)."""

    train: ImageSet
    test: ImageSet
    mean: list[float]
    std: list[float]
    num_classes: int


@dataclass
class TrainResult:
    """What a run produced. Accuracies are fractions; ``model`` is the trained (unwrapped) model, eval mode."""

    run_dir: Path
    rows: list[dict[str, Any]]
    final: EvalResult | None
    train_seconds: float
    images_per_second: float
    checkpoint: Path
    model: nn.Module
    params: int
    is_main: bool = True


def prepare_data(config: TrainConfig) -> DataBundle:
    """Load both splits into memory (cached decode) and compute the training pixel statistics."""
    options = {
        "data_dir": config.data_dir,
        "image_size": config.image_size,
        "download": config.download,
        "cache_dir": config.cache_dir,
        "num_classes": config.num_classes,
    }
    train = load_imageset(config.data, "train", **options)
    test = load_imageset(config.data, "test", **options)
    if config.train_subset:
        train = train.subset(config.train_subset)
    if config.test_subset:
        test = test.subset(config.test_subset)
    num_classes = config.num_classes or train.num_classes
    if train.num_classes > num_classes:
        raise ValueError(f"num_classes={num_classes} but data {config.data!r} has {train.num_classes} classes")
    mean, std = train.channel_stats()
    return DataBundle(train, test, mean, std, num_classes)


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """``create_model(config.model, conv=config.conv, num_classes=...)``."""
    from convzoo.models import create_model

    return create_model(config.model, conv=config.conv, num_classes=num_classes)


def cost_aware_loss(model: nn.Module, lam: float) -> nn.Module | None:
    """CAC's ``CACLoss(model, lam)`` when the model has CAC layers (None when not, or CAC is not installed)."""
    try:
        from convzoo.ops import cac
    except ImportError:
        return None
    has_cac_layers, loss = getattr(cac, "has_cac_layers", None), getattr(cac, "CACLoss", None)
    if has_cac_layers is None or not has_cac_layers(model):
        return None
    if loss is None:
        warnings.warn(
            "the model has CAC layers but convzoo.ops.cac has no CACLoss: training with the task loss only",
            stacklevel=2,
        )
        return None
    return loss(model, lam=lam)


def check_compatible(meta: dict[str, Any], config: TrainConfig, num_classes: int, path: Path) -> None:
    """Refuse a checkpoint written for another model, operator or classifier size."""
    expected = {"model": config.model, "conv": config.conv, "num_classes": num_classes}
    for key, value in expected.items():
        if key in meta and meta[key] != value:
            raise ValueError(f"checkpoint {path} is for {key}={meta[key]!r}, not {key}={value!r}")


def check_same_data(meta: dict[str, Any], data: DataBundle, path: Path) -> None:
    """ValueError when the data loaded now is not what the checkpoint trained on (other class names or image
    shape): ``--data-dir`` may move between resumes (another copy of the same images), not change the data set
    (for ``--data imagefolder`` the folder is the data set)."""
    now = {"classes": list(data.train.classes), "image_shape": list(data.train.image_shape)}
    for key, value in now.items():
        if key in meta and list(meta[key]) != value:
            raise ValueError(
                f"checkpoint {path} trained on data with {key}={meta[key]!r}, but the data loaded now has "
                f"{key}={value!r}; --data-dir may point to another copy of the same data, not to other data"
            )


def load_weights(model: nn.Module, weights: dict[str, Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        parts = [
            f"{label} {names[:3]}{'...' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if names
        ]
        raise ValueError(f"checkpoint {path} does not fit this model: {'; '.join(parts)}")
    model.load_state_dict(weights)


def model_from_checkpoint(checkpoint: Checkpoint, path: Path, *, ema: bool = False) -> nn.Module:
    """The network a convzoo training checkpoint came from (model, conv, classes from its metadata), loaded.

    ``ema`` loads the EMA weights instead (ValueError if the run kept none).
    """
    from convzoo.models import create_model

    meta = checkpoint.meta
    network = create_model(meta["model"], conv=meta["conv"], num_classes=int(meta["num_classes"]))
    weights = checkpoint.ema if ema else checkpoint.model
    if weights is None:
        raise ValueError(f"checkpoint {path} has no EMA weights (trained without --ema)")
    load_weights(network, weights, path)
    return network


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None (off), bf16 on CPU, fp16 or bf16 on CUDA (``auto``: bf16 on CPU, fp16 on CUDA)."""
    if amp == "off":
        return None
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"amp='fp16' needs a CUDA device, got {device}; use amp='bf16' on CPU")
    return torch.float16 if amp == "fp16" else torch.bfloat16


class Trainer:
    """Train ``config`` (optionally continuing ``resume``: a checkpoint file or run folder, or ``"auto"``).

    Args:
        config: the resolved run settings.
        resume: None (fresh run; refuses an output folder that already holds a checkpoint),
            ``"auto"`` (the output folder's checkpoint) or a path.
        data: already loaded data (``compare`` shares one load across runs); loaded when None.
    """

    def __init__(self, config: TrainConfig, *, resume: str | None = None, data: DataBundle | None = None) -> None:
        self.config = config
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.dist = distributed.setup(config.device)
        self.device = self.dist.device
        self.run_dir = config.output_dir()
        check_output_dir(self.run_dir)
        self.checkpoint_path = self.run_dir / CHECKPOINT_NAME
        self.data = data or prepare_data(config)
        torch.manual_seed(config.seed)
        self.core = build_model(config, self.data.num_classes)
        self.resume_from = self._find_resume(resume)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.core.to(self.device, memory_format=self.memory_format)
        if config.sync_bn and self.dist.distributed and self.device.type == "cpu":
            raise ValueError("sync_bn needs CUDA devices (torch's SyncBatchNorm is GPU-only); leave it off on CPU")
        if config.sync_bn and self.dist.distributed:
            self.core = nn.SyncBatchNorm.convert_sync_batchnorm(self.core)
        self.amp_dtype = autocast_dtype(config.amp, self.device)
        self._build_loaders()
        self.optimizer = build_optimizer(self.core, config)
        self.schedule = LRSchedule(self.optimizer, config, len(self.train_loader))
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.ema = None
        if config.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.core, decay=config.ema)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.cac_loss = cost_aware_loss(self.core, config.cac_lambda)
        self.start_epoch, self.start_step = 0, 0
        self.running = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count of the current epoch
        self.train_seconds = 0.0  # training time of the work the checkpoint holds, across resumes
        # the row of an epoch trained but not yet evaluated when the run stopped (evaluated first on resume)
        self.pending_row: dict[str, Any] | None = None
        self._seconds_from_log = False  # resumed from a checkpoint without train_seconds: sum metrics.csv's
        if self.resume_from is not None:
            self._load_state(self.resume_from)
        if self.resume_from is None:  # training randomness (dropout, shake-shake) differs per rank
            torch.manual_seed(config.seed * 1000 + 1 + self.dist.rank)
        self.model: nn.Module = self.core
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.core, device_ids=ids)
        if config.compile:
            self.model = torch.compile(self.model)

    # ------------------------------------------------------------ set-up
    def _find_resume(self, resume: str | None) -> Path | None:
        if resume is None:
            if self.checkpoint_path.exists():
                raise ValueError(
                    f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --output"
                )
            return None
        path = self.checkpoint_path if resume == "auto" else Path(resume)
        if path.is_dir():
            path = path / CHECKPOINT_NAME
        if path.is_file() and path.resolve().parent != self.run_dir.resolve() and self.checkpoint_path.exists():
            # continuing another run here would overwrite this folder's run and splice the two runs' metrics
            raise ValueError(
                f"cannot resume {path} into {self.run_dir}: that folder already holds another run's checkpoint; "
                f"pass an --output without a checkpoint (or --resume {self.run_dir} to continue the run there)"
            )
        if resume == "auto" and not path.is_file() and (self.run_dir / "config.yaml").is_file():
            # the run was interrupted before its first checkpoint: there is no finished work to keep
            warnings.warn(f"{self.run_dir} holds no checkpoint yet; starting the run from scratch", stacklevel=2)
            return None
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint to resume at {path}")
        return path

    def _build_loaders(self) -> None:
        config, data = self.config, self.data
        world = self.dist.world_size
        if config.batch_size % world:
            raise ValueError(f"batch_size {config.batch_size} (global) must be divisible by {world} processes")
        per_rank = config.batch_size // world
        if len(data.train) < config.batch_size:
            raise ValueError(f"batch_size {config.batch_size} exceeds the {len(data.train)} training images")
        common = {"device": self.device, "memory_format": self.memory_format}
        train_augment = BatchAugment(data.mean, data.std, config.augment)
        self.train_loader = TensorLoader(
            data.train,
            per_rank,
            train_augment,
            shuffle=True,
            drop_last=True,
            seed=config.seed,
            rank=self.dist.rank,
            world_size=world,
            **common,
        )
        test_augment = BatchAugment(data.mean, data.std, "none")
        self.test_loader = TensorLoader(data.test, 256, test_augment, shuffle=False, drop_last=False, **common)

    def _meta(
        self, epoch: int, step: int, row: dict[str, Any] | None, seconds: float, evaluated: bool = True
    ) -> dict[str, Any]:
        config, data = self.config, self.data
        return {
            "model": config.model,
            "conv": config.conv,
            "data": config.data,
            "num_classes": data.num_classes,
            "classes": data.train.classes,
            "image_shape": list(data.train.image_shape),
            "mean": data.mean,
            "std": data.std,
            "config": config.to_dict(),
            "epoch": epoch,
            "step": step,
            "world_size": self.dist.world_size,
            "metrics": row or {},
            "train_seconds": seconds,
            # False: epoch ``epoch`` is trained but its evaluation (due) was interrupted; ``metrics`` holds its
            # training columns and a resume evaluates it without training it again
            "evaluated": evaluated,
        }

    def _save(
        self,
        epoch: int,
        step: int,
        row: dict[str, Any] | None = None,
        *,
        seconds: float | None = None,
        evaluated: bool = True,
    ) -> None:
        """Checkpoint after ``step`` steps of epoch ``epoch``; ``seconds``: training time so far (default
        ``self.train_seconds``); ``evaluated=False``: epoch ``epoch`` is trained, its evaluation still to do."""
        if not self.dist.is_main:
            return
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "running": self.running.clone(),
            "rng_cpu": torch.get_rng_state(),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        ema = self.ema.module.state_dict() if self.ema is not None else None
        meta = self._meta(epoch, step, row, self.train_seconds if seconds is None else seconds, evaluated)
        checkpoint = Checkpoint(self.core.state_dict(), meta, ema, state)
        save_checkpoint(self.checkpoint_path, checkpoint)

    def _load_state(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        if not checkpoint.meta:
            raise ValueError(f"{path} holds weights only, not a training checkpoint to resume")
        check_compatible(checkpoint.meta, self.config, self.data.num_classes, path)
        check_resume_settings(checkpoint.meta, self.config, path)
        check_same_data(checkpoint.meta, self.data, path)
        load_weights(self.core, checkpoint.model, path)
        if self.ema is not None:  # a checkpoint without EMA weights (none kept) starts the average at the weights
            self.ema.module.load_state_dict(checkpoint.ema if checkpoint.ema is not None else checkpoint.model)
        state = checkpoint.state
        self._load_optimizer(state.get("optimizer"), path)
        self.schedule.load_state_dict(state.get("schedule", {}))
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.start_step = int(checkpoint.meta["epoch"]), int(checkpoint.meta["step"])
        if checkpoint.meta.get("evaluated") is False and self.start_epoch and not self.start_step:
            self.pending_row = dict(checkpoint.meta.get("metrics") or {"epoch": self.start_epoch})
        self.train_seconds = float(checkpoint.meta.get("train_seconds", 0.0))
        self._seconds_from_log = "train_seconds" not in checkpoint.meta
        if self.start_step >= len(self.train_loader):
            self.start_epoch, self.start_step = self.start_epoch + 1, 0
        if self.start_step:
            self.running = state["running"].to(torch.float64)
        if self.dist.is_main:
            torch.set_rng_state(state["rng_cpu"])
            if "rng_cuda" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        else:
            torch.manual_seed(self.config.seed * 1000 + 1 + self.dist.rank + self.start_epoch)

    def _load_optimizer(self, saved: Any, path: Path) -> None:
        """``optimizer.load_state_dict`` with a one-line ValueError when the saved state is not this optimizer's
        (another ``optimizer`` or parameter layout): torch would fail later, deep inside ``step()``."""
        unfit = (
            f"checkpoint {path}: its optimizer state does not fit optimizer={self.config.optimizer!r} "
            "(written by another optimizer, or for other parameters)"
        )
        if not isinstance(saved, dict) or "param_groups" not in saved:
            raise ValueError(f"checkpoint {path} holds no optimizer state to resume from")
        try:
            self.optimizer.load_state_dict(saved)
        except KeyError as error:
            raise ValueError(f"{unfit}: it lacks {error}") from None
        except (ValueError, TypeError, IndexError, RuntimeError) as error:
            raise ValueError(f"{unfit}: {error}") from None
        # a group saved by another optimizer class lacks this one's hyperparameters (e.g. SGD's state has no
        # 'betas' for AdamW); load_state_dict has already filled the keys newer torch versions added
        needed = set(self.optimizer.defaults)
        missing = sorted({key for group in self.optimizer.param_groups for key in needed - set(group)})
        if missing:
            raise ValueError(f"{unfit}: it lacks {', '.join(map(repr, missing))}")

    # ------------------------------------------------------------ loop
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_step(self, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        with self._autocast():
            logits = self.model(inputs)
            loss = self.criterion(logits, labels)
            if self.cac_loss is not None:
                loss = self.cac_loss(loss)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach(), (logits.detach().argmax(1) == labels).sum()

    def _check_finite(self, loss_sum: Tensor, epoch: int, step: int) -> float:
        total = distributed.all_reduce_sum(loss_sum.detach().double().reshape(1)).item()
        if not math.isfinite(total):
            kept = (
                f"the last good checkpoint {self.checkpoint_path} is kept"
                if self.checkpoint_path.exists()
                else ("no checkpoint was written yet")
            )
            raise TrainingDivergedError(
                f"loss became {total} in epoch {epoch + 1} near step {step + 1}; stopping ({kept}). "
                "Try a lower --lr, more --warmup-epochs or --amp off."
            )
        return total

    def _train_epoch(self, epoch: int, start_step: int) -> float:
        loader = self.train_loader
        loader.set_epoch(epoch, start_step)
        self.model.train()
        steps = len(loader)
        progress = None
        if self.dist.is_main and self.config.progress:
            from tqdm import tqdm

            progress = tqdm(
                total=steps,
                initial=start_step,
                desc=f"epoch {epoch + 1}/{self.config.epochs}",
                leave=False,
                dynamic_ncols=True,
            )
        start = time.perf_counter()
        try:
            self._run_steps(epoch, start_step, steps, start, progress)
        finally:
            if progress is not None:  # also on Ctrl-C: the interruption message then starts on a clean line
                progress.close()
        return time.perf_counter() - start

    def _run_steps(self, epoch: int, start_step: int, steps: int, start: float, progress: Any) -> None:
        loader = self.train_loader
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.float64)
        count = 0
        for step, (inputs, labels) in enumerate(loader, start=start_step):
            self.schedule.set_step(epoch * steps + step)
            loss, hits = self._train_step(inputs, labels)
            loss_sum += loss.double() * len(labels)
            correct += hits
            count += len(labels)
            if self.ema is not None:
                self.ema.update(self.core, step=epoch * steps + step)
            if (step + 1) % CHECK_EVERY == 0 or step + 1 == steps:
                self._check_finite(loss_sum, epoch, step)
                if progress is not None:
                    progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.4g}")
            if progress is not None:
                progress.update(1)
            if self.config.checkpoint_every and (step + 1) % self.config.checkpoint_every == 0 and step + 1 < steps:
                self._check_finite(loss_sum, epoch, step)  # never checkpoint weights a NaN step has touched
                self.running += torch.stack([loss_sum.cpu(), correct.cpu(), torch.tensor(float(count))]).double()
                loss_sum.zero_(), correct.zero_()
                count = 0
                self._save(epoch, step + 1, seconds=self.train_seconds + time.perf_counter() - start)
        self.running += torch.stack([loss_sum.cpu(), correct.cpu(), torch.tensor(float(count))]).double()

    def _evaluated(self, row: dict[str, Any]) -> tuple[dict[str, Any], EvalResult]:
        """Evaluate the model (and its EMA) on the test data: ``row`` with the test columns before the timings."""
        timing = ("epoch_seconds", "images_per_s")
        result = evaluate(self.core, self.test_loader, self.data.num_classes, autocast_dtype=self.amp_dtype)
        out = {key: value for key, value in row.items() if key not in timing}
        out.update(test_loss=result.loss, test_top1=result.top1, test_top5=result.top5)
        if self.ema is not None:
            ema_result = evaluate(
                self.ema.module, self.test_loader, self.data.num_classes, autocast_dtype=self.amp_dtype
            )
            out.update(ema_top1=ema_result.top1, ema_top5=ema_result.top5)
        out.update({key: row[key] for key in timing if key in row})
        return out, result

    def _end_epoch(self, logger: RunLogger, row: dict[str, Any], epoch: int) -> None:
        """Log the finished (trained, and evaluated when due) epoch ``epoch`` (1-based) and checkpoint it."""
        logger.log_epoch(row)
        self._save(epoch, 0, row)
        if self.dist.is_main and self.config.progress:
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            print(shown, flush=True)

    def _carry_metrics(self) -> None:
        """A run continued in another folder (``--resume PATH --output DIR``) takes its earlier epochs' rows along
        (the logger then drops any after the checkpoint), unless DIR already has a metrics.csv."""
        source = self.resume_from.parent / "metrics.csv" if self.resume_from is not None else None
        target = self.run_dir / "metrics.csv"
        if source is None or not source.is_file() or target.exists():
            return
        if source.resolve().parent != target.resolve().parent:
            atomic_write_text(target, source.read_text())

    def fit(self) -> TrainResult:
        """Run the remaining epochs; returns the final evaluation and where everything was written."""
        config, main = self.config, self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.run_dir)  # left by a process killed while writing
            atomic_write_text(self.run_dir / "config.yaml", config.to_yaml())
            self._carry_metrics()
        # an epoch trained but not evaluated is logged again (a row of it may have been written before the stop)
        logged = self.start_epoch - (1 if self.pending_row is not None else 0)
        logger = RunLogger(self.run_dir, enabled=main, resume_epoch=logged)
        if self._seconds_from_log:  # a checkpoint written before train_seconds was kept: the logged epochs' times
            self.train_seconds = sum(float(r.get("epoch_seconds") or 0.0) for r in logger.rows)
        final: EvalResult | None = None
        try:
            if self.pending_row is not None:  # stopped while evaluating its last epoch: evaluate it, do not retrain
                row, final = self._evaluated(self.pending_row)
                self._end_epoch(logger, row, self.start_epoch)
                self.pending_row = None
            for epoch in range(self.start_epoch, config.epochs):
                start_step = self.start_step if epoch == self.start_epoch else 0
                if not start_step:
                    self.running.zero_()
                seconds = self._train_epoch(epoch, start_step)
                self.train_seconds += seconds
                images = (len(self.train_loader) - start_step) * self.train_loader.batch_size * self.dist.world_size
                rate = images / max(seconds, 1e-9)
                totals = distributed.all_reduce_sum(self.running.to(self.device)).cpu()
                row: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "train_loss": totals[0].item() / max(totals[2].item(), 1),
                    "train_top1": totals[1].item() / max(totals[2].item(), 1),
                    "epoch_seconds": seconds,
                    "images_per_s": rate,
                }
                if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                    # keep the trained epoch first: an interruption during the evaluation must not lose it
                    self._save(epoch + 1, 0, row, evaluated=False)
                    row, final = self._evaluated(row)
                self._end_epoch(logger, row, epoch + 1)
        finally:
            logger.close()
        if final is None:  # nothing left to train: evaluate what the checkpoint holds
            final = evaluate(self.core, self.test_loader, self.data.num_classes, autocast_dtype=self.amp_dtype)
        # every epoch's rate, including those trained before a resume (their rows come from metrics.csv)
        rates = [float(r["images_per_s"]) for r in logger.rows if r.get("images_per_s") not in (None, "")]
        if main:
            summary = {
                "top1": final.top1,
                "top5": final.top5,
                "loss": final.loss,
                "per_class": final.per_class,
                "classes": self.data.train.classes,
                "train_seconds": self.train_seconds,
                "images_per_s": sum(rates) / len(rates) if rates else 0.0,
                "epoch": max(self.start_epoch, config.epochs),  # what the checkpoint holds, for compare's reuse
            }
            atomic_write_text(self.run_dir / "results.json", json.dumps(summary, indent=2))
        self.core.eval()
        return TrainResult(
            run_dir=self.run_dir,
            rows=logger.rows,
            final=final,
            train_seconds=self.train_seconds,
            images_per_second=sum(rates) / len(rates) if rates else 0.0,
            checkpoint=self.checkpoint_path,
            model=self.core,
            params=sum(p.numel() for p in self.core.parameters()),
            is_main=main,
        )


def train(config: TrainConfig, *, resume: str | None = None, data: DataBundle | None = None) -> TrainResult:
    """Build a ``Trainer`` for ``config`` and run it (see ``Trainer``)."""
    return Trainer(config, resume=resume, data=data).fit()
