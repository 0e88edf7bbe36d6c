"""Tiny models registered for the training tests (imported by conftest.py and by subprocess entry points)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convzoo.models import list_models, register_model


class TinyCNN(nn.Module):
    """conv3x3-(BN)-ReLU-pool-linear: (B, 3, H, W) -> (B, num_classes)."""

    def __init__(self, num_classes: int = 10, *, batchnorm: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=not batchnorm)
        self.bn1 = nn.BatchNorm2d(8) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class NaNAfter(TinyCNN):
    """Outputs NaN from its 4th training forward on: a run that diverges."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls >= 4:
                out = out * float("nan")
        return out


if "test_tiny" not in list_models():
    register_model("test_tiny")(lambda num_classes=10, **kw: TinyCNN(num_classes, **kw))
    register_model("test_tiny_nobn")(lambda num_classes=10, **kw: TinyCNN(num_classes, batchnorm=False, **kw))
    register_model("test_nan")(lambda num_classes=10, **kw: NaNAfter(num_classes, **kw))
