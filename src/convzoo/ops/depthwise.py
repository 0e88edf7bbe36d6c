"""Depthwise convolution whose weight gradient stays fast for wide kernels on CPU.

oneDNN computes the weight gradient of a depthwise conv quickly only for kernels at most 3 wide.
On a channels-last (128, 16, 32, 32) input with 2 threads, 7x3 takes 1.1-1.2x the 3x3 time, but
5x5 takes 7-8x and 7x7 10-11x (``benchmarks/bench_depthwise.py``, ``results/depthwise.md``). The
kernel's height does not matter, only its width.

:func:`depthwise_conv2d` runs the forward pass and the input gradient as usual. It computes the
weight gradient of a kernel wider than 3 from its *column blocks*: a kh x kw kernel is cut into
kh x 3 blocks (and a kh x 1 remainder). Each block's gradient is that of a kh x 3 depthwise conv
whose input is the original input shifted sideways.

The shift costs no copy. The input and the output gradient are each laid out once in a buffer whose
rows carry extra zero columns (:class:`RowPadded`), and the shifted input is the same buffer read
from a storage offset a few pixels on. Every read that crosses the left or right edge of the image
(into the neighbouring row, even) lands on one of those zeros, just as the conv's zero padding
would. A strided conv uses input rows ``stride`` times as long as the gradient's, so a block conv
with the same stride lines them up.

It is the same sum, regrouped, so it equals the plain weight gradient up to float rounding (the
float64 tests agree to 1e-12).

It is used where it pays: CPU, stride 1, dilation 1, groups = channels (multiplier 1), and a kernel
wider than 3.
Everything else runs ``F.conv2d`` unchanged: CUDA (cuDNN has no such cliff), autocast, tracing, and
other geometries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convzoo.ops.conv_spec import PaddingArg, autocast_enabled, relayout, to_pair, transform_active

_conv_backward = torch.ops.aten.convolution_backward

FAST_WIDTH = 3
"""Widest depthwise kernel whose weight gradient oneDNN computes quickly (see the module docstring)."""


def column_blocks(width: int) -> list[tuple[int, int, int]]:
    """The column blocks covering a kernel ``width`` wide, as (first column, block width, first column kept).

    Blocks are 3 wide from column 0. A remainder of 1 column becomes a 1-wide block. A remainder of
    2 columns becomes the 3-wide block ending at the last column, of which only the last 2 columns
    are kept (the first belongs to its neighbour). Kernels narrower than 3 become 1-wide blocks.
    """
    if width < FAST_WIDTH:
        return [(first, 1, 0) for first in range(width)]
    blocks = [(first, FAST_WIDTH, 0) for first in range(0, width - FAST_WIDTH + 1, FAST_WIDTH)]
    remainder = width % FAST_WIDTH
    if remainder == 1:
        blocks.append((width - 1, 1, 0))
    elif remainder == 2:
        blocks.append((width - FAST_WIDTH, FAST_WIDTH, 1))
    return blocks


def gradient_row_width(width: int, out_width: int, pad: int, stride: int) -> int:
    """Row length (pixels) of the output-gradient buffer of a conv; the input's rows are ``stride`` times longer.

    Long enough that a block conv's reads stay inside the row around the gradient's columns, and that
    the input's reads past either edge (up to ``pad`` columns) land on zero columns.
    """
    return max(out_width + 2, math.ceil((stride + width + pad) / stride))


@dataclass(frozen=True)
class RowPadded:
    """A (B, C, H, W) tensor laid out channels-last in rows of ``row_width`` pixels, inside zeros.

    Column ``offset + w`` of row h holds pixel (h, w); all other columns are zero, and so are
    ``row_width`` pixels before the first row and after the last. :meth:`view` reads it back
    as a channels-last (B, C, H, row_width) tensor, shifted sideways by ``shift`` pixels.
    """

    storage: Tensor
    shape: tuple[int, int, int, int]
    row_width: int
    offset: int

    @classmethod
    def of(cls, t: Tensor, row_width: int, offset: int = 1) -> RowPadded:
        """Lay ``t`` (B, C, H, W) out in rows of ``row_width`` pixels, pixel (h, w) at column ``offset + w``."""
        rows = cls.empty(t, tuple(t.shape), row_width, offset)
        rows.interior().copy_(t)
        return rows

    @classmethod
    def empty(cls, like: Tensor, shape: tuple[int, int, int, int], row_width: int, offset: int = 1) -> RowPadded:
        """Rows for a (B, C, H, W) tensor (dtype and device of ``like``) whose :meth:`interior` the caller fills.

        Only the zeros are written here: the margins, and the gap between one row's last pixel and the
        next row's first, which is contiguous (a memset of the whole buffer would write it all twice).
        """
        batch, channels, height, width = shape
        if offset < 0 or offset + width > row_width:
            raise ValueError(f"a row of {row_width} pixels cannot hold {width} pixels from column {offset}")
        rows, row = batch * height, row_width * channels
        storage = like.new_empty((rows + 2) * row)
        storage[: row + offset * channels].zero_()  # the leading margin and the first row's left gap
        storage[(rows + 1) * row :].zero_()  # the trailing margin
        gap = (row_width - width) * channels  # one row's right gap and the next row's left gap
        if gap:
            first_gap = row + (offset + width) * channels
            storage.as_strided((rows, gap), (row, 1), first_gap).zero_()
        return cls(storage, (batch, channels, height, width), row_width, offset)

    def interior(self) -> Tensor:
        """The (B, C, H, W) tensor itself, as a strided view into the rows (writable)."""
        return self.view()[..., self.offset : self.offset + self.shape[3]]

    def view(self, shift: int = 0) -> Tensor:
        """The rows as a channels-last (B, C, H, row_width) tensor whose column c reads stored column c + shift."""
        batch, channels, height, _ = self.shape
        if abs(shift) > self.row_width:
            raise ValueError(f"shift must be at most the row width {self.row_width}, got {shift}")
        strides = (height * self.row_width * channels, 1, self.row_width * channels, channels)
        size = (batch, channels, height, self.row_width)
        return self.storage.as_strided(size, strides, (self.row_width + shift) * channels)


def column_block_weight_grad(
    grad: RowPadded,
    x: RowPadded,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> Tensor:
    """Weight gradient of a depthwise conv, computed by column blocks at most 3 wide.

    Args:
        grad: the gradient of the conv's output (B, C, H', W'), from column 1 of rows of R pixels.
        x: the conv's input (B, C, H, W), from column ``stride[1]`` of rows of ``stride[1] * R`` pixels.
        kernel_size, stride, padding: the conv's (zero padding, dilation 1).

    Returns:
        The gradient of its (C, 1, kh, kw) weight.
    """
    (kh, kw), (ph, pw), (_, sw) = kernel_size, padding, stride
    channels = x.shape[1]
    if grad.offset != 1 or x.offset != sw or x.row_width != sw * grad.row_width:
        raise ValueError(
            f"the input's rows must be stride={sw} times the gradient's ({grad.row_width} pixels from column 1), "
            f"got {x.row_width} pixels from column {x.offset}"
        )
    grad_rows = grad.view()
    weight_grad = grad_rows.new_empty(channels, 1, kh, kw)
    for first, block_width, kept in column_blocks(kw):
        half = block_width // 2
        # the block conv (padded by `half` columns) at gradient column 1 + w reads input column
        # sw * (1 + w) + j - half + shift, which must hold x[.., sw * w + first + j - pw]
        shift = first + half - pw
        block = grad_rows.new_zeros(channels, 1, kh, block_width)  # only its shape is read
        _, block_grad, _ = _conv_backward(
            grad_rows,
            x.view(shift),
            block,
            None,
            stride,
            (ph, half),
            (1, 1),
            False,
            (0, 0),
            channels,
            (False, True, False),
        )
        weight_grad[..., first + kept : first + block_width] = block_grad[..., kept:]
    return weight_grad


def input_grad_from_rows(grad: RowPadded, weight: Tensor, padding: tuple[int, int], in_width: int) -> Tensor:
    """Input gradient of a stride-1 depthwise conv, read straight from its output gradient's rows.

    The input gradient is the output gradient correlated with the flipped kernel, padded by
    (kh - 1 - ph, kw - 1 - pw). On the rows (gradient from column 1, zeros around it) that
    correlation puts input column w at column 1 + w, so no contiguous copy of the gradient is needed.

    Args:
        grad: the output gradient (B, C, H', W') laid out with offset 1 and rows of at least
            ``in_width + pw + 1`` pixels (:func:`gradient_row_width` at stride 1).
        weight: the (C, 1, kh, kw) kernel, with 0 <= padding < kernel size.
        padding: the conv's zero padding (ph, pw).
        in_width: W, the input's width.

    Returns:
        (B, C, H, W), a strided view.
    """
    (kh, kw), (ph, pw) = weight.shape[2:], padding
    if grad.offset != 1 or grad.row_width < in_width + pw + 1 or not (0 <= ph < kh and 0 <= pw < kw):
        raise ValueError(
            f"need the gradient from column 1 in rows of at least {in_width + pw + 1} pixels and padding below "
            f"the kernel size {(kh, kw)}, got column {grad.offset}, {grad.row_width} pixels, padding {padding}"
        )
    flipped_padding = (kh - 1 - ph, kw - 1 - pw)
    full = F.conv2d(grad.view(), weight.flip(2, 3), None, 1, flipped_padding, 1, weight.shape[0])
    return full[..., 1 : 1 + in_width]


def uses_column_blocks(
    x: Tensor, weight: Tensor, stride: int | tuple[int, int], dilation: int | tuple[int, int]
) -> bool:
    """Whether :func:`depthwise_conv2d` computes this conv's weight gradient by column blocks.

    CPU, a kernel wider than 3, stride 1 and dilation 1, autocast off. At stride 2 the blocks are no
    faster (a strided conv reads input rows twice as long): 4.4 vs 4.0 ms for 5x5 and 10.3 vs 5.8 ms
    for 7x7 on (128, 16, 32, 32), in a design measurement. Under autocast ``F.conv2d`` runs instead: it
    casts x and the weight itself, whereas the custom backward would get a reduced-precision gradient
    next to float32 saved tensors (and in bfloat16 oneDNN has no slow wide-kernel path to avoid: 5x5
    and 7x7 measured as fast as the blocks).
    """
    return (
        x.device.type == "cpu"
        and not autocast_enabled(x.device)
        and weight.shape[-1] > FAST_WIDTH
        and to_pair(stride, "stride") == (1, 1)
        and to_pair(dilation, "dilation") == (1, 1)
    )


def padded_for_blocks(
    x: Tensor, grad_shape: tuple[int, ...], stride: tuple[int, int], padding: tuple[int, int]
) -> tuple[RowPadded, int]:
    """x laid out for :func:`column_block_weight_grad`, and the gradient buffer's row width to go with it."""
    row_width = gradient_row_width(x.shape[3], grad_shape[3], padding[1], stride[1])
    return RowPadded.of(x, stride[1] * row_width, stride[1]), row_width


