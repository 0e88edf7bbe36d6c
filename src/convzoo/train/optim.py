"""Optimizer (timm's factory: no weight decay on BN/bias) and per-step learning-rate schedules.

Schedules are stepped every iteration. cosine/multistep/step/constant are timm schedulers
(stateless: the rate is a function of the step), onecycle is torch's ``OneCycleLR``.
Milestones and step sizes are given in epochs and converted to steps.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, StepLRScheduler
from torch import nn

from convzoo.train.config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov or plain momentum) or AdamW; 1-d parameters (BN, biases) get no weight decay."""
    if config.optimizer == "sgd":
        name = "sgd" if config.nesterov else "momentum"
        return create_optimizer_v2(
            model, name, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum, foreach=None
        )
    return create_optimizer_v2(model, "adamw", lr=config.lr, weight_decay=config.weight_decay)


class LRSchedule:
    """The learning rate of every optimizer step: call ``set_step(g)`` before step ``g`` (0-based).

    Args:
        optimizer: its param groups' ``lr`` is the peak rate.
        config: scheduler, epochs, warmup_epochs, min_lr, milestones, step_size, gamma.
        steps_per_epoch: optimizer steps per epoch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> None:
        self.kind = config.scheduler
        total = config.epochs * steps_per_epoch
        warmup = round(config.warmup_epochs * steps_per_epoch)
        warm = {"warmup_t": warmup, "warmup_lr_init": config.lr * 0.01 if warmup else 0.0, "t_in_epochs": False}
        self.timm: Any = None
        self.torch: torch.optim.lr_scheduler.OneCycleLR | None = None
        if self.kind == "cosine":
            self.timm = CosineLRScheduler(
                optimizer, t_initial=max(1, total - warmup), lr_min=config.min_lr, warmup_prefix=True, **warm
            )
        elif self.kind == "multistep":
            # timm applies milestone m at index m - 1: +1 makes the decay start with epoch m's first step.
            decay = [m * steps_per_epoch + 1 for m in config.milestones]
            self.timm = MultiStepLRScheduler(
                optimizer, decay_t=decay, decay_rate=config.gamma, warmup_prefix=False, **warm
            )
        elif self.kind in ("step", "constant"):
            size = config.step_size * steps_per_epoch if self.kind == "step" else total + 1
            rate = config.gamma if self.kind == "step" else 1.0
            self.timm = StepLRScheduler(optimizer, decay_t=size, decay_rate=rate, warmup_prefix=False, **warm)
        else:
            pct = config.warmup_epochs / config.epochs if config.warmup_epochs else 0.25
            cycle_momentum = "momentum" in optimizer.defaults and config.optimizer == "sgd"
            self.torch = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=config.lr,
                total_steps=total,
                pct_start=pct,
                anneal_strategy="cos",
                cycle_momentum=cycle_momentum,
                base_momentum=0.85 * config.momentum,
                max_momentum=config.momentum,
                div_factor=25.0,
                final_div_factor=1e4,
            )

    def set_step(self, step: int) -> None:
        """Set the rate for optimizer step ``step`` (counted from the start of training)."""
        if self.timm is not None:
            self.timm.step_update(step)
            return
        assert self.torch is not None
        with warnings.catch_warnings():  # set_step may run before the first optimizer.step(); that is intended
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            while self.torch.last_epoch < step:
                self.torch.step()

    def state_dict(self) -> dict[str, Any]:
        """State needed to resume (timm schedules are functions of the step and need none)."""
        if self.torch is None:
            return {}
        return {k: v for k, v in self.torch.state_dict().items() if k != "anneal_func"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.torch is None or not state:
            return
        if state.get("total_steps") != self.torch.total_steps:
            # resumed with another epoch count: one-cycle's rate is a function of the step and the new total, so
            # keep the new plan (set_step fast-forwards it) rather than the old one, which would stop at its total
            warnings.warn(
                f"the one-cycle schedule was planned over {state.get('total_steps')} steps and now spans "
                f"{self.torch.total_steps}: the rate follows the new plan from here on",
                UserWarning,
                stacklevel=2,
            )
            return
        self.torch.load_state_dict(state)
