"""CPWC: contextual pointwise convolution (Mazumder, Singh & Namboodiri, ICASSP 2020).

A CPWC keeps the pointwise conv (PWC) and adds a two-stage context unit in parallel::

    out = PWC(x) + s1 + stage2(s1),     s1 = stage1(x)

* stage 1: Z filters of 3x3 (Z = out_channels), filter i reading the channel group G_i of
  the input (§2 "Selection of Channels in Groups", see :func:`cpwc_grouping_plan`), with the
  PWC's stride so the shapes agree for a strided 1x1 conv;
* stage 2: a depthwise 3x3 on stage 1's output (stride 1).

Every (filter i, channel c in G_i) pair is one *connection* with its own 3x3 kernel; there are
``K = max(C, Z)`` of them, and ``stage1_weight`` (K, 1, 3, 3) holds them in plan order (filter
by filter, channels ascending). Because the plan is monotonic, stage 1 is computed exactly as

    Z < C:  depthwise 3x3 over the C input channels, then a sum over each group's channels;
    Z == C: depthwise 3x3;
    Z > C:  gather the K = Z input channels the filters read (one index_select), depthwise 3x3,

i.e. one depthwise conv call plus at most one gather or one segment sum (two for a plan with a
remainder) -- never a loop over groups. The MACs are the paper's ``sum_i r_i * 9`` per pixel.
This beats the literal grouped conv (``groups=Z``, ``r`` channels per group, or a depthwise
conv with a channel multiplier) on CPU by a wide margin, because oneDNN has fast kernels only
for one-in-one-out depthwise convs; see benchmarks/results/cpwc.md.

Stage 2 and its residual are one conv: ``s1 + dw(s1, W2) == dw(s1, W2 + I)`` where ``I`` is the
3x3 identity kernel (1 at the centre), exact with zero padding 1 and stride 1.

Deploy: there is no ``fuse()``. The only exact merge of the PWC with the context paths is a
dense 3x3 conv (the PWC at the kernel centre plus the block-sparse stage-1 kernels), which
needs 9x the PWC's MACs; stage 2 cannot merge with stage 1 into a 5x5 conv because stage 2
zero-pads stage 1's *output*, which differs from a 5x5 conv at the borders. The only free
fold (stage 2's residual) is already part of the training form. A BatchNorm after a CPWC does
fold exactly (:meth:`CPWConv2d.fuse_batchnorm`), but ``deploy()`` folds BNs only into
``nn.Conv2d``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from convzoo.ops.conv_spec import (
    ConvAttributes,
    ConvSpec,
    NoTorchScript,
    check_bool,
    check_channels,
    check_input,
    inherit_requires_grad,
    to_pair,
)
from convzoo.ops.registry import ConvNotReplaceableError, needs_pointwise, register_conv

CONTEXT_KERNEL = 3


@dataclass(frozen=True)
class CPWCGroupingPlan:
    """Which input channels feed each stage-1 filter, exactly as §2 of the paper says.

    With C = ``in_channels`` and Z = ``out_channels``:

    * Case 1, Z == C: filter i reads channel i alone.
    * Case 2, Z < C: q, rm = divmod(C, Z); the first rm filters read q + 1 channels and the rest q,
      taking consecutive channels in order (filter 0 reads channels 0..r_0-1, and so on).
    * Case 3, Z > C: q, rm = divmod(Z, C); every filter reads one channel; the first rm channels
      are each read by q + 1 consecutive filters and the rest by q. (This is the layout of a
      depthwise conv with a channel multiplier, filter o reading channel o // q when rm == 0.)

    Attributes:
        in_channels: C.
        out_channels: Z, the number of stage-1 filters.
    """

    in_channels: int
    out_channels: int

    def __post_init__(self) -> None:
        check_channels(self.in_channels, "in_channels")
        check_channels(self.out_channels, "out_channels")

    @property
    def case(self) -> int:
        """The paper's case: 1 (Z == C), 2 (Z < C) or 3 (Z > C)."""
        if self.out_channels == self.in_channels:
            return 1
        return 2 if self.out_channels < self.in_channels else 3

    @property
    def quotient_remainder(self) -> tuple[int, int]:
        """(q, rm): divmod(C, Z) in cases 1-2, divmod(Z, C) in case 3."""
        big, small = max(self.in_channels, self.out_channels), min(self.in_channels, self.out_channels)
        return divmod(big, small)

    @property
    def num_connections(self) -> int:
        """K = sum_i r_i = max(C, Z): the number of 3x3 kernels in stage 1."""
        return max(self.in_channels, self.out_channels)

    @functools.cached_property
    def segments(self) -> tuple[tuple[int, int], ...]:
        """Runs of equal blocks as (blocks, connections per block), first rm blocks first.

        A block is a group of q + 1 or q channels (cases 1-2) or the q + 1 or q filters sharing
        one channel (case 3); empty runs are left out, so a plan without remainder has one run.
        """
        q, rm = self.quotient_remainder
        blocks = min(self.in_channels, self.out_channels)
        return tuple((count, size) for count, size in ((rm, q + 1), (blocks - rm, q)) if count)

    @functools.cached_property
    def _block_of_connection(self) -> tuple[int, ...]:
        return tuple(block for block, size in enumerate(self._block_sizes) for _ in range(size))

    @functools.cached_property
    def _block_sizes(self) -> tuple[int, ...]:
        return tuple(size for count, size in self.segments for _ in range(count))

    @functools.cached_property
    def connection_channels(self) -> tuple[int, ...]:
        """The input channel read by each of the K stage-1 kernels, in ``stage1_weight`` order."""
        if self.case == 3:
            return self._block_of_connection
        return tuple(range(self.in_channels))

    @functools.cached_property
    def connection_filters(self) -> tuple[int, ...]:
        """The stage-1 filter (output channel) of each of the K stage-1 kernels."""
        if self.case == 3:
            return tuple(range(self.out_channels))
        return self._block_of_connection

    @functools.cached_property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """``groups[i]``: the input channels G_i that stage-1 filter i reads (length Z)."""
        members: list[list[int]] = [[] for _ in range(self.out_channels)]
        for channel, filter_index in zip(self.connection_channels, self.connection_filters):
            members[filter_index].append(channel)
        return tuple(tuple(m) for m in members)

    @property
    def channels_per_filter(self) -> tuple[int, ...]:
        """r_i, the size of each group."""
        return tuple(len(g) for g in self.groups)

    @functools.cached_property
    def filters_per_channel(self) -> tuple[int, ...]:
        """How many stage-1 filters read each input channel (1 in cases 1-2)."""
        counts = [0] * self.in_channels
        for channel in self.connection_channels:
            counts[channel] += 1
        return tuple(counts)


def cpwc_grouping_plan(in_channels: int, out_channels: int) -> CPWCGroupingPlan:
    """The §2 grouping plan of a CPWC from ``in_channels`` (C) to ``out_channels`` (Z).

    >>> cpwc_grouping_plan(5, 2).groups
    ((0, 1, 2), (3, 4))
    >>> cpwc_grouping_plan(2, 5).groups
    ((0,), (0,), (0,), (1,), (1,))
    """
    return CPWCGroupingPlan(in_channels, out_channels)


@register_conv(
    "cpwc",
    description="CPWC: 1x1 conv plus a grouped-3x3 / depthwise-3x3 context unit (replaces every 1x1 conv)",
    skip_reason=needs_pointwise,
    zoo_default=True,
)
class CPWConv2d(NoTorchScript, ConvAttributes, nn.Module):
    """Contextual pointwise convolution: a drop-in for a 1x1 ``nn.Conv2d`` with ``groups=1``.

    Args:
        in_channels: C.
        out_channels: Z.
        stride: stride of the PWC and of stage 1 (int or pair).
        bias: learnable bias on the output (the PWC's bias).
        stage2: keyword-only; False drops stage 2 (the paper's "w/o Stage 2", Tables 1-2).
        pointwise: keyword-only; False drops the PWC (the paper's "w/o PWC", Table 4).
        zero_init_context: keyword-only; start stage 1 at zero, so the whole context is zero and
            the module computes exactly its PWC. Default False, as in the paper, which trains
            CPWC networks from scratch with the context unit initialised like any conv. Set it
            when fine-tuning a converted pretrained model, so training starts from the
            pretrained function. Stage 2 keeps its random init: its input is zero at first, and
            stage 1 still gets gradients through the direct ``s1`` term.
        device, dtype: keyword-only factory arguments.

    Attributes:
        plan: the :class:`CPWCGroupingPlan`.
        weight: the PWC kernel (Z, C, 1, 1), or None without the PWC.
        bias: (Z,) or None.
        stage1_weight: (K, 1, 3, 3), one 3x3 kernel per connection in ``plan`` order, K = max(C, Z).
        stage2_weight: (Z, 1, 3, 3) depthwise kernels, or None without stage 2.
        kernel_size, padding, dilation, groups: those of the replaced 1x1 conv.

    Shapes:
        input (B, C, H, W) -> output (B, Z, H', W') with H' = floor((H - 1) / stride) + 1,
        exactly as the 1x1 conv it replaces; an unbatched (C, H, W) input gives (Z, H', W').
    """

    weight: nn.Parameter | None
    bias: nn.Parameter | None
    stage2_weight: nn.Parameter | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int | tuple[int, int] = 1,
        bias: bool = False,
        *,
        stage2: bool = True,
        pointwise: bool = True,
        zero_init_context: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("stage2", stage2), ("pointwise", pointwise), ("zero_init_context", zero_init_context)):
            check_bool(value, name)
        if zero_init_context and not pointwise:
            raise ValueError(
                "zero_init_context=True needs pointwise=True: without the PWC a zero context makes the "
                "module output identically zero"
            )
        self.spec = ConvSpec.create(in_channels, out_channels, 1, to_pair(stride, "stride"), 0, 1, 1, bias)
        self.plan = cpwc_grouping_plan(in_channels, out_channels)
        self.stage2 = stage2
        self.pointwise = pointwise
        self.zero_init_context = zero_init_context
        factory = {"device": device, "dtype": dtype}
        k = CONTEXT_KERNEL
        if pointwise:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1, **factory))
        else:
            self.register_parameter("weight", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.stage1_weight = nn.Parameter(torch.empty(self.plan.num_connections, 1, k, k, **factory))
        if stage2:
            self.stage2_weight = nn.Parameter(torch.empty(out_channels, 1, k, k, **factory))
        else:
            self.register_parameter("stage2_weight", None)
        self.register_buffer("stage2_identity", torch.empty(1, 1, k, k, **factory), persistent=False)
        channels = None
        if self.plan.case == 3:
            channels = torch.empty(self.plan.num_connections, dtype=torch.long, device=device)
        self.register_buffer("stage1_channels", channels, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each kernel as nn.Conv2d initialises it (uniform, bound 1/sqrt(fan_in)); see zero_init_context.

        Also fills the two constant buffers (stage 2's identity kernel, case 3's channel index), so that a
        module built on the meta device and allocated with ``to_empty(device=...)`` is made whole by this call.
        """
        k = CONTEXT_KERNEL
        self.stage2_identity.zero_()[..., k // 2, k // 2] = 1
        if self.stage1_channels is not None:
            self.stage1_channels.copy_(torch.tensor(self.plan.connection_channels, dtype=torch.long))
        if self.weight is not None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels if self.pointwise else CONTEXT_KERNEL**2
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.zero_init_context:
            nn.init.zeros_(self.stage1_weight)
        else:
            sizes = self.plan.channels_per_filter
            fan_in = torch.tensor([sizes[f] * CONTEXT_KERNEL**2 for f in self.plan.connection_filters])
            bound = fan_in.to(self.stage1_weight).rsqrt().view(-1, 1, 1, 1)
            self.stage1_weight.uniform_(-1, 1).mul_(bound)
        if self.stage2_weight is not None:
            bound = 1 / CONTEXT_KERNEL
            nn.init.uniform_(self.stage2_weight, -bound, bound)

    # forward -----------------------------------------------------------------------------
    def stage1(self, x: torch.Tensor) -> torch.Tensor:
        """Stage 1: x (B, C, H, W) -> (B, Z, H', W'), filter i a 3x3 over the channels ``plan.groups[i]``."""
        if self.stage1_channels is not None:  # case 3: the K = Z channels the filters read
            x = x.index_select(1, self.stage1_channels)
        k = self.plan.num_connections
        y = F.conv2d(x, self.stage1_weight, None, self.stride, CONTEXT_KERNEL // 2, 1, k)
        if self.plan.case != 2:
            return y
        b, _, h, w = y.shape
        parts, start = [], 0
        for blocks, size in self.plan.segments:  # at most two runs: with and without the remainder
            stop = start + blocks * size
            parts.append(y[:, start:stop].reshape(b, blocks, size, h, w).sum(2))
            start = stop
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """The context unit, s1 + stage2(s1) (or s1 alone without stage 2): (B, C, H, W) -> (B, Z, H', W')."""
        s1 = self.stage1(x)
        if self.stage2_weight is None:
            return s1
        weight = self.stage2_weight + self.stage2_identity  # s1 + dw(s1) in one conv
        return F.conv2d(s1, weight, None, 1, CONTEXT_KERNEL // 2, 1, self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> PWC(x) + context(x), (B, Z, H', W'); unbatched (C, H, W) -> (Z, H', W')."""
        if check_input(x, self.in_channels, "CPWConv2d"):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        context = self.context(x)
        if self.weight is None:
            return context if self.bias is None else context + self.bias.view(1, -1, 1, 1)
        return F.conv2d(x, self.weight, self.bias, self.stride) + context

    # conversion ----------------------------------------------------------------------------
    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        stage2: bool = True,
        pointwise: bool = True,
        zero_init_context: bool = False,
    ) -> CPWConv2d:
        """A CPWConv2d holding ``conv``'s weight (and bias) in its PWC.

        With ``zero_init_context=True`` it computes exactly what ``conv`` computes.

        Raises:
            TypeError: ``conv`` is not an nn.Conv2d.
            ValueError: ``conv`` is not 1x1, is grouped, is padded, or has zero channels.
        """
        spec = ConvSpec.from_conv(conv)
        if not spec.is_pointwise:
            raise ConvNotReplaceableError(f"CPWC replaces 1x1 convs; conv has kernel_size={tuple(conv.kernel_size)}")
        if spec.groups != 1:
            raise ConvNotReplaceableError(f"CPWC replaces 1x1 convs with groups=1; conv has groups={spec.groups}")
        if spec.explicit_padding != (0, 0, 0, 0):
            raise ConvNotReplaceableError(f"CPWC replaces unpadded 1x1 convs; conv has padding={conv.padding!r}")
        module = cls(
            spec.in_channels,
            spec.out_channels,
            spec.stride,
            spec.bias,
            stage2=stage2,
            pointwise=pointwise,
            zero_init_context=zero_init_context,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            if module.weight is not None:
                module.weight.copy_(conv.weight)
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
        inherit_requires_grad(conv, weights=(module.weight,), biases=(module.bias,))
        return module

    @torch.no_grad()
    def fuse_batchnorm(self, bn: nn.BatchNorm2d) -> CPWConv2d:
        """A CPWConv2d (with bias) computing ``bn(self(x))`` for an eval-mode ``bn``, exactly.

        The output is linear in the PWC kernel and in stage 1's kernels (stage 2 is depthwise, so a scale per
        channel passes through it), so the BN scale ``s`` multiplies the PWC kernel and each stage-1 kernel
        (by the ``s`` of the filter it feeds), and the bias becomes ``s * b + beta - s * mean``. Scaling
        stage 1 rather than stage 2's ``W2 + I`` keeps float32 precision when ``s`` is small: writing
        ``(W2 + I) * s - I`` back would cancel at the scale of 1 (relative error 1.8e-4 at ``s = 1e-4``).
        ``deploy()`` folds BNs only into ``nn.Conv2d``; call this for the BN after a CPWC.
        """
        foldable = isinstance(bn, nn.BatchNorm2d | nn.SyncBatchNorm) and bn.running_mean is not None
        if not foldable or bn.num_features != self.out_channels:
            raise ValueError(f"bn must be a BatchNorm2d({self.out_channels}) with running statistics, got {bn!r}")
        scale = bn.running_var.add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0)
        new = copy.deepcopy(self)
        if new.bias is None:
            # the layer's dtype and device (a float32 BN after a float16 layer), as fuse_conv_bn_eval keeps them
            new.bias = nn.Parameter(torch.zeros_like(shift, dtype=new.stage1_weight.dtype))
        new.spec = dataclasses.replace(new.spec, bias=True)
        new.bias.copy_(new.bias * scale + shift)
        if new.weight is not None:
            new.weight.mul_(scale.view(-1, 1, 1, 1))
        filters = torch.tensor(self.plan.connection_filters, device=scale.device)
        new.stage1_weight.mul_(scale[filters].view(-1, 1, 1, 1))
        return new

    def extra_repr(self) -> str:
        s = self.spec.describe().replace(" k1x1", "").replace(" g1", "")
        s += f", case={self.plan.case}, stage2={self.stage2}, pointwise={self.pointwise}"
        return s + f", bias={self.bias is not None}"
