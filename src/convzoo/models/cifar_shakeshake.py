"""Shake-Shake ResNet of Gastaldi, "Shake-Shake regularization" (2017): Multiception's ShakeNet-26-2x96d.

Three stages of four residual blocks (depth 6*4+2 = 26) with widths 96/192/384 ("2x96d": two
branches, 96 channels in the first stage). Each branch is ReLU-conv3x3 (stride)-BN-ReLU-conv3x3-BN.
In training the branches are mixed with a random per-image coefficient alpha in the forward
pass and an independent beta in the backward pass ("Shake-Shake-Image"); at evaluation they
are averaged. Where the shape changes, the shortcut is ReLU, then two 1x1 convs (each giving
half the channels) on the input subsampled at even and at odd pixel positions, concatenated,
then BN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from convzoo.models.materialize import materialize, reset_zoo_parameters_
from convzoo.models.options import check_network_options
from convzoo.models.registry import register_model
from convzoo.models.stages import residual_stages


class ShakeShakeFunction(torch.autograd.Function):
    """y = alpha * x1 + (1 - alpha) * x2 forward; gradients beta * g and (1 - beta) * g backward."""

    @staticmethod
    def forward(ctx, x1: Tensor, x2: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
        ctx.save_for_backward(beta)
        return torch.lerp(x2, x1, alpha)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        (beta,) = ctx.saved_tensors
        grad1 = grad * beta
        return grad1, grad - grad1, None, None


def shake_shake(x1: Tensor, x2: Tensor, training: bool, generator: torch.Generator | None = None) -> Tensor:
    """Mix two branch outputs (B, C, H, W): random per-image shake in training, the mean at eval.

    Args:
        x1, x2: branch outputs of the same shape.
        training: draw alpha, beta ~ U(0, 1) independently per image (else alpha = beta = 1/2).
        generator: random generator for alpha and beta, on any device (they are drawn on its device,
            then moved to the branches'; a CPU generator for CUDA branches is fine).
    """
    if not training:
        return (x1 + x2) * 0.5
    shape = (x1.shape[0],) + (1,) * (x1.dim() - 1)
    device = x1.device if generator is None else generator.device
    alpha = torch.rand(shape, generator=generator, device=device, dtype=x1.dtype).to(x1.device)
    beta = torch.rand(shape, generator=generator, device=device, dtype=x1.dtype).to(x1.device)
    return ShakeShakeFunction.apply(x1, x2, alpha, beta)


fx.wrap("shake_shake")  # a leaf for torch.fx, so deploy() can trace the model and fold its BNs


class ShakeBranch(nn.Module):
    """ReLU-conv3x3 (stride)-BN-ReLU-conv3x3-BN: (B, C_in, H, W) -> (B, C_out, H/s, W/s)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.relu1 = nn.ReLU(inplace=False)  # the input is also the shortcut's
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu2(self.bn1(self.conv1(self.relu1(x))))))


class ShakeShortcut(nn.Module):
    """Projection shortcut: ReLU, two 1x1 convs on the even- and odd-offset subsampled input, concat, BN.

    Shapes: (B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s)); ``C_out`` must be even.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"out_channels must be even for the shake-shake shortcut, got {out_channels}")
        self.stride = stride
        self.relu = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_channels, out_channels // 2, 1, stride, bias=False)
        self.conv2 = nn.Conv2d(in_channels, out_channels // 2, 1, stride, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))  # the pixel one step down-right, zero at the border
        return self.bn(torch.cat((self.conv1(x), self.conv2(shifted)), 1))


class ShakeBlock(nn.Module):
    """Two ShakeBranches mixed by shake-shake, plus the shortcut: (B, C_in, H, W) -> (B, C_out, H/s, W/s)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.branch1 = ShakeBranch(in_channels, out_channels, stride)
        self.branch2 = ShakeBranch(in_channels, out_channels, stride)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = ShakeShortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = shake_shake(self.branch1(x), self.branch2(x), self.training)
        return out + (x if self.downsample is None else self.downsample(x))


class CifarShakeShake(nn.Module):
    """Shake-Shake ResNet for 32x32 inputs: conv3x3-BN stem, three stages of ShakeBlocks, ReLU, pool, fc.

    Args:
        depth: 6n+2 (26 gives four blocks per stage).
        base_width: channels of the first stage (96 for "2x96d"); doubled per stage.
        num_classes: classifier size.
        zero_init_residual: zero the last BN gamma of both branches of each block.
        in_channels: image channels.

    Shapes:
        (B, in_channels, H, W) -> (B, num_classes)
    """

    def __init__(
        self,
        depth: int = 26,
        base_width: int = 96,
        num_classes: int = 10,
        *,
        zero_init_residual: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth!r}")
        if not isinstance(base_width, int) or base_width < 1:
            raise ValueError(f"base_width must be a positive int, got {base_width!r}")
        in_channels, zero_init_residual = check_network_options(in_channels, zero_init_residual)
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stage_out = [base_width * 2**stage for stage in range(3)]
        self.layer1, self.layer2, self.layer3 = residual_stages(
            16, stage_out, n, lambda stage, c_in, stride: ShakeBlock(c_in, stage_out[stage], stride)
        )
        channels = stage_out[-1]
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.zero_init_residual = zero_init_residual
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init for convs, BN gamma 1 (0 for each branch's last BN if ``zero_init_residual``)."""
        reset_zoo_parameters_(self, zero_init_last_bn=self.zero_init_residual, last_bn_names=("bn2",))

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(self.relu(x)).flatten(1))


@register_model("cifar_shakeshake26_2x96d")
def cifar_shakeshake26_2x96d(
    num_classes: int = 10,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: object,
) -> CifarShakeShake:
    """Shake-Shake-Image ResNet-26 2x96d for 32x32 inputs."""
    return materialize(lambda: CifarShakeShake(26, 96, num_classes, **kwargs), device=device, dtype=dtype)
