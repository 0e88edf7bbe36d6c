"""CIFAR DenseNet-121 as in the widely used CIFAR definition (kuangliu/pytorch-cifar) that CAC's Table 1 counts.

Growth rate 32, dense blocks of (6, 12, 24, 16) bottleneck layers (BN-ReLU-conv1x1 to 4*growth,
BN-ReLU-conv3x3 to growth, concatenated after the layer's input), a 3x3 stem conv to 2*growth = 64
channels with no pooling, transitions BN-ReLU-conv1x1 (reduction 0.5)-avgpool2, and a final
BN-ReLU before global pooling: 888.5M MACs and 7.0M parameters on 32x32 inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convzoo.models.materialize import materialize, reject_zero_init_residual, reset_zoo_parameters_
from convzoo.models.options import check_network_options
from convzoo.models.registry import register_model


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3, concatenated: (B, C, H, W) -> (B, C + growth, H, W)."""

    def __init__(self, in_channels: int, growth_rate: int, bottleneck_width: int = 4) -> None:
        super().__init__()
        inner = bottleneck_width * growth_rate
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, growth_rate, 3, 1, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return torch.cat((out, x), 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1-avgpool2: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(self.relu(self.bn(x))), 2)


class CifarDenseNet(nn.Module):
    """DenseNet-BC for 32x32 inputs.

    Args:
        block_config: dense layers per block.
        growth_rate: channels each dense layer adds.
        reduction: transitions keep ``floor(C * reduction)`` channels.
        num_classes: classifier size.
        in_channels: image channels.

    Shapes:
        (B, in_channels, H, W) -> (B, num_classes)
    """

    def __init__(
        self,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        growth_rate: int = 32,
        reduction: float = 0.5,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not block_config or any(not isinstance(n, int) or n < 1 for n in block_config):
            raise ValueError(f"block_config must be a non-empty sequence of positive ints, got {block_config!r}")
        if not 0 < reduction <= 1:
            raise ValueError(f"reduction must be in (0, 1], got {reduction!r}")
        in_channels, _ = check_network_options(in_channels)
        channels = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        for index, num_layers in enumerate(block_config, start=1):
            layers = []
            for _ in range(num_layers):
                layers.append(DenseLayer(channels, growth_rate))
                channels += growth_rate
            self.add_module(f"dense{index}", nn.Sequential(*layers))
            if index < len(block_config):
                out_channels = math.floor(channels * reduction)
                self.add_module(f"trans{index}", Transition(channels, out_channels))
                channels = out_channels
        self.num_blocks = len(block_config)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init for convs, BN gamma 1, default init for the classifier."""
        reset_zoo_parameters_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for index in range(1, self.num_blocks + 1):
            x = getattr(self, f"dense{index}")(x)
            if index < self.num_blocks:
                x = getattr(self, f"trans{index}")(x)
        x = self.relu(self.bn(x))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("cifar_densenet121")
def cifar_densenet121(
    num_classes: int = 10,
    *,
    zero_init_residual: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: object,
) -> CifarDenseNet:
    """DenseNet-121 (growth 32, blocks 6/12/24/16, 3x3 stem to 64) for 32x32 inputs."""
    reject_zero_init_residual(zero_init_residual, "cifar_densenet121")
    return materialize(lambda: CifarDenseNet(num_classes=num_classes, **kwargs), device=device, dtype=dtype)
