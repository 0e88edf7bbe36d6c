"""convzoo.ops.conv_spec: layout helpers, ConvSpec validation, and the input check every operator shares."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import fx, nn

from convzoo.ops.conv_spec import (
    ConvSpec,
    autocast_enabled,
    check_bool,
    check_input,
    memory_format_of,
    relayout,
)
from convzoo.ops.cpwc import CPWConv2d
from convzoo.ops.dilated import DilatedSeparableConv2d, PyramidDilatedConv2d
from convzoo.ops.multiception import MulticeptionConv2d, MulticeptionOfficial
from convzoo.ops.separable import DSConv2d, MixConv2d


@pytest.mark.parametrize(
    ("source", "target"),
    [(torch.contiguous_format, torch.channels_last), (torch.channels_last, torch.contiguous_format)],
)
def test_relayout_returns_the_gradient_in_the_inputs_layout(source, target) -> None:
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=source).requires_grad_()
    y = relayout(x, target)
    assert memory_format_of(y) == target or (target == torch.contiguous_format and y.is_contiguous())
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    grad = torch.randn(2, 3, 4, 5).contiguous(memory_format=target)
    # autograd.grad returns the gradient raw (x.grad would be made to match x's layout anyway)
    (grad_x,) = torch.autograd.grad(y, x, grad)
    assert grad_x.is_contiguous(memory_format=source)
    torch.testing.assert_close(grad_x, grad, rtol=0, atol=0)


def test_tensor_contiguous_alone_would_leak_the_layout() -> None:
    """Why relayout exists: Tensor.contiguous passes the gradient through in the new layout."""
    seen = []
    activation = torch.randn(2, 3, 4, 5, requires_grad=True) * 1.0  # not a leaf: leaves get dense grads anyway
    activation.register_hook(seen.append)
    activation.contiguous(memory_format=torch.channels_last).backward(
        torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), retain_graph=True
    )
    assert not seen[0].is_contiguous()
    seen.clear()
    relayout(activation, torch.channels_last).backward(
        torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    )
    assert seen[0].is_contiguous()


@pytest.mark.parametrize("layer", [MulticeptionConv2d(4, 6, kernels=(3, 5)), MixConv2d(4, 6, kernels=(3, 5))])
def test_channels_last_islands_keep_the_models_layout_forward_and_backward(layer) -> None:
    seen = []
    x = torch.randn(2, 4, 8, 8, requires_grad=True) * 1.0
    x.register_hook(seen.append)
    y = layer.train()(x)
    assert y.is_contiguous()
    y.backward(torch.randn_like(y))
    assert seen[0].is_contiguous()


# ------------------------------------------------------------------------------ ConvSpec
def test_convspec_constructor_validates_like_create() -> None:
    with pytest.raises(ValueError, match="in_channels must be a positive int, got 0"):
        ConvSpec(0, -1, "x")
    with pytest.raises(ValueError, match="out_channels must be a positive int, got -1"):
        ConvSpec(4, -1, (3, 3))
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair of ints, got 'x'"):
        ConvSpec(4, 8, "x")
    with pytest.raises(ValueError, match=r"groups=3 must divide both in_channels=4 and out_channels=8"):
        ConvSpec(4, 8, (3, 3), groups=3)
    with pytest.raises(ValueError, match="padding must be an int, a pair of ints, 'same' or 'valid', got 'full'"):
        ConvSpec(4, 8, (3, 3), padding="full")
    with pytest.raises(ValueError, match="padding='same' requires stride=1"):
        ConvSpec(4, 8, (3, 3), (2, 2), "same")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        ConvSpec(4, 8, (3, 3), padding_mode="mirror")
    with pytest.raises(TypeError, match="bias must be a bool, got 'yes'"):
        ConvSpec(4, 8, (3, 3), bias="yes")
    with pytest.raises(TypeError, match="bias must be a bool, got 1"):
        dataclasses.replace(ConvSpec.create(4, 8, 3), bias=1)


def test_convspec_constructor_normalizes_like_create() -> None:
    spec = ConvSpec(4, 8, 3, 2, 1, 1, 2, False)  # type: ignore[arg-type]
    assert spec == ConvSpec.create(4, 8, 3, 2, 1, 1, 2, False)
    assert (spec.kernel_size, spec.stride, spec.padding, spec.dilation) == ((3, 3), (2, 2), (1, 1), (1, 1))
    assert ConvSpec(4, 8, (3, 3), padding="valid").padding == (0, 0)
    assert ConvSpec.from_conv(nn.Conv2d(4, 8, 3, padding="same")).padding == "same"
    assert dataclasses.replace(spec, bias=True).bias is True


def test_check_bool() -> None:
    assert check_bool(False, "flag") is False
    with pytest.raises(TypeError, match="flag must be a bool, got 0"):
        check_bool(0, "flag")


# ------------------------------------------------------------------------------ check_input
def test_check_input_accepts_batched_and_unbatched_inputs() -> None:
    assert check_input(torch.randn(2, 3, 4, 5), 3, "Layer") is False
    assert check_input(torch.randn(3, 4, 5), 3, "Layer") is True


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        ([[1.0]], TypeError, "Layer expects a tensor input, got list"),
        (torch.randn(3, 4), ValueError, r"Layer expects a 4-D input \(B, C, H, W\) or .* got shape \(3, 4\)"),
        (torch.randn(1, 1, 3, 4, 5), ValueError, r"4-D input .*got shape \(1, 1, 3, 4, 5\)"),
        (torch.randn(2, 4, 4, 5), ValueError, r"Layer has in_channels=3, got an input with 4 channels"),
        (torch.randn(2, 4, 5), ValueError, r"in_channels=3, got an input with 2 channels \(shape \(2, 4, 5\)\)"),
        (
            torch.ones(2, 3, 4, 5, dtype=torch.int64),
            TypeError,
            "Layer expects a floating-point input, got dtype torch.int64",
        ),
    ],
)
def test_check_input_rejects(x, error, match) -> None:
    with pytest.raises(error, match=match):
        check_input(x, 3, "Layer")


def test_check_input_lets_an_fx_proxy_through() -> None:
    class Layer(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.unsqueeze(0) if check_input(x, 3, "Layer") else x * 2

    graph = fx.symbolic_trace(Layer())
    torch.testing.assert_close(graph(torch.ones(1, 3, 2, 2)), torch.full((1, 3, 2, 2), 2.0))


def _pyramid_branches() -> nn.Module:
    return PyramidDilatedConv2d(4, dilations=(1, 2)).fuse(form="branches")


# every operator whose input check this module provides: (name, a 4-input-channel module)
OPERATORS = {
    "multiception": lambda: MulticeptionConv2d(4, 6, kernels=(3, 5)),
    "multiception_official": lambda: MulticeptionOfficial(4, 6, kernels=(3, 5)),
    "fused_multiception": lambda: MulticeptionConv2d(4, 6, kernels=(3, 5)).eval().fuse(),
    "dsconv": lambda: DSConv2d(4, 6),
    "mixconv": lambda: MixConv2d(4, 6, kernels=(3, 5, 7)),
    "cpwc": lambda: CPWConv2d(4, 6, bias=True),
    "cpwc_case3_no_pwc": lambda: CPWConv2d(4, 8, pointwise=False),
    "dds": lambda: DilatedSeparableConv2d(4, 6),
    "dds_depthwise_only": lambda: DilatedSeparableConv2d(4, 4, pointwise=False, bias=True),
    "pyramid": lambda: PyramidDilatedConv2d(4),
    "pyramid_unsplit": lambda: PyramidDilatedConv2d(4, split=False),
    "pyramid_branches": _pyramid_branches,
}


@pytest.mark.parametrize("make", OPERATORS.values(), ids=OPERATORS.keys())
@pytest.mark.parametrize("channels", [3, 6, 8])
@pytest.mark.parametrize("train", [False, True])
def test_operators_reject_another_channel_count(make, channels: int, train: bool) -> None:
    """More channels used to be ignored silently by some (pyramid, CPWC); fewer failed deep inside torch."""
    layer = make().train(train)
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name} has in_channels=4, got an input with {channels} channels"):
        layer(torch.randn(2, channels, 7, 7))


@pytest.mark.parametrize("make", OPERATORS.values(), ids=OPERATORS.keys())
@pytest.mark.parametrize("shape", [(4, 7), (1, 2, 4, 7, 7)], ids=["2d", "5d"])
def test_operators_reject_other_ranks_and_non_tensors(make, shape) -> None:
    layer = make()
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name} expects a 4-D input \(B, C, H, W\) or an unbatched 3-D input"):
        layer(torch.randn(*shape))
    with pytest.raises(TypeError, match=rf"{name} expects a tensor input, got ndarray"):
        layer(torch.randn(2, 4, 7, 7).numpy())


@pytest.mark.parametrize("make", OPERATORS.values(), ids=OPERATORS.keys())
def test_operators_run_an_unbatched_input_as_a_batch_of_one(make) -> None:
    """As nn.Conv2d: (C, H, W) -> (C_out, H', W'), the same values as the batch of one."""
    layer = make().double().eval()
    x = torch.randn(4, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x.unsqueeze(0)).squeeze(0)
        got = layer(x)
    assert got.shape == expected.shape and got.dim() == 3
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if any(p.requires_grad for p in layer.parameters()):  # the training form (CPU fast paths) too
        layer.train()
        x.requires_grad_()
        layer(x).sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("make", [OPERATORS["cpwc"], OPERATORS["pyramid"]], ids=["cpwc", "pyramid"])
def test_the_input_check_leaves_compile_export_and_jit_trace_working(make) -> None:
    layer = make().eval()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        expected = layer(x)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # no graph break
        torch.testing.assert_close(compiled(x), expected)
        exported = torch.export.export(layer, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.testing.assert_close(exported.module()(x), expected)
        with warnings.catch_warnings():
            warnings.simplefilter("error", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
            traced = torch.jit.trace(layer, (x,))
        torch.testing.assert_close(traced(x), expected)
    torch._dynamo.reset()


def test_numpy_integers_are_ints_as_in_nn_conv2d() -> None:
    import numpy as np

    spec = ConvSpec.create(np.int64(4), np.int64(6), np.int64(3), (np.int32(2), 1), np.int64(1))
    assert spec.kernel_size == (3, 3) and spec.stride == (2, 1) and spec.padding == (1, 1)
    assert all(type(v) is int for v in (*spec.kernel_size, *spec.stride, *spec.padding, spec.in_channels))
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair of ints, got True"):
        ConvSpec.create(4, 6, True)


def test_autocast_enabled_is_per_device_type_and_false_for_meta() -> None:
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert not autocast_enabled(cpu) and not autocast_enabled(meta)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_enabled(cpu)
        assert not autocast_enabled(meta)  # torch.is_autocast_enabled("meta") raises


def test_every_operator_takes_numpy_integers_as_nn_conv2d_does() -> None:
    """Sizes from numpy (a config array, np.arange) are ints to nn.Conv2d; DDS, the pyramid, Multiception,
    MixConv, DO-Conv's d_mul and CAC's tile used to refuse them. They are stored as Python ints."""
    import numpy as np

    import convzoo
    from convzoo import (
        DilatedSeparableConv2d,
        DOConv2d,
        MixConv2d,
        MulticeptionConv2d,
        PyramidDilatedConv2d,
    )
    from convzoo.ops.cac_sparse import CACSparseConv2d

    three, two = np.int64(3), np.int32(2)
    built = {
        "dds": (DilatedSeparableConv2d(8, 8, three, dilation=two), DilatedSeparableConv2d(8, 8, 3, dilation=2)),
        "pyramid": (PyramidDilatedConv2d(9, three, dilations=list(np.array([1, 2, 3]))), PyramidDilatedConv2d(9, 3)),
        "multiception": (
            MulticeptionConv2d(8, 8, kernels=list(np.array([3, 5]))),
            MulticeptionConv2d(8, 8, kernels=(3, 5)),
        ),
        "mixconv": (MixConv2d(8, 8, kernels=list(np.array([3, 5]))), MixConv2d(8, 8, kernels=(3, 5))),
        "doconv": (DOConv2d(8, 8, three, d_mul=np.int64(12)), DOConv2d(8, 8, 3, d_mul=12)),
    }
    for name, (from_numpy, from_int) in built.items():
        assert repr(from_numpy) == repr(from_int), name
        assert {k: v.shape for k, v in from_numpy.state_dict().items()} == {
            k: v.shape for k, v in from_int.state_dict().items()
        }, name
    assert type(built["doconv"][0].d_mul) is int
    cac = convzoo.CAConv2d(8, 8, 3, padding=1)
    assert type(CACSparseConv2d.from_cac(cac, tile=np.int64(4), algorithm="block").tile) is int
    assert convzoo.conversion_report(
        convzoo.convert(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)), "dds", dilation=two)
    ).replaced
