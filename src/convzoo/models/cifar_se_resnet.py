"""CIFAR SE-ResNet of Hu et al., "Squeeze-and-Excitation Networks" (2018): Multiception's SeNet-56.

The CIFAR ResNet (basic blocks, widths 16/32/64, 6n+2 layers, 1x1-conv + BN projection
shortcuts) with a squeeze-and-excitation unit on each residual branch, after its second BN and
before the addition, with reduction 8. The excitation MLP is made of ``nn.Linear`` layers, so
operators that replace 1x1 convs (CPWC) leave it alone, as the papers did. Stage and block
names are those of ``cifar_resnet*`` (``layer1.0.conv1``, ...), so the same placement presets apply.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convzoo.models.cifar_resnet import BasicBlock
from convzoo.models.materialize import materialize, reset_zoo_parameters_
from convzoo.models.options import check_network_options
from convzoo.models.registry import register_model
from convzoo.models.stages import residual_stages


class SqueezeExcite(nn.Module):
    """Channel gating x * sigmoid(fc2(relu(fc1(mean_hw(x))))): (B, C, H, W) -> (B, C, H, W).

    Args:
        channels: C.
        reduction: the hidden layer has ``max(1, C // reduction)`` units.
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        if not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"reduction must be a positive int, got {reduction!r}")
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.sigmoid(self.fc2(self.relu(self.fc1(x.mean((2, 3))))))
        return x * scale[:, :, None, None]


class SEBasicBlock(BasicBlock):
    """conv3x3-BN-ReLU-conv3x3-BN-SE plus shortcut, then ReLU: (B, C_in, H, W) -> (B, C_out, H/s, W/s)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, reduction: int = 8) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.se = SqueezeExcite(out_channels, reduction)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarSEResNet(nn.Module):
    """SE-ResNet for 32x32 inputs: 3x3 stem, three stages of SE basic blocks, pool, fc.

    Args:
        depth: 6n+2.
        num_classes: classifier size.
        reduction: SE reduction ratio.
        widths: channels of the three stages.
        zero_init_residual: zero the gamma of each block's second BN (the branch then starts at 0).
        in_channels: image channels.

    Shapes:
        (B, in_channels, H, W) -> (B, num_classes)
    """

    def __init__(
        self,
        depth: int = 56,
        num_classes: int = 10,
        *,
        reduction: int = 8,
        widths: tuple[int, int, int] = (16, 32, 64),
        zero_init_residual: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth!r}")
        in_channels, zero_init_residual = check_network_options(in_channels, zero_init_residual)
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1, self.layer2, self.layer3 = residual_stages(
            widths[0],
            widths,
            n,
            lambda stage, c_in, stride: SEBasicBlock(c_in, widths[stage], stride, reduction=reduction),
        )
        channels = widths[-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.zero_init_residual = zero_init_residual
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init for convs, default init for linears, BN gamma 1 (0 for ``bn2`` if ``zero_init_residual``)."""
        reset_zoo_parameters_(self, zero_init_last_bn=self.zero_init_residual, last_bn_names=("bn2",))

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("cifar_se_resnet56")
def cifar_se_resnet56(
    num_classes: int = 10,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: object,
) -> CifarSEResNet:
    """SE-ResNet-56 (reduction 8) for 32x32 inputs."""
    return materialize(lambda: CifarSEResNet(56, num_classes, **kwargs), device=device, dtype=dtype)
