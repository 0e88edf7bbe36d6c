"""The baselines of the Multiception paper: DSConv and MixConv, each ending in 1x1 (bias) + BN.

* :class:`DSConv2d` (depthwise separable, as the authors' code): depthwise k x k carrying the
  stride -> 1x1 with bias -> BatchNorm(C_out).
* :class:`MixConv2d` (Tan & Le, 2019): the channels are split across kernel sizes (timm's
  ``MixedConv2d``; the first split takes the remainder), each split goes through a depthwise
  conv of its size, then a 1x1 with bias and BatchNorm(C_out). (The authors' code made each
  split a dense conv; this follows the MixConv paper instead.)

Like :class:`~convzoo.ops.multiception.MulticeptionConv2d` they replace a conv *and the
BatchNorm after it*; the zoo presets drop that BN. ``fuse()`` returns
``nn.Sequential(depthwise, pointwise)`` with the BN folded into the 1x1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import MixedConv2d
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from convzoo.ops.conv_spec import (
    ConvSpec,
    NoTorchScript,
    PaddingArg,
    check_channels,
    check_input,
    is_tracing,
    relayout,
    transform_active,
)
from convzoo.ops.depthwise import run_depthwise
from convzoo.ops.multiception import (
    centred_replaceable,
    check_centred_geometry,
    check_kernels,
    memory_format_of,
)
from convzoo.ops.registry import ConvNotReplaceableError, register_conv


class MixedDepthwiseConv2d(MixedConv2d):
    """timm's ``MixedConv2d`` (same parameters and state_dict keys) that also takes an unbatched
    (C, H, W) input, as ``nn.Conv2d`` does: timm's splits dim 1, which is H for an unbatched tensor.
    This one splits and concatenates the channel dim counted from the end (no branch: fx-traceable).

    Shapes:
        (B, C, H, W) -> (B, C, H', W'); unbatched (C, H, W) -> (C, H', W').
    """

    def forward(self, x: Tensor) -> Tensor:
        parts = torch.split(x, self.splits, -3)  # indexed, not unpacked: fx cannot iterate a traced split
        return torch.cat([conv(parts[index]) for index, conv in enumerate(self.values())], -3)


class _SeparableBase(NoTorchScript, nn.Module):
    """depthwise -> pointwise (1x1, bias) -> bn_out; subclasses build ``depthwise``."""

    depthwise: nn.Module

    def _init_common(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int],
        padding: PaddingArg | None,
        factory: dict[str, object],
    ) -> None:
        self.in_channels = check_channels(in_channels, "in_channels")
        self.out_channels = check_channels(out_channels, "out_channels")
        self.kernel_size, self.stride, self.padding = check_centred_geometry(kernel_size, stride, padding)
        self.dilation = (1, 1)
        self.groups = 1
        self.pointwise = nn.Conv2d(self.in_channels, self.out_channels, 1, bias=True, **factory)
        self.bn_out = nn.BatchNorm2d(self.out_channels, **factory)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_in, H, W) -> (B, C_out, floor((H-1)/s)+1, floor((W-1)/s)+1); unbatched (C_in, H, W) as nn.Conv2d."""
        if check_input(x, self.in_channels, type(self).__name__):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if is_tracing() or transform_active() or x.device.type != "cpu":
            return self.bn_out(self.pointwise(self.depthwise(x)))
        fmt = memory_format_of(x)
        x = relayout(x, torch.channels_last)  # oneDNN's depthwise kernels: much faster on CPU
        # back to the caller's layout before bn_out: BN's backward is slow when its gradient and input differ
        return self.bn_out(self.pointwise(self._depthwise_cpu(x)).contiguous(memory_format=fmt))

    def _depthwise_cpu(self, x: Tensor) -> Tensor:
        """``self.depthwise(x)``, each depthwise conv through ``run_depthwise`` (fast wide-kernel weight gradients)."""
        if isinstance(self.depthwise, MixedConv2d):
            parts = torch.split(x, self.depthwise.splits, 1)
            return torch.cat([run_depthwise(conv, part) for conv, part in zip(self.depthwise.values(), parts)], 1)
        return run_depthwise(self.depthwise, x)

    @torch.no_grad()
    def fuse(self) -> nn.Sequential:
        """``nn.Sequential(depthwise, pointwise)`` with BN(C_out) folded into the 1x1 (exact in eval mode).

        MixConv's depthwise is a ``MixedDepthwiseConv2d`` (timm's ``MixedConv2d``, unbatched input too).
        """
        pointwise = fuse_conv_bn_eval(self.pointwise.eval(), self.bn_out.eval())
        self.pointwise.train(self.training)
        self.bn_out.train(self.training)
        return nn.Sequential(self.depthwise, pointwise).train(self.training)


