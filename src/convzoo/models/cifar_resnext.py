"""CIFAR ResNeXt-29 of Xie et al., "Aggregated Residual Transformations" (2017), CPWC's Table 1.

Three stages of three bottleneck blocks (depth 9*3+2 = 29) with outputs 256/512/1024; block
width is cardinality x base width, doubled per stage (``8x64d``: 512, 1024, 2048). Each block
is conv1x1-BN-ReLU, grouped conv3x3 (stride)-BN-ReLU, conv1x1-BN, plus the shortcut (1x1 conv +
BN where the shape changes), then ReLU. ``8x64d`` has 34.4M parameters, ``16x64d`` 68.1M.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convzoo.models.materialize import materialize, reset_zoo_parameters_
from convzoo.models.options import check_network_options
from convzoo.models.registry import register_model
from convzoo.models.stages import residual_stages


class ResNeXtBottleneck(nn.Module):
    """Aggregated-transform bottleneck: (B, C_in, H, W) -> (B, C_out, H/s, W/s).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the grouped 3x3 conv and of the projection shortcut.
        cardinality: number of groups of the 3x3 conv.
        width: channels inside the block (a multiple of ``cardinality``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, cardinality: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNeXt(nn.Module):
    """ResNeXt for 32x32 inputs: 3x3 stem to 64 channels, three stages, pool, fc.

    Args:
        depth: 9n+2 (29 gives three blocks per stage).
        cardinality: groups of each block's 3x3 conv (C in "C x d").
        base_width: channels per group in the first stage (d in "C x d").
        num_classes: classifier size.
        widths: output channels of the three stages.
        zero_init_residual: zero the last BN gamma of each block.
        in_channels: image channels.

    Shapes:
        (B, in_channels, H, W) -> (B, num_classes)
    """

    def __init__(
        self,
        depth: int = 29,
        cardinality: int = 8,
        base_width: int = 64,
        num_classes: int = 10,
        *,
        widths: tuple[int, int, int] = (256, 512, 1024),
        zero_init_residual: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 11 or (depth - 2) % 9:
            raise ValueError(f"depth must be 9n+2 with n >= 1, got {depth!r}")
        for name, value in (("cardinality", cardinality), ("base_width", base_width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        in_channels, zero_init_residual = check_network_options(in_channels, zero_init_residual)
        n = (depth - 2) // 9
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1, self.layer2, self.layer3 = residual_stages(
            64,
            widths,
            n,
            lambda stage, c_in, stride: ResNeXtBottleneck(
                c_in, widths[stage], stride, cardinality, cardinality * base_width * 2**stage
            ),
        )
        channels = widths[-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.zero_init_residual = zero_init_residual
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init for convs, BN gamma 1 (0 for each block's last BN if ``zero_init_residual``)."""
        reset_zoo_parameters_(self, zero_init_last_bn=self.zero_init_residual, last_bn_names=("bn3",))

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _make(cardinality: int, base_width: int):
    def builder(
        num_classes: int = 10,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: object,
    ) -> CifarResNeXt:
        return materialize(
            lambda: CifarResNeXt(29, cardinality, base_width, num_classes, **kwargs), device=device, dtype=dtype
        )

    builder.__doc__ = f"ResNeXt-29 ({cardinality}x{base_width}d) for 32x32 inputs."
    return builder


register_model("cifar_resnext29_8x64d")(_make(8, 64))
register_model("cifar_resnext29_16x64d")(_make(16, 64))
