"""DDS: depthwise dilated separable convolution and its pyramid block (Nguyen, DDS paper).

Two kinds:

* ``dds`` -> :class:`DilatedSeparableConv2d`: a depthwise k x k conv with dilation r, whose
  effective field is n_r = (k - 1) * r + 1 (eq. 1), then a pointwise 1 x 1 conv; parameters
  k²C + CC' (Table 1). It replaces a *dense* k x k conv (groups = 1) by the full separable
  pair, and a *depthwise* k x k conv (the paper's placement in MobileNetV2) by the dilated
  depthwise half alone, since the block around a depthwise conv already has its pointwise.
* ``pyramid`` -> :class:`PyramidDilatedConv2d`: parallel depthwise k x k convs with different
  dilations whose outputs are concatenated (Fig. 5). It replaces depthwise convs.
  With ``split=True`` each branch takes its share of the channels (k²C parameters, one
  depthwise conv's, as Table 1 states); with ``split=False`` every branch sees all channels and
  the output has ``len(dilations)`` times the channels.

Both keep the spatial size of a centred ("same"-style) conv: a branch with dilation r pads
r(k - 1)/2 on each side, which is why kernels must be odd.

Deploy: the split pyramid folds exactly into one depthwise conv with a (k - 1)·max(r) + 1
kernel that is zero except at each branch's dilated taps (:func:`fold_dilated_kernels`).
That kernel does ((k-1)·max(r)+1)² / k² = 5.4x the MACs (k = 3, r = 1, 2, 3), yet on a quiet CPU it
took 0.65-1.33x the branch form's time per ddsnet pyramid shape (faster at 6 of 7; 224 input, batch 8)
and the whole deployed ddsnet ran equally fast either way: a depthwise conv is memory-bound, and the
branch form pays for three kernel launches, the channel slices and the concatenation, and keeps its
BatchNorm unfolded (benchmarks/results/dds.md). So ``fuse()`` returns the folded ``nn.Conv2d`` for ``split=True``;
``fuse(form="branches")`` returns :class:`DepthwiseBranches` (plain ``nn.Conv2d`` branches), which is
also the only deploy form of ``split=False``. Both are exact.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from convzoo.ops.conv_spec import (
    ConvSpec,
    NoTorchScript,
    check_bool,
    check_channels,
    check_input,
    inherit_requires_grad,
    is_int,
    to_pair,
)
from convzoo.ops.registry import ConvNotReplaceableError, needs_depthwise, register_conv

DEPLOY_FORMS = ("branches", "folded")
#: The form ``PyramidDilatedConv2d.fuse()`` returns by default: the faster exact one measured on CPU
#: (see benchmarks/results/dds.md).
DEFAULT_DEPLOY_FORM = "folded"


# ------------------------------------------------------------------------ geometry helpers
def receptive_field(kernel_size: int, dilation: int) -> int:
    """Effective kernel extent n_r = (n - 1)·r + 1 of an n x n kernel with dilation r (eq. 1)."""
    return (kernel_size - 1) * dilation + 1


def _check_kernel(kernel_size: object) -> int:
    """An odd int kernel size >= 1 (odd so that r(k - 1)/2 padding keeps the centre)."""
    if not is_int(kernel_size):
        raise TypeError(f"kernel_size must be an odd int, got {kernel_size!r}")
    kernel_size = int(kernel_size)  # numpy ints as nn.Conv2d takes them
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be an odd int >= 1 (a centred dilated kernel pads r*(k-1)/2 per side), "
            f"got {kernel_size!r}"
        )
    return kernel_size


def _check_dilation(dilation: object, name: str = "dilation") -> int:
    if not is_int(dilation):
        raise TypeError(f"{name} must be an int >= 1, got {dilation!r}")
    dilation = int(dilation)
    if dilation < 1:
        raise ValueError(f"{name} must be an int >= 1, got {dilation!r}")
    return dilation


def check_dilations(dilations: object) -> tuple[int, ...]:
    """The pyramid's dilation rates: a non-empty sequence of ints >= 1, as a tuple."""
    if isinstance(dilations, int | str | bytes) or not isinstance(dilations, Sequence) or len(dilations) == 0:
        raise TypeError(f"dilations must be a non-empty sequence of ints >= 1, got {dilations!r}")
    return tuple(_check_dilation(r, "dilations") for r in dilations)