@register_conv(
    "dsconv",
    description="DSConv baseline: depthwise k x k (strided) -> 1x1 with bias -> BN (Multiception placement)",
    skip_reason=centred_replaceable,
    zoo_default=False,
)
class DSConv2d(_SeparableBase):
    """Depthwise separable conv: depthwise k x k with the stride, then 1x1 with bias, then BN.

    Args:
        in_channels, out_channels, kernel_size, stride, padding: as for
            :class:`~convzoo.ops.multiception.MulticeptionConv2d` (odd kernel, centred padding);
            the depthwise kernel is ``kernel_size``.
        device, dtype: factory arguments.

    Shapes:
        (B, C_in, H, W) -> (B, C_out, floor((H - 1) / s) + 1, floor((W - 1) / s) + 1)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_common(in_channels, out_channels, kernel_size, stride, padding, factory)
        c = self.in_channels
        self.depthwise = nn.Conv2d(c, c, self.kernel_size, self.stride, self.padding, groups=c, bias=False, **factory)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> DSConv2d:
        """A freshly initialised DSConv with ``conv``'s geometry, device and dtype."""
        reason = centred_replaceable(conv)
        if reason is not None:
            raise ConvNotReplaceableError(f"cannot replace {ConvSpec.from_conv(conv).describe()} by a DSConv: {reason}")
        like = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        return cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride), **like)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


@register_conv(
    "mixconv",
    description="MixConv baseline: channels split across kernel sizes, depthwise per split -> 1x1 -> BN "
    "(Multiception placement)",
    skip_reason=centred_replaceable,
    zoo_default=False,
)
class MixConv2d(_SeparableBase):
    """Mixed depthwise conv (channel split across ``kernels``) with the stride, then 1x1 with bias, then BN.

    Args:
        in_channels, out_channels, kernel_size, stride, padding: as for
            :class:`~convzoo.ops.multiception.MulticeptionConv2d` (odd kernel, centred padding).
        kernels: keyword-only, kernel size per channel split (timm's split: equal parts, the first
            takes the remainder); needs ``in_channels >= len(kernels)``.
        device, dtype: factory arguments.

    Shapes:
        (B, C_in, H, W) -> (B, C_out, floor((H - 1) / s) + 1, floor((W - 1) / s) + 1)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg | None = None,
        *,
        kernels: Sequence[int] = (3, 5, 7),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_common(in_channels, out_channels, kernel_size, stride, padding, factory)
        self.kernels = check_kernels(kernels)
        if self.in_channels < len(self.kernels):
            raise ValueError(
                f"in_channels={in_channels} cannot be split across {len(self.kernels)} kernels {self.kernels}; "
                "MixConv needs at least one channel per kernel size"
            )
        if self.stride[0] != self.stride[1]:
            raise ValueError(f"MixConv2d needs a square stride (timm MixedConv2d), got {stride!r}")
        c = self.in_channels
        self.depthwise = MixedDepthwiseConv2d(
            c, c, list(self.kernels), stride=self.stride[0], depthwise=True, **factory
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, kernels: Sequence[int] = (3, 5, 7)) -> MixConv2d:
        """A freshly initialised MixConv with ``conv``'s geometry, device and dtype."""
        reason = centred_replaceable(conv)
        kernels = check_kernels(kernels)
        if reason is None and conv.in_channels < len(kernels):
            reason = f"in_channels={conv.in_channels} < {len(kernels)} kernels {kernels} (a channel per kernel size)"
        if reason is None and conv.stride[0] != conv.stride[1]:
            reason = f"stride {tuple(conv.stride)} is not square (timm's MixedConv2d takes one stride)"
        if reason is not None:
            raise ConvNotReplaceableError(
                f"cannot replace {ConvSpec.from_conv(conv).describe()} by a MixConv: {reason}"
            )
        like = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        return cls(
            conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride), kernels=kernels, **like
        )

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernels={self.kernels}, stride={self.stride}"
