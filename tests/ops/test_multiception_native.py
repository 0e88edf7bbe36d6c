"""FusedMulticeptionConv2d's native algorithm: convzoo's C++ kernel against the canonical two convs."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from convzoo.native import native_disabled, native_ops
from convzoo.ops.multiception import FusedMulticeptionConv2d, MulticeptionConv2d
from convzoo.testing import randomize_batchnorm_

pytestmark = pytest.mark.skipif(
    native_disabled() or (shutil.which("c++") is None and shutil.which("g++") is None),
    reason="native kernels switched off (CONVZOO_NATIVE=0) or no C++ compiler",
)
F32 = {"rtol": 2e-5, "atol": 2e-5}


def _deployed(c_in: int, c_out: int, stride: int, kernels: tuple[int, ...], **kwargs) -> FusedMulticeptionConv2d:
    """A deploy form with random weights, BatchNorm statistics and bias, folded from its training form."""
    module = MulticeptionConv2d(c_in, c_out, 3, stride, kernels=kernels)
    randomize_batchnorm_(module)
    fused = module.eval().fuse()
    for name, value in kwargs.items():
        setattr(fused, name, value)
    return fused


def _reference(fused: FusedMulticeptionConv2d, x: torch.Tensor) -> torch.Tensor:
    """pointwise(depthwise(x)) in float64, from the module's float32 weights."""
    depthwise, pointwise = fused.depthwise, fused.pointwise
    z = nn.functional.conv2d(
        x.double(), depthwise.weight.double(), None, depthwise.stride, depthwise.padding, 1, depthwise.groups
    )
    return nn.functional.conv2d(z, pointwise.weight.double(), pointwise.bias.double())


def test_the_native_kernels_build_on_this_machine() -> None:
    assert native_ops() is not None  # a C++ compiler is here, so a failed build is a bug, not a skip
    assert hasattr(native_ops(), "multiception_fused")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    ("c_in", "c_out", "stride", "kernels", "batch", "size"),
    [
        (16, 16, 1, (3, 5, 7), 3, (9, 11)),
        (16, 32, 2, (3, 5), 2, (9, 10)),
        (32, 48, 1, (3, 3), 1, (7, 5)),
        (48, 16, 2, (7, 3, 1), 2, (5, 8)),
        (16, 16, 1, (9, 11), 2, (13, 12)),
        (16, 16, 2, (5,), 3, (1, 1)),
        (32, 16, 1, (3, 5), 1, (2, 3)),
        (16, 16, 1, (3, 5, 7), 2, (29, 701)),  # a wide map: each image in row blocks that fit in L2
        (16, 32, 2, (3, 5), 2, (9, 37)),  # stride 2, output rows of 19: blocks of 8 pixels and a tail
        (32, 16, 2, (3, 5, 7), 1, (23, 640)),  # stride 2 on a wide map
        (48, 32, 1, (3, 5), 2, (4, 37)),  # NCHW rows: three channel tiles and two output tiles, then tails
    ],
)
def test_native_equals_the_two_convs(layout, c_in, c_out, stride, kernels, batch, size) -> None:
    fused = _deployed(c_in, c_out, stride, kernels, algorithm="native")
    x = torch.randn(batch, c_in, *size)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = fused(x)
        assert fused.last_algorithm == "native"
        torch.testing.assert_close(y.double(), _reference(fused, x), **F32)
        torch.testing.assert_close(y, fused.pointwise(fused.depthwise(x)), **F32)
    expected_format = torch.channels_last if layout == "channels_last" and not x.is_contiguous() else None
    assert y.is_contiguous(memory_format=expected_format or torch.contiguous_format)


@pytest.mark.parametrize("threads", [1, 2])
def test_native_splits_images_into_row_blocks_across_threads(threads: int) -> None:
    fused = _deployed(16, 16, 1, (3, 5, 7), algorithm="native")
    x = torch.randn(1, 16, 23, 17)  # one image: its rows are split so that every thread has work
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            y = fused(x)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(y.double(), _reference(fused, x), **F32)


def test_an_empty_batch_gives_an_empty_output() -> None:
    fused = _deployed(16, 16, 2, (3, 5), algorithm="native")
    with torch.no_grad():
        y = fused(torch.randn(0, 16, 9, 9))
    assert y.shape == (0, 16, 5, 5)