def split_channels(channels: int, parts: int) -> tuple[int, ...]:
    """Share ``channels`` out over ``parts`` branches as evenly as possible.

    The remainder goes one channel each to the first branches (the smallest dilations), e.g.
    ``split_channels(32, 3) == (11, 11, 10)``.

    Raises:
        ValueError: fewer channels than parts (a branch would get none).
    """
    if channels < parts:
        raise ValueError(
            f"dilations can't be shared out across channels={channels}: split=True needs at least one "
            f"channel per dilation ({parts} dilations); use fewer dilations or split=False"
        )
    base, extra = divmod(channels, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def fold_dilated_kernels(weights: Sequence[torch.Tensor], dilations: Sequence[int]) -> torch.Tensor:
    """Place dilated depthwise k x k kernels into one zero-filled K x K kernel, K = (k - 1)·max(r) + 1.

    Args:
        weights: per branch a depthwise kernel (C_i, 1, k, k), branches stacked along channels.
        dilations: the dilation of each branch.

    Returns:
        (sum C_i, 1, K, K): run with padding (K - 1)/2 and dilation 1 it computes exactly the
        concatenated branches (each branch's tap i sits at centre + (i - (k-1)/2)·r).
    """
    k = weights[0].shape[-1]
    size = receptive_field(k, max(dilations))
    centre, half = (size - 1) // 2, (k - 1) // 2
    channels = sum(w.shape[0] for w in weights)
    folded = weights[0].new_zeros(channels, 1, size, size)
    start = 0
    for weight, r in zip(weights, dilations, strict=True):
        taps = slice(centre - half * r, centre + half * r + 1, r)
        folded[start : start + weight.shape[0], :, taps, taps] = weight
        start += weight.shape[0]
    return folded


# ------------------------------------------------------------------------------- predicates
def _centred_reason(conv: nn.Conv2d) -> str | None:
    """None if ``conv`` is a square, odd, centred (output-size preserving up to stride) zero-padded conv."""
    kh, kw = conv.kernel_size
    if kh != kw or kh % 2 == 0:
        return f"kernel {tuple(conv.kernel_size)} is not square and odd"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}; dilated replacements pad with zeros"
    if conv.padding != "same":
        padding = (0, 0) if conv.padding == "valid" else tuple(conv.padding)
        centred = tuple(d * (kh - 1) // 2 for d in conv.dilation)
        if padding != centred:
            return f"padding {padding} is not centred ({centred}); the replacement would change the output size"
    return None


def needs_dense_or_depthwise(conv: nn.Conv2d) -> str | None:
    """``dds``: square odd centred k x k convs (k > 1) that are dense (groups = 1) or depthwise."""
    if tuple(conv.kernel_size) == (1, 1):
        return "1x1 kernel: no spatial patch"
    if conv.groups != 1 and needs_depthwise(conv) is not None:
        return f"grouped conv (groups={conv.groups}); dds replaces dense or depthwise convs"
    return _centred_reason(conv)


def needs_centred_depthwise(conv: nn.Conv2d) -> str | None:
    """``pyramid``: depthwise convs (:func:`needs_depthwise`) with a square, odd, centred kernel."""
    return needs_depthwise(conv) or _centred_reason(conv)


# ------------------------------------------------------------------------------- operators
def _depthwise(channels: int, k: int, stride: int, dilation: int, bias: bool, **factory) -> nn.Conv2d:
    """A centred depthwise k x k conv with dilation r: (B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s))."""
    pad = dilation * (k - 1) // 2
    return nn.Conv2d(channels, channels, k, stride, pad, dilation, groups=channels, bias=bias, **factory)


@register_conv(
    "dds",
    description="DDS: depthwise dilated k x k (field (k-1)r+1) + pointwise; on a depthwise conv, the dilated half",
    skip_reason=needs_dense_or_depthwise,
)
class DilatedSeparableConv2d(nn.Module):
    """Depthwise dilated separable convolution: depthwise k x k with dilation r, then pointwise 1 x 1.

    Args:
        in_channels: C.
        out_channels: C'.
        kernel_size: odd n; the effective field is (n - 1)·r + 1.
        stride: applied in the depthwise step.
        dilation: r >= 1 (keyword-only), default 2.
        pointwise: keyword-only; False keeps only the dilated depthwise conv (then
            ``out_channels`` must equal ``in_channels``); this is what replaces a depthwise conv.
        bias: keyword-only; a bias on the last conv (default False: Table 1 counts none).

    The two steps are linear and back to back (no norm or activation between), so this is a
    drop-in for a k x k conv; parameters n²C + CC' (+ C' with bias), Table 1.

    Shapes:
        (B, C, H, W) -> (B, C', ceil(H/s), ceil(W/s)); an unbatched (C, H, W) input gives (C', H', W').
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        dilation: int = 2,
        pointwise: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_channels = check_channels(in_channels, "in_channels")
        out_channels = check_channels(out_channels, "out_channels")
        k = _check_kernel(kernel_size)
        stride_pair = to_pair(stride, "stride")
        r = _check_dilation(dilation)
        pointwise = check_bool(pointwise, "pointwise")
        bias = check_bool(bias, "bias")
        if not pointwise and out_channels != in_channels:
            raise ValueError(
                f"pointwise=False keeps only the depthwise conv, so out_channels must equal "
                f"in_channels={in_channels}, got out_channels={out_channels}"
            )
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = (k, k), stride_pair
        self.dilation = (r, r)
        self.padding = (r * (k - 1) // 2,) * 2
        self.depthwise = _depthwise(in_channels, k, stride_pair, r, bias and not pointwise, **factory)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias, **factory) if pointwise else None

    @property
    def receptive_field(self) -> int:
        """n_r = (n - 1)·r + 1 (eq. 1)."""
        return receptive_field(self.kernel_size[0], self.dilation[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C', H', W'), or unbatched (C, H, W) -> (C', H', W') as nn.Conv2d."""
        if not torch.jit.is_scripting():  # keeps the module scriptable (there nn.Conv2d's own checks apply)
            check_input(x, self.in_channels, "DilatedSeparableConv2d")  # nn.Conv2d runs (C, H, W) itself
        x = self.depthwise(x)
        return x if self.pointwise is None else self.pointwise(x)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, dilation: int = 2) -> DilatedSeparableConv2d:
        """Replace a centred k x k ``conv`` (stride kept).

        * depthwise ``conv``: only the dilated depthwise conv, holding ``conv``'s kernel and bias
          (the taps are spread by the dilation, so the function changes unless dilation = 1);
        * dense ``conv``: depthwise + pointwise initialised to the best separable approximation
          of ``conv``'s kernel (rank-1 SVD per input channel, W[o, c] ≈ P[o, c]·D[c]), ``conv``'s
          bias on the pointwise conv. With ``dilation=1`` and a separable kernel this is exact.
        """
        reason = needs_dense_or_depthwise(conv)
        if reason is not None:
            raise ConvNotReplaceableError(f"dds cannot replace {ConvSpec.from_conv(conv).describe()}: {reason}")
        depthwise = conv.groups != 1
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        module = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size[0],
            tuple(conv.stride),
            dilation=dilation,
            pointwise=not depthwise,
            bias=conv.bias is not None,
            **factory,
        )
        with torch.no_grad():
            if depthwise:
                module.depthwise.weight.copy_(conv.weight)
                if conv.bias is not None:
                    module.depthwise.bias.copy_(conv.bias)
            else:
                c_out, c_in, k, _ = conv.weight.shape
                per_input = conv.weight.transpose(0, 1).reshape(c_in, c_out, k * k)
                # at least float32: torch has no float16 / bfloat16 SVD (CPU or CUDA); copy_ casts back
                per_input = per_input.to(torch.promote_types(per_input.dtype, torch.float32))
                u, s, vh = torch.linalg.svd(per_input, full_matrices=False)
                module.pointwise.weight.copy_((u[:, :, 0] * s[:, :1]).T.reshape(c_out, c_in, 1, 1))
                module.depthwise.weight.copy_(vh[:, 0, :].reshape(c_in, 1, k, k))
                if conv.bias is not None:
                    module.pointwise.bias.copy_(conv.bias)
        held_bias = module.depthwise.bias if depthwise else getattr(module.pointwise, "bias", None)
        inherit_requires_grad(
            conv, weights=(module.depthwise.weight, getattr(module.pointwise, "weight", None)), biases=(held_bias,)
        )
        return module.train(conv.training)

    def fuse(self) -> nn.Module:
        """Plain torch form: ``nn.Sequential(depthwise, pointwise)`` (or the depthwise conv alone).

        Nothing folds across the two convs, but as plain modules the pointwise conv can take the
        BatchNorm that follows it in ``convzoo.deploy()``.
        """
        if self.pointwise is None:
            return self.depthwise
        return nn.Sequential(self.depthwise, self.pointwise)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size[0]}, stride={self.stride}, "
            f"dilation={self.dilation[0]}, field={self.receptive_field}, pointwise={self.pointwise is not None}"
        )


