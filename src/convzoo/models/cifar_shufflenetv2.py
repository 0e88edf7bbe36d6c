"""CIFAR ShuffleNetV2 as in the widely used CIFAR definition (kuangliu/pytorch-cifar) that CAC's Table 1 counts.

Ma et al., "ShuffleNet V2" (2018), adapted to 32x32 inputs: a 24-channel 3x3 stride-1 stem with
no max-pool; three stages, each a down-sampling unit followed by (3, 7, 3) basic units, with
116/232/464 channels at width 1.0; a 1x1 conv to 1024; global pooling; fc. Basic units split the
channels in half, transform one half (conv1x1-BN-ReLU, depthwise conv3x3-BN, conv1x1-BN-ReLU),
concatenate and shuffle. 45.0M MACs and 1.26M parameters on 32x32 inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convzoo.models.materialize import materialize, reject_zero_init_residual, reset_zoo_parameters_
from convzoo.models.options import check_network_options
from convzoo.models.registry import register_model

# Stage output channels (three stages, then the last 1x1 conv) for each width multiplier.
WIDTHS: dict[float, tuple[int, int, int, int]] = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (224, 488, 976, 2048),
}


class ShuffleBasicUnit(nn.Module):
    """Split, transform the second half, concat, shuffle: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"channels must be even for a ShuffleNetV2 unit, got {channels}")
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.relu = nn.ReLU(inplace=True)
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        kept, transformed = x.chunk(2, dim=1)
        out = self.relu(self.bn1(self.conv1(transformed)))
        out = self.bn2(self.conv2(out))
        out = self.relu(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat((kept, out), 1))


class ShuffleDownUnit(nn.Module):
    """Two stride-2 paths concatenated, then shuffled: (B, C_in, H, W) -> (B, C_out, H/2, W/2).

    Left: depthwise conv3x3/2-BN, conv1x1-BN-ReLU. Right: conv1x1-BN-ReLU, depthwise conv3x3/2-BN,
    conv1x1-BN-ReLU. Each path gives ``C_out // 2`` channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"out_channels must be even for a ShuffleNetV2 unit, got {out_channels}")
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        left = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu(self.bn3(self.conv3(x)))
        right = self.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat((left, right), 1))


class CifarShuffleNetV2(nn.Module):
    """ShuffleNetV2 for 32x32 inputs.

    Args:
        width: width multiplier, one of ``WIDTHS`` (0.5, 1.0, 1.5, 2.0).
        num_classes: classifier size.
        units: basic units per stage after each down-sampling unit.
        in_channels: image channels.

    Shapes:
        (B, in_channels, H, W) -> (B, num_classes)
    """

    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = 10,
        *,
        units: tuple[int, int, int] = (3, 7, 3),
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if width not in WIDTHS:
            raise ValueError(f"width must be one of {sorted(WIDTHS)}, got {width!r}")
        widths = WIDTHS[width]
        in_channels, _ = check_network_options(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 24, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=True)
        channels = 24
        stages = []
        for out_channels, count in zip(widths[:3], units, strict=True):
            stages.append(
                nn.Sequential(
                    ShuffleDownUnit(channels, out_channels), *(ShuffleBasicUnit(out_channels) for _ in range(count))
                )
            )
            channels = out_channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(channels, widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init for convs, BN gamma 1, default init for the classifier."""
        reset_zoo_parameters_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("cifar_shufflenetv2")
def cifar_shufflenetv2(
    num_classes: int = 10,
    *,
    width: float = 1.0,
    zero_init_residual: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: object,
) -> CifarShuffleNetV2:
    """ShuffleNetV2 (width 1.0 by default) for 32x32 inputs."""
    reject_zero_init_residual(zero_init_residual, "cifar_shufflenetv2")
    return materialize(lambda: CifarShuffleNetV2(width, num_classes, **kwargs), device=device, dtype=dtype)