class _ColumnBlockDepthwise(torch.autograd.Function):
    """Depthwise conv; backward: the usual input gradient, the weight gradient by column blocks."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int], padding: tuple[int, int]
    ) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        channels, grad_x, grad_weight, grad_bias = x.shape[1], None, None, None
        if ctx.needs_input_grad[0]:
            grad_x, _, _ = _conv_backward(
                grad, x, weight, None, ctx.stride, ctx.padding, (1, 1), False, (0, 0), channels, (True, False, False)
            )
        if ctx.needs_input_grad[1]:
            x_rows, row_width = padded_for_blocks(x, tuple(grad.shape), ctx.stride, ctx.padding)
            grad_rows = RowPadded.of(grad, row_width)
            grad_weight = column_block_weight_grad(grad_rows, x_rows, tuple(weight.shape[2:]), ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None


def _depthwise_padding(
    padding: object, weight: Tensor, stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int] | str:
    """``padding`` as F.conv2d takes it, as a pair; ``"same"`` stays a string only where it pads unevenly."""
    if not isinstance(padding, str):
        return to_pair(padding, "padding", minimum=0)
    if padding == "valid":
        return (0, 0)
    if padding != "same":
        raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    if stride != (1, 1):
        raise ValueError(f"padding='same' requires stride=1 (as in F.conv2d), got stride={stride}")
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    if totals[0] % 2 or totals[1] % 2:
        return "same"  # uneven: F.conv2d pads one more at the end, which the column blocks do not
    return (totals[0] // 2, totals[1] // 2)


def depthwise_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: PaddingArg = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)``, with a fast weight gradient.

    x (B, C, H, W), weight (C, 1, kh, kw) -> (B, C, H', W'). ``stride``, ``padding`` and ``dilation``
    are as for ``F.conv2d``: an int or a pair, and ``padding`` also ``"same"`` (stride 1) or
    ``"valid"``. Where :func:`uses_column_blocks` holds and the weight needs a gradient, the input is
    made channels-last and the weight gradient is computed by column blocks (see the module
    docstring); otherwise this is ``F.conv2d``. ``"same"`` padding that pads unevenly (an even
    kernel extent) always runs ``F.conv2d``.

    Raises:
        TypeError: ``x`` or ``weight`` is not a tensor, or ``stride`` / ``padding`` / ``dilation``
            is neither an int nor a pair of ints (nor, for padding, a string).
        ValueError: the shapes do not fit, a value is out of range, or ``padding="same"`` with a stride.
    """
    for name, value in (("x", x), ("weight", weight)):
        if not isinstance(value, Tensor):
            raise TypeError(f"depthwise_conv2d: {name} must be a tensor, got {type(value).__name__}")
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"depthwise_conv2d needs x (B, C, H, W) and weight (C, 1, kh, kw), got x {tuple(x.shape)} "
            f"and weight {tuple(weight.shape)}"
        )
    stride, dilation = to_pair(stride, "stride"), to_pair(dilation, "dilation")
    padding = _depthwise_padding(padding, weight, stride, dilation)
    blocks = (
        torch.is_grad_enabled()
        and weight.requires_grad
        and not transform_active()  # torch.func / forward AD differentiate F.conv2d, not the custom backward
        and uses_column_blocks(x, weight, stride, dilation)
    )
    if isinstance(padding, str) or not blocks:
        return F.conv2d(x, weight, bias, stride, padding, dilation, x.shape[1])
    x = relayout(x, torch.channels_last)  # its gradient goes back in the caller's layout
    return _ColumnBlockDepthwise.apply(x, weight, bias, stride, padding)


def run_depthwise(conv: nn.Module, x: Tensor) -> Tensor:
    """``conv(x)`` for a depthwise ``nn.Conv2d``, through :func:`depthwise_conv2d` when it is a plain one.

    Plain: exactly ``nn.Conv2d`` (no subclass), zero padding given as numbers, groups = in = out channels.
    Anything else runs ``conv(x)``.
    """
    plain = type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
    if not plain or not conv.groups == conv.in_channels == conv.out_channels:
        return conv(x)
    return depthwise_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