def _branch_forward(x: torch.Tensor, convs: nn.ModuleList, splits: tuple[int, ...] | None) -> torch.Tensor:
    """Run depthwise branches on consecutive channel slices (``splits``) or on all of ``x`` (None); concat.

    Slices are taken with static offsets (``narrow``), which keeps the forward ``torch.fx``-traceable.
    """
    if splits is None:
        return torch.cat([conv(x) for conv in convs], dim=1)
    if len(splits) == 1:
        return convs[0](x)
    starts = itertools.accumulate(splits[:-1], initial=0)
    return torch.cat([conv(x.narrow(1, s, c)) for conv, s, c in zip(convs, starts, splits)], dim=1)


class DepthwiseBranches(nn.Module):
    """Deploy form of the pyramid: parallel ``nn.Conv2d`` depthwise branches, concatenated.

    Args:
        convs: the branch convs.
        splits: channels of the input each branch reads (consecutive slices), or None for all.

    Shapes:
        (B, C, H, W) -> (B, sum of branch out_channels, H', W'); unbatched (C, H, W) as nn.Conv2d.
    """

    def __init__(self, convs: Sequence[nn.Conv2d], splits: tuple[int, ...] | None) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.splits = splits
        self.in_channels = sum(splits) if splits is not None else self.convs[0].in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if check_input(x, self.in_channels, "DepthwiseBranches"):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        return _branch_forward(x, self.convs, self.splits)