def test_auto_times_native_where_it_applies_and_not_elsewhere(monkeypatch) -> None:
    fused = _deployed(16, 32, 1, (3, 5, 7))
    x = torch.randn(2, 16, 8, 8)
    ran = []
    native_forward = fused._native_forward
    monkeypatch.setattr(fused, "_native_forward", lambda x: ran.append(1) or native_forward(x))
    with torch.no_grad():
        fused(x)
    assert ran  # timed among the candidates
    assert fused.last_algorithm in ("branch", "accumulate", "dense", "native")
    assert fused._native_applies(x)
    small = _deployed(8, 16, 1, (3, 5))  # 8 channels: not a whole vector of 16
    assert not small._native_applies(torch.randn(2, 8, 8, 8))
    assert not fused._native_applies(x.double())


@pytest.mark.parametrize(
    ("why", "fused", "x"),
    [
        ("float64", _deployed(16, 16, 1, (3, 5), algorithm="native").double(), torch.randn(2, 16, 6, 6).double()),
        ("12 channels", _deployed(12, 16, 1, (3, 5), algorithm="native"), torch.randn(2, 12, 6, 6)),
        ("stride 3", _deployed(16, 16, 3, (3, 5), algorithm="native"), torch.randn(2, 16, 7, 7)),
        ("kernel 13", _deployed(16, 16, 1, (13, 3), algorithm="native"), torch.randn(1, 16, 6, 6)),
    ],
)
def test_native_runs_canonical_where_it_does_not_apply(why, fused, x) -> None:
    with torch.no_grad():
        y = fused(x)
    assert fused.last_algorithm == "canonical", why
    torch.testing.assert_close(y, fused.pointwise(fused.depthwise(x)), rtol=0, atol=0)


def test_native_runs_canonical_when_autograd_records_and_under_dispatch_modes() -> None:
    fused = _deployed(16, 16, 1, (3, 5), algorithm="native").requires_grad_(True)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    fused(x).sum().backward()
    assert fused.last_algorithm == "canonical" and x.grad is not None
    fused.requires_grad_(False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fused(x.detach())
    assert fused.last_algorithm == "canonical" and counter.get_total_flops() > 0


def test_native_weights_follow_in_place_updates() -> None:
    fused = _deployed(16, 16, 1, (3, 5), algorithm="native")
    x = torch.randn(2, 16, 7, 7)
    with torch.no_grad():
        fused(x)
        fused.pointwise.weight.mul_(-2.0)
        fused.pointwise.bias.add_(1.0)
        y = fused(x)
    torch.testing.assert_close(y.double(), _reference(fused, x), **F32)


def test_native_operands_by_hand() -> None:
    fused = _deployed(16, 16, 1, (3, 5))
    depthwise, pointwise, bias = fused.native_weights()
    assert depthwise.shape == (2, 5, 5, 16) and pointwise.shape == (32, 16) and bias.shape == (16,)
    # branch j = 1 (5x5) on channel c = 3 is depthwise output channel c*K + j = 7; its 1x1 column is row j*C + c
    torch.testing.assert_close(depthwise[1, :, :, 3], fused.depthwise.weight[7, 0], rtol=0, atol=0)
    torch.testing.assert_close(pointwise[16 + 3], fused.pointwise.weight[:, 7, 0, 0], rtol=0, atol=0)


def test_the_op_rejects_bad_operands_with_a_message() -> None:
    fused = _deployed(16, 16, 1, (3, 5))
    depthwise, pointwise, bias = fused.native_weights()
    x = torch.randn(1, 16, 5, 5)
    with pytest.raises(RuntimeError, match="stride must be 1 or 2, got 3"):
        native_ops().multiception_fused(x, depthwise, [3, 5], pointwise, bias, 3)
    with pytest.raises(RuntimeError, match="4-D float32 CPU tensor"):
        native_ops().multiception_fused(x.double(), depthwise, [3, 5], pointwise, bias, 1)
    with pytest.raises(RuntimeError, match="kernel sizes must be odd"):
        native_ops().multiception_fused(x, depthwise, [3, 4], pointwise, bias, 1)
    with pytest.raises(RuntimeError, match="non-empty map"):
        native_ops().multiception_fused(x[:, :, :0], depthwise, [3, 5], pointwise, bias, 2)


def test_export_records_the_two_convs() -> None:
    fused = _deployed(16, 16, 1, (3, 5, 7), algorithm="native")
    x = torch.randn(2, 16, 8, 8)
    program = torch.export.export(fused, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("convzoo" in target for target in targets)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), fused(x), **F32)


