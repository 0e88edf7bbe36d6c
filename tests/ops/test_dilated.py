"""DDS operators: eq. 1 receptive fields, Table 1 parameter counts, exact folding, conversion, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convzoo
from convzoo.ops.dilated import (
    DepthwiseBranches,
    DilatedSeparableConv2d,
    PyramidDilatedConv2d,
    fold_dilated_kernels,
    needs_centred_depthwise,
    needs_dense_or_depthwise,
    receptive_field,
    split_channels,
)
from convzoo.testing import count_parameters, randomize_batchnorm_

F64 = {"dtype": torch.float64}


def _impulse_support(module: nn.Module, channels: int, size: int = 21) -> tuple[int, int]:
    """Rows/cols of the input that reach the centre output: the measured receptive field extent."""
    x = torch.zeros(1, channels, size, size, dtype=torch.float64, requires_grad=True)
    out = module(x)
    out[:, :, size // 2, size // 2].sum().backward()
    support = x.grad.abs().sum(dim=(0, 1)) != 0
    rows, cols = support.any(1).nonzero(), support.any(0).nonzero()
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


# ---------------------------------------------------------------- receptive field, eq. 1
@pytest.mark.parametrize(("k", "r", "expected"), [(3, 1, 3), (3, 2, 5), (3, 3, 7), (5, 2, 9), (1, 4, 1)])
def test_receptive_field_formula(k: int, r: int, expected: int) -> None:
    assert receptive_field(k, r) == expected


@pytest.mark.parametrize(("k", "r"), [(3, 1), (3, 2), (3, 3), (5, 2)])
def test_dds_measured_receptive_field_is_eq1(k: int, r: int) -> None:
    module = DilatedSeparableConv2d(2, 3, k, dilation=r, **F64)
    with torch.no_grad():
        module.depthwise.weight.fill_(1.0)
        module.pointwise.weight.fill_(1.0)
    assert module.receptive_field == (k - 1) * r + 1
    assert _impulse_support(module, 2) == ((k - 1) * r + 1,) * 2


def test_pyramid_measured_receptive_field_is_largest_branch() -> None:
    module = PyramidDilatedConv2d(3, 3, dilations=(1, 2, 3), **F64)
    with torch.no_grad():
        for branch in module.branches:
            branch.weight.fill_(1.0)
    assert module.receptive_field == 7
    assert _impulse_support(module, 3) == (7, 7)


# ---------------------------------------------------------------- parameters, Table 1
@pytest.mark.parametrize(("c", "c_out", "n"), [(8, 16, 3), (5, 7, 5), (32, 3, 3)])
def test_dds_parameters_follow_table1(c: int, c_out: int, n: int) -> None:
    module = DilatedSeparableConv2d(c, c_out, n, dilation=3)
    standard = nn.Conv2d(c, c_out, n, bias=False)
    assert count_parameters(module) == n * n * c + c * c_out
    assert count_parameters(standard) == n * n * c * c_out
    # eq. 2: the reduction factor over a standard conv
    assert count_parameters(standard) / count_parameters(module) == pytest.approx(
        n * n * c * c_out / (n * n * c + c * c_out)
    )


@pytest.mark.parametrize("dilations", [(1, 2, 3), (1, 2), (2, 4, 6, 8), (3,)])
@pytest.mark.parametrize("channels", [32, 31, 96])
def test_pyramid_split_parameters_equal_one_depthwise_conv(channels: int, dilations: tuple[int, ...]) -> None:
    module = PyramidDilatedConv2d(channels, 3, dilations=dilations)
    assert count_parameters(module) == 9 * channels
    assert module.out_channels == channels
    assert sum(module.splits) == channels


def test_pyramid_unsplit_parameters_and_channels() -> None:
    module = PyramidDilatedConv2d(10, 5, dilations=(1, 2, 3), split=False)
    assert count_parameters(module) == 3 * 25 * 10
    assert module.out_channels == 30
    assert module(torch.randn(2, 10, 9, 9)).shape == (2, 30, 9, 9)


def test_split_channels_gives_remainder_to_first_branches() -> None:
    assert split_channels(32, 3) == (11, 11, 10)
    assert split_channels(30, 3) == (10, 10, 10)
    assert split_channels(3, 3) == (1, 1, 1)


# ---------------------------------------------------------------- forward semantics
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(9, 9), (10, 7), (5, 12)])
def test_dds_equals_dilated_depthwise_then_pointwise(stride: int, size: tuple[int, int]) -> None:
    module = DilatedSeparableConv2d(4, 6, 3, stride, dilation=2, bias=True, **F64)
    x = torch.randn(2, 4, *size, **F64)
    expected = F.conv2d(x, module.depthwise.weight, None, stride, 2, 2, groups=4)
    expected = F.conv2d(expected, module.pointwise.weight, module.pointwise.bias)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-12)
    out_h, out_w = ((n - 1) // stride + 1 for n in size)
    assert module(x).shape == (2, 6, out_h, out_w)


@pytest.mark.parametrize("split", [True, False])
def test_pyramid_equals_concatenated_dilated_branches(split: bool) -> None:
    module = PyramidDilatedConv2d(7, 3, 2, dilations=(1, 2, 3), split=split, **F64)
    x = torch.randn(2, 7, 11, 10, **F64)
    parts = torch.split(x, module.splits, dim=1) if split else (x, x, x)
    expected = torch.cat(
        [
            F.conv2d(part, conv.weight, None, 2, r, r, groups=part.shape[1])
            for part, conv, r in zip(parts, module.branches, (1, 2, 3))
        ],
        dim=1,
    )
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- exact folding
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(9, 9), (10, 7)])
@pytest.mark.parametrize(("k", "dilations"), [(3, (1, 2, 3)), (5, (1, 3)), (3, (2, 4)), (3, (3, 1, 2))])
@pytest.mark.parametrize("bias", [False, True])
def test_folded_form_is_exact(
    stride: int, size: tuple[int, int], k: int, dilations: tuple[int, ...], bias: bool
) -> None:
    module = PyramidDilatedConv2d(8, k, stride, dilations=dilations, bias=bias, **F64)
    if bias:
        with torch.no_grad():
            for branch in module.branches:
                branch.bias.normal_()
    folded = module.fuse(form="folded")
    assert type(folded) is nn.Conv2d
    assert folded.kernel_size == ((k - 1) * max(dilations) + 1,) * 2
    assert folded.groups == 8
    x = torch.randn(2, 8, *size, **F64)
    torch.testing.assert_close(folded(x), module(x), rtol=1e-12, atol=1e-12)


def test_folded_kernel_is_zero_filled_at_non_taps() -> None:
    weights = [torch.ones(1, 1, 3, 3, **F64), torch.full((1, 1, 3, 3), 2.0, **F64)]
    folded = fold_dilated_kernels(weights, (1, 3))
    assert folded.shape == (2, 1, 7, 7)
    assert folded[0, 0].count_nonzero() == 9 and folded[0, 0, 2:5, 2:5].eq(1).all()
    assert folded[1, 0].count_nonzero() == 9 and folded[1, 0, ::3, ::3].eq(2).all()


def test_default_fuse_form_and_branch_form_are_exact() -> None:
    module = PyramidDilatedConv2d(9, 3, 1, **F64)
    x = torch.randn(1, 9, 8, 8, **F64)
    branches = module.fuse(form="branches")
    assert isinstance(branches, DepthwiseBranches)
    assert not hasattr(branches, "fuse")
    torch.testing.assert_close(branches(x), module(x), rtol=0, atol=0)
    torch.testing.assert_close(module.fuse()(x), module(x), rtol=1e-12, atol=1e-12)
    unsplit = PyramidDilatedConv2d(4, 3, split=False, **F64)
    assert isinstance(unsplit.fuse(), DepthwiseBranches)


@pytest.mark.parametrize("form", ["folded", "branches"])
def test_deploy_in_mobilenet_block_with_batchnorm_is_exact(form: str) -> None:
    model = nn.Sequential(
        nn.Conv2d(4, 12, 1, bias=False),
        nn.BatchNorm2d(12),
        nn.PReLU(12),
        PyramidDilatedConv2d(12, 3, 2),
        nn.BatchNorm2d(12),
        nn.PReLU(12),
        DilatedSeparableConv2d(12, 5, 3, dilation=2),
        nn.BatchNorm2d(5),
    ).to(torch.float64)
    randomize_batchnorm_(model)
    model.eval()
    model[3].fuse = lambda: PyramidDilatedConv2d.fuse(model[3], form=form)  # choose the form under test
    deployed = convzoo.deploy(model)
    x = torch.randn(2, 4, 11, 9, **F64)
    torch.testing.assert_close(deployed(x), model(x), rtol=1e-10, atol=1e-10)
    kinds = {type(m) for m in deployed.modules()}
    assert PyramidDilatedConv2d not in kinds and DilatedSeparableConv2d not in kinds
    assert sum(isinstance(m, nn.BatchNorm2d) for m in deployed.modules()) == (0 if form == "folded" else 1)


# ---------------------------------------------------------------- conversion
def test_pyramid_from_depthwise_conv_copies_kernels_per_branch() -> None:
    conv = nn.Conv2d(10, 10, 3, 2, 1, groups=10, bias=True, **F64)
    module = PyramidDilatedConv2d.from_conv(conv)
    assert module.splits == (4, 3, 3) and module.stride == (2, 2)
    torch.testing.assert_close(torch.cat([b.weight for b in module.branches]), conv.weight, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([b.bias for b in module.branches]), conv.bias, rtol=0, atol=0)
    # the dilation-1 branch computes exactly what the original conv computed on its channels
    x = torch.randn(1, 10, 9, 9, **F64)
    torch.testing.assert_close(module(x)[:, :4], conv(x)[:, :4], rtol=1e-12, atol=1e-12)
    # with a single dilation-1 branch the replacement is the original conv
    same = PyramidDilatedConv2d.from_conv(conv, dilations=(1,))
    torch.testing.assert_close(same(x), conv(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_dds_from_depthwise_conv_is_its_dilated_half(bias: bool) -> None:
    conv = nn.Conv2d(6, 6, 3, 1, 1, groups=6, bias=bias, **F64)
    if bias:
        with torch.no_grad():
            conv.bias.normal_()
    module = DilatedSeparableConv2d.from_conv(conv, dilation=1)
    assert module.pointwise is None and count_parameters(module) == count_parameters(conv)
    assert (module.depthwise.bias is not None) == bias
    x = torch.randn(2, 6, 7, 8, **F64)
    torch.testing.assert_close(module(x), conv(x), rtol=1e-12, atol=1e-12)
    assert DilatedSeparableConv2d.from_conv(conv).dilation == (2, 2)


def test_dds_from_separable_dense_conv_is_exact_at_dilation_1() -> None:
    pointwise = torch.randn(7, 5, **F64)
    depthwise = torch.randn(5, 3, 3, **F64)
    conv = nn.Conv2d(5, 7, 3, 2, 1, bias=True, **F64)
    with torch.no_grad():
        conv.weight.copy_(pointwise[:, :, None, None] * depthwise[None])
    module = DilatedSeparableConv2d.from_conv(conv, dilation=1)
    assert module.pointwise.bias is not None and module.depthwise.bias is None
    x = torch.randn(2, 5, 9, 10, **F64)
    torch.testing.assert_close(module(x), conv(x), rtol=1e-10, atol=1e-10)


def test_convert_places_kinds_by_predicate() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1),  # dense: dds yes, pyramid no
        nn.Conv2d(8, 8, 3, 1, 1, groups=8),  # depthwise: both
        nn.Conv2d(8, 16, 1),  # pointwise: neither
        nn.Conv2d(16, 16, 3, 1, 0, groups=16),  # uncentred padding: neither
        nn.Conv2d(16, 16, 4, 1, 2, groups=16),  # even kernel: neither
    )
    dds = convzoo.convert(model, "dds")
    assert [type(m).__name__ for m in dds] == [
        "DilatedSeparableConv2d",
        "DilatedSeparableConv2d",
        "Conv2d",
        "Conv2d",
        "Conv2d",
    ]
    assert dds[0].pointwise is not None and dds[1].pointwise is None
    pyramid = convzoo.convert(model, "pyramid")
    assert [type(m).__name__ for m in pyramid][:2] == ["Conv2d", "PyramidDilatedConv2d"]
    assert isinstance(pyramid[3], nn.Conv2d) and isinstance(pyramid[4], nn.Conv2d)
    x = torch.randn(1, 3, 16, 16)
    assert dds(x).shape == pyramid(x).shape == model(x).shape


@pytest.mark.parametrize(
    ("conv", "fragment"),
    [
        (nn.Conv2d(4, 4, 1), "1x1"),
        (nn.Conv2d(4, 8, 3, padding=1, groups=2), "grouped"),
        (nn.Conv2d(4, 4, (3, 5), padding=(1, 2)), "square and odd"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (nn.Conv2d(4, 4, 3, padding=2, dilation=1), "not centred"),
    ],
)
def test_dds_predicate_reasons(conv: nn.Conv2d, fragment: str) -> None:
    assert fragment in needs_dense_or_depthwise(conv)


def test_predicates_accept_same_padding_and_dilated_sources() -> None:
    assert needs_dense_or_depthwise(nn.Conv2d(4, 4, 3, padding="same")) is None
    assert needs_centred_depthwise(nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4)) is None
    assert "not depthwise" in needs_centred_depthwise(nn.Conv2d(4, 4, 3, padding=1))


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("dilation", [0, -1])
def test_dds_rejects_dilation_below_one(dilation: int) -> None:
    with pytest.raises(ValueError, match=rf"dilation must be an int >= 1, got {dilation}"):
        DilatedSeparableConv2d(4, 4, dilation=dilation)


def test_pyramid_rejects_dilation_below_one() -> None:
    with pytest.raises(ValueError, match=r"dilations must be an int >= 1, got 0"):
        PyramidDilatedConv2d(4, dilations=(1, 0))


def test_pyramid_rejects_bad_dilations_type() -> None:
    with pytest.raises(TypeError, match="dilations must be a non-empty sequence"):
        PyramidDilatedConv2d(4, dilations=2)
    with pytest.raises(TypeError, match="dilations must be a non-empty sequence"):
        PyramidDilatedConv2d(4, dilations=())
    with pytest.raises(TypeError, match=r"dilations must be an int >= 1, got 1.5"):
        PyramidDilatedConv2d(4, dilations=(1, 1.5))
    with pytest.raises(TypeError, match=r"dilations must be a non-empty sequence of ints >= 1, got '123'"):
        PyramidDilatedConv2d(4, dilations="123")


def test_pyramid_rejects_unsplittable_dilations() -> None:
    with pytest.raises(ValueError, match=r"dilations can't be shared out across channels=2.*3 dilations"):
        PyramidDilatedConv2d(2, dilations=(1, 2, 3))
    PyramidDilatedConv2d(2, dilations=(1, 2, 3), split=False)  # every branch sees all channels: fine


@pytest.mark.parametrize("kernel_size", [2, 4, 0])
def test_even_or_empty_kernels_are_rejected(kernel_size: int) -> None:
    with pytest.raises(ValueError, match=rf"kernel_size must be an odd int >= 1.*got {kernel_size}"):
        DilatedSeparableConv2d(4, 4, kernel_size)
    with pytest.raises(ValueError, match=rf"kernel_size must be an odd int >= 1.*got {kernel_size}"):
        PyramidDilatedConv2d(4, kernel_size)


def test_kernel_size_type_is_checked() -> None:
    with pytest.raises(TypeError, match=r"kernel_size must be an odd int, got \(3, 3\)"):
        DilatedSeparableConv2d(4, 4, (3, 3))


def test_dds_without_pointwise_needs_equal_channels() -> None:
    with pytest.raises(ValueError, match="out_channels must equal in_channels=4, got out_channels=8"):
        DilatedSeparableConv2d(4, 8, pointwise=False)


def test_channel_and_split_types_are_checked() -> None:
    with pytest.raises(ValueError, match="channels must be a positive int, got 0"):
        PyramidDilatedConv2d(0)
    with pytest.raises(TypeError, match="split must be a bool, got 1"):
        PyramidDilatedConv2d(4, split=1)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PyramidDilatedConv2d(4, bias="no"), "bias must be a bool, got 'no'"),
        (lambda: PyramidDilatedConv2d(4, bias=None), "bias must be a bool, got None"),
        (lambda: DilatedSeparableConv2d(4, 8, pointwise="no"), "pointwise must be a bool, got 'no'"),
        (lambda: DilatedSeparableConv2d(4, 4, pointwise=0), "pointwise must be a bool, got 0"),
        (lambda: DilatedSeparableConv2d(4, 8, bias="yes"), "bias must be a bool, got 'yes'"),
        (lambda: DilatedSeparableConv2d(4, 8, bias=None), "bias must be a bool, got None"),
    ],
)
def test_flags_must_be_bools(make, match: str) -> None:
    """Truthy strings used to build biases / keep the pointwise conv."""
    with pytest.raises(TypeError, match=match):
        make()


def test_pyramid_rejects_extra_channels_it_used_to_ignore() -> None:
    module = PyramidDilatedConv2d(4).eval()
    x = torch.randn(2, 8, 8, 8)
    module(x[:, :4])
    with pytest.raises(ValueError, match=r"PyramidDilatedConv2d has in_channels=4, got an input with 8 channels"):
        module(x)
    with pytest.raises(ValueError, match=r"in_channels=4, got an input with 3 channels"):
        module(x[:, :3])
    branches = module.fuse(form="branches")
    with pytest.raises(ValueError, match=r"DepthwiseBranches has in_channels=4, got an input with 8 channels"):
        branches(x)


@pytest.mark.parametrize("split", [True, False])
def test_pyramid_takes_an_unbatched_input_like_nn_conv2d(split: bool) -> None:
    """A (C, H, W) input used to be split / concatenated along H."""
    module = PyramidDilatedConv2d(4, split=split, **F64)
    x = torch.randn(4, 8, 6, **F64)
    out = module(x)
    assert out.shape == (module.out_channels, 8, 6)
    torch.testing.assert_close(out, module(x[None])[0], rtol=0, atol=0)
    dds = DilatedSeparableConv2d(4, 5, **F64)
    assert dds(x).shape == (5, 8, 6)


def test_fuse_form_errors() -> None:
    with pytest.raises(ValueError, match=r"form must be one of \('branches', 'folded'\), got 'fast'"):
        PyramidDilatedConv2d(4).fuse(form="fast")
    with pytest.raises(ValueError, match="form='folded' needs split=True"):
        PyramidDilatedConv2d(4, split=False).fuse(form="folded")
    assert not hasattr(PyramidDilatedConv2d(4, split=False), "weight")  # no single depthwise kernel
    with pytest.raises(AttributeError, match=r"split=False\) has no weight: every branch reads all channels"):
        _ = PyramidDilatedConv2d(4, split=False).weight
    with pytest.raises(AttributeError, match="object has no attribute 'kernel'"):
        _ = PyramidDilatedConv2d(4, split=False).kernel  # other names: nn.Module's own error


def test_from_conv_errors() -> None:
    with pytest.raises(ValueError, match="split=False outputs len"):
        PyramidDilatedConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, groups=4), split=False)
    with pytest.raises(ValueError, match=r"pyramid cannot replace .*not depthwise"):
        PyramidDilatedConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1))
    with pytest.raises(ValueError, match=r"dds cannot replace .*1x1"):
        DilatedSeparableConv2d.from_conv(nn.Conv2d(4, 4, 1))


def test_device_and_dtype_are_honoured() -> None:
    module = PyramidDilatedConv2d(6, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    dds = DilatedSeparableConv2d(3, 5, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in dds.parameters())
    assert module.fuse().weight.dtype == torch.float64


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_dds_stays_scriptable() -> None:
    """DilatedSeparableConv2d was TorchScript-compatible before its input check; it still is."""
    module = DilatedSeparableConv2d(4, 6, **F64)
    scripted = torch.jit.script(module)
    x = torch.randn(2, 4, 7, 7, **F64)
    torch.testing.assert_close(scripted(x), module(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_from_conv_in_half_precision(dtype: torch.dtype) -> None:
    """torch has no float16 / bfloat16 SVD (on CPU or CUDA): the rank-1 init is computed in float32."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    reference = DilatedSeparableConv2d.from_conv(conv, dilation=1)
    module = DilatedSeparableConv2d.from_conv(conv.to(dtype), dilation=1)
    assert {p.dtype for p in module.parameters()} == {dtype}
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(module.get_parameter(name).float(), parameter, rtol=0.02, atol=0.02)