_NO_SINGLE_WEIGHT = (
    "PyramidDilatedConv2d(split=False) has no weight: every branch reads all channels, so there is no single "
    "depthwise kernel (use split=True, or the branches' own weights)"
)


@register_conv(
    "pyramid",
    description="DDS pyramid: parallel depthwise convs with dilations (1,2,3) on channel shares, concatenated",
    skip_reason=needs_centred_depthwise,
)
class PyramidDilatedConv2d(NoTorchScript, nn.Module):
    """Parallel depthwise dilated k x k convs fused by concatenation (the DDS pyramid block's middle).

    Args:
        channels: C, input channels.
        kernel_size: odd k shared by every branch.
        stride: shared by every branch.
        dilations: keyword-only, one branch per rate (each >= 1), default (1, 2, 3).
        split: keyword-only. True: branch i reads its share of the channels
            (:func:`split_channels`, remainder to the first branches) and the output has C channels;
            parameters k²C, one depthwise conv's. False: every branch reads all C channels and the
            output has len(dilations)·C channels.
        bias: keyword-only, a bias per branch output channel (default False).

    Shapes:
        (B, C, H, W) -> (B, C or len(dilations)·C, ceil(H/s), ceil(W/s)); an unbatched (C, H, W)
        input gives (C_out, H', W'), as for nn.Conv2d.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        dilations: Sequence[int] = (1, 2, 3),
        split: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        channels = check_channels(channels, "channels")
        k = _check_kernel(kernel_size)
        stride_pair = to_pair(stride, "stride")
        rates = check_dilations(dilations)
        split = check_bool(split, "split")
        bias = check_bool(bias, "bias")
        self.splits: tuple[int, ...] | None = split_channels(channels, len(rates)) if split else None
        widths = self.splits if split else (channels,) * len(rates)
        factory = {"device": device, "dtype": dtype}
        self.branches = nn.ModuleList(_depthwise(c, k, stride_pair, r, bias, **factory) for c, r in zip(widths, rates))
        self.in_channels, self.out_channels = channels, sum(widths)
        self.kernel_size, self.stride = (k, k), stride_pair
        self.groups = channels
        self.dilations, self.split = rates, split

    @property
    def receptive_field(self) -> int:
        """Largest effective extent over the branches, (k - 1)·max(r) + 1."""
        return receptive_field(self.kernel_size[0], max(self.dilations))

    @property
    def weight(self) -> torch.Tensor:
        """The folded kernel (C, 1, K, K), K = (k - 1)·max(r) + 1 (split=True only)."""
        if not self.split:
            raise AttributeError(_NO_SINGLE_WEIGHT)
        return fold_dilated_kernels([conv.weight for conv in self.branches], self.dilations)

    def __getattr__(self, name: str) -> Any:
        # a property's AttributeError sends Python to nn.Module.__getattr__, whose generic "no attribute"
        # would replace the reason; keep it (hasattr() still answers False)
        if name == "weight" and self.__dict__.get("split") is False:
            raise AttributeError(_NO_SINGLE_WEIGHT)
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C_out, H', W'), or unbatched (C, H, W) -> (C_out, H', W')."""
        if check_input(x, self.in_channels, "PyramidDilatedConv2d"):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        return _branch_forward(x, self.branches, self.splits)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, *, dilations: Sequence[int] = (1, 2, 3), split: bool = True
    ) -> PyramidDilatedConv2d:
        """Replace a centred depthwise ``conv`` (stride kept); branch i takes its channels' kernels and bias.

        The taps are spread by each branch's dilation, so the function equals ``conv``'s only where
        the dilation is 1. ``split=False`` is refused: it multiplies the output channels, so it
        cannot stand in for a conv in an existing network (build it into the network instead).
        """
        reason = needs_centred_depthwise(conv)
        rates = check_dilations(dilations)  # a bad option is an error, not a skip of every narrow conv
        if reason is None and split and conv.in_channels < len(rates):
            reason = f"{conv.in_channels} channels < {len(rates)} dilations {rates} (a channel per dilation)"
        if reason is not None:
            raise ConvNotReplaceableError(f"pyramid cannot replace {ConvSpec.from_conv(conv).describe()}: {reason}")
        if not split:
            raise ValueError(
                "split=False outputs len(dilations) x the channels, so it cannot replace a conv in place; "
                "use split=True or build PyramidDilatedConv2d into the network"
            )
        module = cls(
            conv.in_channels,
            conv.kernel_size[0],
            tuple(conv.stride),
            dilations=dilations,
            split=True,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            weights = torch.split(conv.weight, module.splits)
            biases = torch.split(conv.bias, module.splits) if conv.bias is not None else [None] * len(weights)
            for branch, weight, bias in zip(module.branches, weights, biases):
                branch.weight.copy_(weight)
                if bias is not None:
                    branch.bias.copy_(bias)
        inherit_requires_grad(
            conv, weights=[b.weight for b in module.branches], biases=[b.bias for b in module.branches]
        )
        return module.train(conv.training)

    @torch.no_grad()
    def fuse(self, form: str | None = None) -> nn.Module:
        """The exact inference form.

        Args:
            form: ``"folded"`` (split=True only): one depthwise ``nn.Conv2d`` with the zero-filled
                (k - 1)·max(r) + 1 kernel; ``"branches"``: :class:`DepthwiseBranches` of plain
                ``nn.Conv2d``. None picks ``DEFAULT_DEPLOY_FORM`` (measured faster on CPU) for
                split=True and ``"branches"`` for split=False.
        """
        if form is None:
            form = DEFAULT_DEPLOY_FORM if self.split else "branches"
        if form not in DEPLOY_FORMS:
            raise ValueError(f"form must be one of {DEPLOY_FORMS}, got {form!r}")
        if form == "branches":
            return DepthwiseBranches(copy.deepcopy(list(self.branches)), self.splits).train(self.training)
        if not self.split:
            raise ValueError("form='folded' needs split=True (with split=False every branch reads all channels)")
        first = self.branches[0]
        k = receptive_field(self.kernel_size[0], max(self.dilations))
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            k,
            self.stride,
            (k - 1) // 2,
            groups=self.in_channels,
            bias=first.bias is not None,
            device=first.weight.device,
            dtype=first.weight.dtype,
        )
        conv.weight.copy_(self.weight)
        if first.bias is not None:
            conv.bias.copy_(torch.cat([c.bias for c in self.branches]))
        return conv.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, kernel_size={self.kernel_size[0]}, stride={self.stride}, "
            f"dilations={self.dilations}, split={self.split}, splits={self.splits}"
        )