def test_non_contiguous_inputs() -> None:
    fused = _deployed(16, 16, 2, (3, 5), algorithm="native")
    base = torch.randn(2, 16, 12, 30)
    for x in (base[:, :, 1:10, 3:27], base.permute(0, 1, 3, 2), base[..., ::2]):
        with torch.no_grad():
            y = fused(x)
        assert fused.last_algorithm == "native"
        torch.testing.assert_close(y.double(), _reference(fused, x), **F32)


def test_autocast_runs_the_torch_forms_in_the_autocast_dtype() -> None:
    fused = _deployed(16, 16, 1, (3, 5, 7))
    pinned = _deployed(16, 16, 1, (3, 5, 7), algorithm="native")
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_pinned, expected = fused(x), pinned(x), fused.pointwise(fused.depthwise(x))
    assert fused.last_algorithm != "native" and pinned.last_algorithm == "canonical"
    assert y.dtype == y_pinned.dtype == expected.dtype == torch.bfloat16


def test_forward_mode_derivatives_never_go_through_the_kernel() -> None:
    fused = _deployed(16, 16, 1, (3, 5), algorithm="native")
    x = torch.randn(1, 16, 5, 5)
    tangent = torch.randn_like(x)
    _, derivative = torch.func.jvp(fused, (x,), (tangent,))
    assert fused.last_algorithm == "canonical"
    torch.testing.assert_close(
        derivative, fused.pointwise(fused.depthwise(tangent)) - fused.pointwise.bias[:, None, None]
    )


def test_a_replaced_parameter_is_repacked_even_at_the_same_address() -> None:
    fused = _deployed(16, 16, 1, (3, 5), algorithm="native")
    x = torch.randn(2, 16, 7, 7)
    with torch.no_grad():
        fused(x)
        for _ in range(3):  # new tensors may reuse the freed memory of the old ones, with version 0 again
            fused.pointwise.weight = nn.Parameter(torch.randn_like(fused.pointwise.weight), requires_grad=False)
            y = fused(x)
            torch.testing.assert_close(y.double(), _reference(fused, x), **F32)
        fused.pointwise.weight.data.mul_(-1.0)  # .data writes bypass the version counter: clear() after them
        fused._native_cache.clear()
        torch.testing.assert_close(fused(x).double(), _reference(fused, x), **F32)


def test_last_algorithm_names_what_ran_after_a_cached_native_choice() -> None:
    fused = _deployed(16, 16, 1, (3, 5))
    x = torch.randn(2, 16, 8, 8)
    fused._algorithms.choose(x, {"native": lambda: None})  # the choice cached for this input signature
    with torch.no_grad():
        fused(x)
        assert fused.last_algorithm == "native"
        with FlopCounterMode(display=False):
            fused(x)
        assert fused.last_algorithm == "canonical"
        fused.depthwise.weight[0, 0, 0, 0] = 1.0  # a tap outside the 3x3 window: the windows no longer hold
        y = fused(x)
    assert fused.last_algorithm == "canonical"
    torch.testing.assert_close(y, fused.pointwise(fused.depthwise(x)), rtol=0, atol=0)


def test_a_deep_copy_repacks_its_own_weights() -> None:
    fused = _deployed(16, 16, 1, (3, 5), algorithm="native")
    x = torch.randn(2, 16, 7, 7)
    with torch.no_grad():
        fused(x)  # packed at the weights' version 0
        fused.pointwise.weight.mul_(-2.0)
        clone = copy.deepcopy(fused)  # its weights are new tensors whose versions start at 0 again
        torch.testing.assert_close(clone(x).double(), _reference(fused, x), **F32)
    assert clone.last_algorithm == "native"
