"""Optimizer param groups and the per-step schedules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from convzoo.train.config import TrainConfig
from convzoo.train.optim import LRSchedule, build_optimizer


def _rates(config: TrainConfig, steps_per_epoch: int) -> list[float]:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer = build_optimizer(model, config)
    schedule = LRSchedule(optimizer, config, steps_per_epoch)
    rates = []
    for step in range(config.epochs * steps_per_epoch):
        schedule.set_step(step)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_no_weight_decay_on_bn_and_bias() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    optimizer = build_optimizer(model, TrainConfig(weight_decay=1e-4))
    decays = {p.dim(): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays == {1: 0.0, 4: 1e-4, 2: 1e-4}
    assert optimizer.defaults["nesterov"] is True
    assert build_optimizer(model, TrainConfig(nesterov=False)).defaults["nesterov"] is False
    assert isinstance(build_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3)), torch.optim.AdamW)


def test_multistep_decays_at_epoch_boundaries() -> None:
    rates = _rates(TrainConfig(epochs=4, scheduler="multistep", milestones=[1, 3], gamma=0.1, lr=1.0), 3)
    expected = [1.0] * 3 + [0.1] * 6 + [0.01] * 3
    assert rates == pytest.approx(expected)


def test_step_and_constant() -> None:
    assert _rates(TrainConfig(epochs=4, scheduler="step", step_size=2, gamma=0.2, lr=1.0), 2) == pytest.approx(
        [1.0] * 4 + [0.2] * 4
    )
    assert _rates(TrainConfig(epochs=2, scheduler="constant", lr=0.3), 2) == pytest.approx([0.3] * 4)


def test_cosine_with_warmup_and_floor() -> None:
    rates = _rates(TrainConfig(epochs=5, scheduler="cosine", warmup_epochs=1, lr=1.0, min_lr=0.1), 4)
    assert rates[0] == pytest.approx(0.01) and max(rates) == pytest.approx(1.0) and rates[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[4:]))
    t = 15 / 16  # cosine position of the last step
    assert rates[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def test_onecycle_peaks_and_resumes() -> None:
    config = TrainConfig(epochs=4, scheduler="onecycle", warmup_epochs=1, lr=1.0)
    rates = _rates(config, 5)
    assert max(rates) == pytest.approx(1.0) and rates.index(max(rates)) in (4, 5)
    assert rates[0] == pytest.approx(1.0 / 25) and rates[-1] < 1e-3
    model = nn.Linear(2, 2)
    first = build_optimizer(model, config)
    schedule = LRSchedule(first, config, 5)
    schedule.set_step(7)
    second = build_optimizer(model, config)
    resumed = LRSchedule(second, config, 5)
    second.load_state_dict(first.state_dict())
    resumed.load_state_dict(schedule.state_dict())
    resumed.set_step(8)
    assert second.param_groups[0]["lr"] == pytest.approx(rates[8])
