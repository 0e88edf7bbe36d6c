"""Pre-activation CIFAR ResNets of He et al., "Identity Mappings in Deep Residual Networks" (2016).

Basic blocks give 6n+2 layers (``cifar_preresnet20/56/110``); bottleneck blocks with
expansion 4 give 9n+2 layers (``cifar_preresnet164/200``, CPWC's Table 1 and DO-Conv's
"ResNet-v2"). Every block is BN-ReLU-conv ... ; where the shape changes, the shortcut is a
1x1 conv (no BN) applied to the pre-activated input, as in the reference code. A final
BN-ReLU precedes global pooling. Module names follow torchvision (``layer1.0.conv1``,
``downsample``, ``fc``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convzoo.models.materialize import materialize, reset_zoo_parameters_
from convzoo.models.options import check_network_options
from convzoo.models.registry import register_model
from convzoo.models.stages import residual_stages


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut: (B, C_in, H, W) -> (B, C_out, H/s, W/s)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, out_channels, 3, 1, 1, bias=False)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3 (stride), BN-ReLU-conv1x1 (x4) plus shortcut.

    Shapes: (B, C_in, H, W) -> (B, 4 * channels, H/s, W/s).
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


_BLOCKS: dict[str, type[PreActBasicBlock | PreActBottleneck]] = {
    "basic": PreActBasicBlock,
    "bottleneck": PreActBottleneck,
}


class CifarPreResNet(nn.Module):
    """Pre-activation ResNet for 32x32 inputs: 3x3 stem, three stages, final BN-ReLU, pool, fc.

    Args:
        depth: 6n+2 for ``block="basic"``, 9n+2 for ``block="bottleneck"``.
        num_classes: classifier size.
        block: ``"basic"`` or ``"bottleneck"``.
        widths: block widths of the three stages (bottleneck outputs are 4x these).
        zero_init_residual: zero the gamma of the BN before each block's last conv, so every
            residual branch starts at zero and each block as an identity.
        in_channels: image channels.

    Shapes:
        (B, in_channels, H, W) -> (B, num_classes)
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        *,
        block: str = "basic",
        widths: tuple[int, int, int] = (16, 32, 64),
        zero_init_residual: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {block!r}")
        per_block = 2 if block == "basic" else 3
        if not isinstance(depth, int) or depth < 3 * per_block + 2 or (depth - 2) % (3 * per_block):
            form = "6n+2" if block == "basic" else "9n+2"
            raise ValueError(f"depth must be {form} with n >= 1 for {block} blocks, got {depth!r}")
        in_channels, zero_init_residual = check_network_options(in_channels, zero_init_residual)
        n = (depth - 2) // (3 * per_block)
        block_cls = _BLOCKS[block]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stage_out = [width * block_cls.expansion for width in widths]
        self.layer1, self.layer2, self.layer3 = residual_stages(
            widths[0], stage_out, n, lambda stage, c_in, stride: block_cls(c_in, widths[stage], stride)
        )
        channels = stage_out[-1]
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.zero_init_residual = zero_init_residual
        self._last_bn = "bn2" if block == "basic" else "bn3"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init for convs, BN gamma 1 (0 before each block's last conv if ``zero_init_residual``)."""
        reset_zoo_parameters_(self, zero_init_last_bn=self.zero_init_residual, last_bn_names=(self._last_bn,))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        return self.fc(self.avgpool(x).flatten(1))


def _make(depth: int, block: str):
    def builder(
        num_classes: int = 10,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: object,
    ) -> CifarPreResNet:
        return materialize(
            lambda: CifarPreResNet(depth, num_classes, block=block, **kwargs), device=device, dtype=dtype
        )

    builder.__doc__ = f"Pre-activation ResNet-{depth} ({block} blocks) for 32x32 inputs."
    return builder


for _depth in (20, 56, 110):
    register_model(f"cifar_preresnet{_depth}")(_make(_depth, "basic"))
for _depth in (164, 200):
    register_model(f"cifar_preresnet{_depth}")(_make(_depth, "bottleneck"))
