"""Depthwise conv with the column-block weight gradient (convzoo.ops.depthwise)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convzoo.ops.depthwise import (
    RowPadded,
    column_block_weight_grad,
    column_blocks,
    depthwise_conv2d,
    gradient_row_width,
    input_grad_from_rows,
    padded_for_blocks,
    run_depthwise,
    uses_column_blocks,
)

F64 = {"dtype": torch.float64}
TIGHT = {"rtol": 1e-12, "atol": 1e-12}


@pytest.mark.parametrize("width", range(1, 13))
def test_column_blocks_cover_each_kernel_column_once(width) -> None:
    kept = []
    for first, block_width, keep_from in column_blocks(width):
        assert block_width in (1, 3)
        assert first + block_width <= width
        kept += range(first + keep_from, first + block_width)
    assert kept == list(range(width))


def _grads(fn, x, weight, bias, grad_out):
    y = fn(x, weight, bias)
    return (y, *torch.autograd.grad(y, (x, weight, bias), grad_out))


@pytest.mark.parametrize(
    ("kernel", "padding", "size"),
    [((5, 5), (2, 2), (9, 11)), ((7, 7), (3, 3), (13, 7)), ((3, 5), (1, 2), (6, 5)), ((5, 4), (0, 0), (9, 11)),
     ((1, 9), (0, 4), (5, 12)), ((9, 8), (8, 7), (6, 5)), ((2, 6), (1, 2), (9, 11)), ((7, 11), (1, 2), (13, 12))],
)  # fmt: skip
@pytest.mark.parametrize("stride", [(1, 1), (2, 2), (1, 2), (3, 2)])
def test_equals_conv2d_values_and_gradients(kernel, padding, size, stride) -> None:
    channels = 3
    x = torch.randn(2, channels, *size, **F64, requires_grad=True)
    weight = torch.randn(channels, 1, *kernel, **F64, requires_grad=True)
    bias = torch.randn(channels, **F64, requires_grad=True)
    grad_out = torch.randn_like(F.conv2d(x, weight, bias, stride, padding, 1, channels))
    ours = _grads(lambda *a: depthwise_conv2d(*a, stride, padding), x, weight, bias, grad_out)
    plain = _grads(lambda *a: F.conv2d(*a, stride, padding, 1, channels), x, weight, bias, grad_out)
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("stride", [(1, 1), (2, 2), (2, 1), (1, 3)])
def test_column_block_weight_grad_handles_strides_directly(stride) -> None:
    """The dispatcher uses blocks at stride 1 only (measured); the layout maths holds for any stride."""
    channels, kernel, padding = 2, (5, 7), (2, 3)
    x = torch.randn(3, channels, 11, 10, **F64)
    weight = torch.randn(channels, 1, *kernel, **F64, requires_grad=True)
    y = F.conv2d(x, weight, None, stride, padding, 1, channels)
    grad_out = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, weight, grad_out)
    x_rows, row_width = padded_for_blocks(x, tuple(y.shape), stride, padding)
    got = column_block_weight_grad(RowPadded.of(grad_out, row_width), x_rows, kernel, stride, padding)
    torch.testing.assert_close(got, expected, **TIGHT)


@pytest.mark.parametrize(
    ("kernel", "padding"), [((5, 5), (2, 2)), ((7, 3), (3, 1)), ((5, 4), (0, 3)), ((1, 6), (0, 5))]
)
def test_input_gradient_read_from_the_gradients_rows(kernel, padding) -> None:
    channels, size = 3, (9, 11)
    x = torch.randn(2, channels, *size, **F64, requires_grad=True)
    weight = torch.randn(channels, 1, *kernel, **F64)
    y = F.conv2d(x, weight, None, 1, padding, 1, channels)
    grad_out = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, grad_out)
    row_width = gradient_row_width(size[1], y.shape[3], padding[1], 1)
    got = input_grad_from_rows(RowPadded.of(grad_out, row_width), weight, padding, size[1])
    torch.testing.assert_close(got, expected, **TIGHT)
    with pytest.raises(ValueError, match="rows of at least"):
        input_grad_from_rows(RowPadded.of(grad_out, y.shape[3] + 1), weight, padding, size[1] + 5)


def test_row_padded_interior_is_the_tensor_and_the_rest_is_zero(monkeypatch) -> None:
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *size, **kw: new_empty(self, *size, **kw).fill_(7.0))
    t = torch.randn(2, 3, 4, 5, **F64)
    rows = RowPadded.of(t, 9, offset=2)  # allocated as all 7s: every zero below was written
    torch.testing.assert_close(rows.interior(), t, rtol=0, atol=0)
    assert int(rows.storage.count_nonzero()) == t.numel()  # nothing else is non-zero
    assert rows.view().is_contiguous(memory_format=torch.channels_last)


def test_wide_stride_one_kernels_take_the_block_path_and_others_plain_conv2d() -> None:
    x = torch.randn(2, 4, 8, 8)
    wide = torch.randn(4, 1, 5, 5, requires_grad=True)
    narrow = torch.randn(4, 1, 7, 3, requires_grad=True)
    assert type(depthwise_conv2d(x, wide, padding=(2, 2)).grad_fn).__name__ == "_ColumnBlockDepthwiseBackward"
    assert type(depthwise_conv2d(x, narrow, padding=(3, 1)).grad_fn).__name__ == "ConvolutionBackward0"
    assert type(depthwise_conv2d(x, wide, stride=(2, 2)).grad_fn).__name__ == "ConvolutionBackward0"
    assert type(depthwise_conv2d(x, wide, padding=(4, 4), dilation=(2, 2)).grad_fn).__name__ == "ConvolutionBackward0"
    with torch.no_grad():
        assert depthwise_conv2d(x, wide, padding=(2, 2)).grad_fn is None


def test_nchw_input_gets_the_plain_gradient_in_its_own_layout() -> None:
    """An NCHW input works (made channels-last inside); its gradient is the plain one, in NCHW."""
    x = torch.randn(2, 3, 9, 9, **F64, requires_grad=True)
    weight = torch.randn(3, 1, 5, 5, **F64, requires_grad=True)
    (ours,) = torch.autograd.grad(depthwise_conv2d(x, weight, padding=(2, 2)).sum(), x)
    (plain,) = torch.autograd.grad(F.conv2d(x, weight, None, 1, 2, 1, 3).sum(), x)
    torch.testing.assert_close(ours, plain, **TIGHT)
    assert ours.is_contiguous()  # autograd.grad returns it raw: no leaf layout contract hides a leak


def test_run_depthwise_routes_only_plain_depthwise_convs() -> None:
    x = torch.randn(1, 4, 9, 9, **F64)

    class Marked(nn.Conv2d):
        pass

    plain = nn.Conv2d(4, 4, 5, padding=2, groups=4, **F64)
    assert type(run_depthwise(plain, x).grad_fn).__name__ == "_ColumnBlockDepthwiseBackward"
    for conv in (
        Marked(4, 4, 5, padding=2, groups=4, **F64),
        nn.Conv2d(4, 4, 5, padding="same", groups=4, **F64),
        nn.Conv2d(4, 4, 5, padding=2, groups=4, padding_mode="reflect", **F64),
        nn.Conv2d(4, 8, 5, padding=2, groups=4, **F64),
        nn.Conv2d(4, 4, 5, padding=2, groups=2, **F64),
    ):
        torch.testing.assert_close(run_depthwise(conv, x), conv(x), **TIGHT)
        assert type(run_depthwise(conv, x).grad_fn).__name__ != "_ColumnBlockDepthwiseBackward"


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [
        ((5, 5), 1, 2, 1),  # ints, as F.conv2d takes them
        ((5, 7), (1, 1), (2, 3), (1, 1)),
        ((5, 5), 1, "same", 1),
        ((7, 5), (1, 1), "same", (1, 1)),
        ((4, 6), 1, "same", 1),  # uneven 'same' padding: F.conv2d itself
        ((5, 5), 1, "valid", 1),
        ((5, 5), 2, 1, 1),
        ((5, 5), 1, "same", 2),
        ((5, 5), (1, 2), (0, 1), 1),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_accepts_conv2d_style_arguments_on_the_gradient_path(kernel, stride, padding, dilation) -> None:
    """int / pair / 'same' / 'valid' used to fail where the weight needs a gradient (the column-block path)."""
    channels = 3
    x = torch.randn(2, channels, 9, 11, **F64, requires_grad=True)
    weight = torch.randn(channels, 1, *kernel, **F64, requires_grad=True)
    bias = torch.randn(channels, **F64, requires_grad=True)
    expected = F.conv2d(x, weight, bias, stride, padding, dilation, channels)
    grad_out = torch.randn_like(expected)
    ours = _grads(lambda *a: depthwise_conv2d(*a, stride, padding, dilation), x, weight, bias, grad_out)
    plain = _grads(lambda *a: F.conv2d(*a, stride, padding, dilation, channels), x, weight, bias, grad_out)
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    blocks = depthwise_conv2d(x, weight, bias, stride, padding, dilation).grad_fn
    ones = (1, (1, 1))
    column_block = stride in ones and dilation in ones and (padding != "same" or all(k % 2 for k in kernel))
    assert (type(blocks).__name__ == "_ColumnBlockDepthwiseBackward") == column_block


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stride": (1,)}, TypeError, r"stride must be an int or a pair of ints, got \(1,\)"),
        ({"stride": 0}, ValueError, "stride must be >= 1, got 0"),
        ({"dilation": (1, 1, 1)}, TypeError, r"dilation must be an int or a pair of ints, got \(1, 1, 1\)"),
        ({"padding": -1}, ValueError, "padding must be >= 0, got -1"),
        ({"padding": 1.5}, TypeError, "padding must be an int or a pair of ints, got 1.5"),
        ({"padding": "full"}, ValueError, "padding must be an int, a pair of ints, 'same' or 'valid', got 'full'"),
        ({"padding": "same", "stride": 2}, ValueError, r"padding='same' requires stride=1.*got stride=\(2, 2\)"),
    ],
)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_rejects_bad_conv_arguments(kwargs, error, match, requires_grad: bool) -> None:
    x = torch.randn(1, 4, 6, 6)
    weight = torch.randn(4, 1, 5, 5, requires_grad=requires_grad)
    with pytest.raises(error, match=match):
        depthwise_conv2d(x, weight, **kwargs)


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="depthwise_conv2d: x must be a tensor, got ndarray"):
        depthwise_conv2d(torch.randn(1, 4, 6, 6).numpy(), torch.randn(4, 1, 5, 5))
    with pytest.raises(TypeError, match="depthwise_conv2d: weight must be a tensor, got list"):
        depthwise_conv2d(torch.randn(1, 4, 6, 6), [1.0])
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match=r"weight \(C, 1, kh, kw\).*weight \(4, 2, 5, 5\)"):
        depthwise_conv2d(x, torch.randn(4, 2, 5, 5))
    with pytest.raises(ValueError, match=r"x \(B, C, H, W\).*x \(4, 6, 6\)"):
        depthwise_conv2d(x[0], torch.randn(4, 1, 5, 5))
    with pytest.raises(ValueError, match="a row of 6 pixels cannot hold 6 pixels from column 1"):
        RowPadded.of(x, 6)
    rows = RowPadded.of(x, 8)
    with pytest.raises(ValueError, match="shift must be at most the row width 8, got 9"):
        rows.view(9)
    with pytest.raises(ValueError, match=r"stride=2 times the gradient's \(8 pixels from column 1\)"):
        column_block_weight_grad(rows, rows, (5, 5), (2, 2), (2, 2))


def test_public_api() -> None:
    import convzoo

    assert convzoo.depthwise_conv2d is depthwise_conv2d
    assert "depthwise_conv2d" in convzoo.__all__


def test_column_blocks_stay_off_under_autocast() -> None:
    """Under autocast F.conv2d casts x and the weight itself; the custom backward would meet a bfloat16
    gradient next to float32 saved tensors (oneDNN: "could not create a primitive descriptor")."""
    x = torch.randn(2, 4, 9, 9)
    weight = torch.randn(4, 1, 5, 5, requires_grad=True)
    assert uses_column_blocks(x, weight, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_column_blocks(x, weight, 1, 1)
        y = depthwise_conv2d(x, weight, None, 1, 2)
        expected = F.conv2d(x, weight.detach(), None, 1, 2, 1, 4)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected)
    y.float().sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32
