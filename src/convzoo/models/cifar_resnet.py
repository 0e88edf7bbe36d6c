"""CIFAR ResNets of He et al. (2016), 6n+2 layers of basic blocks with widths 16/32/64.

Shortcuts are a 1x1 conv + BN wherever the shape changes (option B). Module names
follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``downsample``, ``fc``) so
that include/exclude globs read the same on both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convzoo.models.init import init_weights
from convzoo.models.materialize import place
from convzoo.models.options import check_network_options
from convzoo.models.registry import register_model
from convzoo.models.stages import residual_stages


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU: (B, C_in, H, W) -> (B, C_out, H/s, W/s)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, skip: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.skip = skip
        self.downsample: nn.Module | None = None
        if skip and (stride != 1 or in_channels != out_channels):
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.skip:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, three stages of ``depth_per_stage`` basic blocks.

    Args:
        depth_per_stage: n, the number of blocks per stage (depth 6n+2).
        num_classes: classifier size.
        widths: channels of the three stages.
        skip: False builds the plain network (no shortcuts), as in DO-Conv's Table 1.
        zero_init_residual: zero the last BN gamma of each block (a bool).
        in_channels: image channels (a positive int).

    Shapes:
        (B, in_channels, H, W) -> (B, num_classes)
    """

    def __init__(
        self,
        depth_per_stage: int,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
        *,
        skip: bool = True,
        zero_init_residual: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth_per_stage < 1:
            raise ValueError(f"depth_per_stage must be >= 1, got {depth_per_stage}")
        in_channels, zero_init_residual = check_network_options(in_channels, zero_init_residual)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1, self.layer2, self.layer3 = residual_stages(
            widths[0],
            widths,
            depth_per_stage,
            lambda stage, c_in, stride: BasicBlock(c_in, widths[stage], stride, skip=skip),
        )
        channels = widths[-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self, zero_init_last_bn=zero_init_residual, last_bn_names=("bn2",))

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _make(n: int, **defaults: object):
    def builder(
        num_classes: int = 10,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: object,
    ) -> CifarResNet:
        return place(CifarResNet(n, num_classes, **{**defaults, **kwargs}), device=device, dtype=dtype)

    return builder


for _depth in (20, 32, 44, 56, 110):
    register_model(f"cifar_resnet{_depth}")(_make((_depth - 2) // 6))
# The basic-block network with n = 8 that the Multiception paper calls ResNet-50.
register_model("cifar_resnet50")(_make(8))
# ResNet-20 without skips, for DO-Conv's Table 1.
register_model("cifar_plain20")(_make(3, skip=False))
