"""Multiception, its official reference form, its deploy form, and the DSConv / MixConv baselines."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import convzoo
from convzoo.ops.multiception import (
    FusedMulticeptionConv2d,
    MulticeptionConv2d,
    MulticeptionOfficial,
    multiception_parameter_count,
)
from convzoo.ops.separable import DSConv2d, MixConv2d
from convzoo.testing import assert_same_backward, count_parameters, randomize_batchnorm_

F64 = {"dtype": torch.float64}


def _randomized(module: nn.Module) -> nn.Module:
    randomize_batchnorm_(module)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1 and p.shape[0] == getattr(module, "out_channels", -1):
                p.add_(torch.randn_like(p) * 0.1)
    return module


@pytest.mark.parametrize(
    ("kernels", "stride", "size"),
    [((3, 5, 7), 1, (9, 11)), ((3, 5), 2, (9, 10)), ((3, 3), 2, (8, 7)), ((3,), 3, (10, 10)), ((1, 5), (2, 1), (7, 9))],
)
def test_stride_in_depthwise_equals_official_in_eval(kernels, stride, size) -> None:
    fast = _randomized(MulticeptionConv2d(4, 6, 3, stride, kernels=kernels, **F64)).eval()
    official = MulticeptionOfficial.from_multiception(fast).eval()
    x = torch.randn(3, 4, *size, **F64)
    y = fast(x)
    torch.testing.assert_close(y, official(x), rtol=1e-12, atol=1e-12)
    s = fast.stride
    assert y.shape == (3, 6, (size[0] - 1) // s[0] + 1, (size[1] - 1) // s[1] + 1)


def test_stride_one_training_mode_matches_official_outputs_grads_and_stats() -> None:
    fast = _randomized(MulticeptionConv2d(3, 5, kernels=(3, 5, 7), **F64)).train()
    official = MulticeptionOfficial.from_multiception(fast).train()
    x = torch.randn(4, 3, 8, 8, **F64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(4, 5, 8, 8, **F64)
    fast(x).backward(g)
    official(x2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(fast.named_parameters(), official.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)
    for a, b in zip(fast.buffers(), official.buffers()):
        torch.testing.assert_close(a, b)


def test_stride_two_training_mode_differs_only_through_bn_statistics() -> None:
    fast = _randomized(MulticeptionConv2d(3, 5, 3, 2, kernels=(3, 5), **F64)).train()
    official = MulticeptionOfficial.from_multiception(fast).train()
    x = torch.randn(4, 3, 8, 8, **F64)
    assert not torch.allclose(fast(x), official(x))  # BN(K*C) sees a quarter of the positions


@pytest.mark.parametrize(("kernels", "stride"), [((3, 5, 7), 1), ((3, 5), 2), ((3, 3), 1), ((7, 3), (1, 2))])
def test_fuse_is_one_depthwise_and_one_pointwise_and_exact(kernels, stride) -> None:
    module = _randomized(MulticeptionConv2d(4, 6, 3, stride, kernels=kernels, **F64)).eval()
    fused = module.fuse()
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2
    assert convs[0].groups == 4 and convs[0].out_channels == 4 * len(kernels)
    assert convs[1].kernel_size == (1, 1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(3, 4, 9, 10, **F64)
    expected = module(x)
    torch.testing.assert_close(fused(x), expected, rtol=1e-12, atol=1e-12)  # eager fast path
    torch.testing.assert_close(fused.pointwise(fused.depthwise(x)), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(MulticeptionOfficial.from_multiception(module).fuse()(x), expected)


def test_fused_fast_path_chunks_and_falls_back_when_windows_are_not_zero(monkeypatch) -> None:
    from convzoo.ops import multiception

    module = _randomized(MulticeptionConv2d(2, 3, kernels=(3, 5), **F64)).eval()
    fused = module.fuse()
    x = torch.randn(5, 2, 6, 6, **F64)
    monkeypatch.setattr(multiception, "_CHUNK_BYTES", 1)  # one image per chunk
    torch.testing.assert_close(fused(x), module(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        fused.depthwise.weight[0, 0, 0, 0] = 1.0  # a tap outside the 3x3 window of branch 0
    torch.testing.assert_close(fused(x), fused.pointwise(fused.depthwise(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["canonical", "branch", "accumulate", "dense", "auto"])
@pytest.mark.parametrize(
    ("kernels", "stride", "size"), [((3, 5, 7), 1, (9, 11)), ((3, 5), 2, (8, 7)), ((5, 3), 1, (6, 6))]
)
def test_every_fused_algorithm_equals_the_canonical_form(algorithm, kernels, stride, size) -> None:
    module = _randomized(MulticeptionConv2d(4, 6, 3, stride, kernels=kernels, **F64)).eval()
    fused = module.fuse()
    fused.algorithm = algorithm
    x = torch.randn(3, 4, *size, **F64)
    expected = fused.pointwise(fused.depthwise(x))
    torch.testing.assert_close(fused(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(expected, module(x), rtol=1e-12, atol=1e-12)
    if algorithm == "auto":
        assert fused.last_algorithm in ("branch", "accumulate", "dense")
        assert len(fused._algorithms) == 1
        fused(x.contiguous(memory_format=torch.channels_last))  # a new layout is tuned separately
        assert len(fused._algorithms) == 2
    else:
        assert fused.last_algorithm == algorithm


def test_dense_algorithm_multiplies_the_two_convs_out_and_follows_weight_updates() -> None:
    module = _randomized(MulticeptionConv2d(3, 5, kernels=(3, 5), **F64)).eval()
    fused = module.fuse()
    dense = fused.dense_weight()
    assert dense.shape == (5, 3, 5, 5)
    # by hand for one entry: W[o, c] = sum_j P[o, c*K + j] * D[c*K + j]
    o, c = 4, 1
    by_hand = sum(fused.pointwise.weight[o, c * 2 + j, 0, 0] * fused.depthwise.weight[c * 2 + j, 0] for j in range(2))
    torch.testing.assert_close(dense[o, c], by_hand, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        fused.pointwise.weight.mul_(2.0)
    torch.testing.assert_close(fused.dense_weight(), 2.0 * dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["branch", "accumulate", "dense", "auto"])
def test_every_fused_algorithm_passes_gradients_to_the_input_and_the_weights(algorithm) -> None:
    module = _randomized(MulticeptionConv2d(3, 4, 3, 2, kernels=(3, 5), **F64)).eval()
    fused, reference = module.fuse().requires_grad_(True), module.fuse().requires_grad_(True)
    assert not any(p.requires_grad for p in module.fuse().parameters())  # frozen unless asked
    fused.algorithm, reference.algorithm = algorithm, "canonical"
    x = torch.randn(2, 3, 7, 7, **F64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(2, 4, 4, 4, **F64)
    fused(x).backward(g)
    assert fused.last_algorithm == ("dense" if algorithm == "dense" else "canonical")  # the window forms skip taps
    reference(x_ref).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(fused.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_bad_fused_algorithm() -> None:
    with pytest.raises(ValueError, match="algorithm must be one of .*'fastest'"):
        FusedMulticeptionConv2d(4, 6, kernels=(3, 5), algorithm="fastest")


@pytest.mark.parametrize(("c_in", "c_out", "stride", "size"), [(4, 6, 2, 7), (4, 6, 1, 8), (5, 3, 2, 10), (3, 8, 1, 5)])
def test_single_3x3_kernel_is_dsconv_with_bn_in_folded(c_in: int, c_out: int, stride: int, size: int) -> None:
    module = _randomized(MulticeptionConv2d(c_in, c_out, 3, stride, kernels=(3,), **F64)).eval()
    ds = DSConv2d(c_in, c_out, 3, stride, **F64).eval()
    scale = module.bn_in.weight / torch.sqrt(module.bn_in.running_var + module.bn_in.eps)
    shift = module.bn_in.bias - module.bn_in.running_mean * scale
    with torch.no_grad():
        ds.depthwise.weight.copy_(module.branches[0].weight)
        ds.pointwise.weight.copy_(module.pointwise.weight * scale[None, :, None, None])
        ds.pointwise.bias.copy_(module.pointwise.bias + module.pointwise.weight.flatten(1) @ shift)
        ds.bn_out.load_state_dict(module.bn_out.state_dict())
    x = torch.randn(2, c_in, size, size + 1, **F64)
    torch.testing.assert_close(ds(x), module(x), rtol=1e-12, atol=1e-12)
    assert count_parameters(module) == count_parameters(ds) + 2 * c_in  # BN(in) affine


@pytest.mark.parametrize("kernels", [(3, 5, 7), (3, 5), (3, 3)])
def test_stride_in_the_depthwise_step_saves_three_quarters_of_its_macs(kernels) -> None:
    """Same outputs as the official form (tested above), with the depthwise convs at the output resolution."""
    ours, official = (
        MulticeptionConv2d(8, 16, 3, 2, kernels=kernels),
        MulticeptionOfficial(8, 16, 3, 2, kernels=kernels),
    )
    depthwise = 8 * sum(k * k for k in kernels)  # MACs per position of all branches
    pointwise = 8 * len(kernels) * 16
    assert convzoo.count_macs(ours, (8, 16, 16)) == 8 * 8 * (depthwise + pointwise)
    assert convzoo.count_macs(official, (8, 16, 16)) == 16 * 16 * depthwise + 8 * 8 * pointwise


def test_parameter_count_by_hand() -> None:
    # C=4, C_out=6, kernels (3, 5): depthwise 4*(9+25)=136, BN(8) 16, 1x1 8*6+6=54, BN(6) 12 -> 218
    module = MulticeptionConv2d(4, 6, kernels=(3, 5))
    assert count_parameters(module) == 218 == multiception_parameter_count(4, 6, (3, 5))
    assert count_parameters(module.fuse()) == 4 * 2 * 25 + 8 * 6 + 6
    # DSConv: 4*9 + 4*6 + 6 + 12 = 78; MixConv (3,5,7) over 4 channels split 2/1/1: 2*9+25+49 = 92 (+ 24+6+12)
    assert count_parameters(DSConv2d(4, 6)) == 78
    assert count_parameters(MixConv2d(4, 6, kernels=(3, 5, 7))) == 92 + 42


@pytest.mark.parametrize("cls", [DSConv2d, MixConv2d])
@pytest.mark.parametrize("stride", [1, 2])
def test_baselines_fuse_exactly(cls, stride) -> None:
    module = _randomized(cls(6, 5, 3, stride, **F64)).eval()
    x = torch.randn(2, 6, 9, 8, **F64)
    fused = module.fuse()
    torch.testing.assert_close(fused(x), module(x), rtol=1e-12, atol=1e-12)
    assert fused[0] is module.depthwise
    assert fused(x).shape == (2, 5, (9 - 1) // stride + 1, (8 - 1) // stride + 1)


def test_mixconv_splits_channels_across_depthwise_kernels() -> None:
    module = MixConv2d(7, 4, kernels=(3, 5, 7))
    convs = list(module.depthwise.values())
    assert [(c.in_channels, c.groups, c.kernel_size[0]) for c in convs] == [(3, 3, 3), (2, 2, 5), (2, 2, 7)]


def test_deploy_and_reparameterize_on_a_converted_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, 2, 1))
    model = convzoo.convert(model, "multiception", kernels=(3, 5)).to(torch.float64)
    randomize_batchnorm_(model)
    x = torch.randn(2, 3, 9, 9, **F64)
    expected = model.eval()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fx trace that finds conv-BN pairs must succeed
        deployed = convzoo.deploy(model)
    assert not any(isinstance(m, MulticeptionConv2d) for m in deployed.modules())
    assert sum(isinstance(m, FusedMulticeptionConv2d) for m in deployed.modules()) == 2
    torch.testing.assert_close(deployed(x), expected, rtol=1e-10, atol=1e-10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())


def test_from_conv_keeps_geometry_device_dtype_and_converts_only_centred_dense_convs() -> None:
    conv = nn.Conv2d(4, 6, 5, 2, 2, **F64)
    module = MulticeptionConv2d.from_conv(conv, kernels=(3, 5))
    assert (module.kernel_size, module.stride, module.padding) == ((5, 5), (2, 2), (2, 2))
    assert module.pointwise.weight.dtype == torch.float64
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=0), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1))
    with pytest.warns(UserWarning, match="no layer was replaced"):
        convzoo.convert(model, "multiception")
    with pytest.warns(UserWarning, match="no layer was replaced"):
        reasons = dict(convzoo.conversion_report(convzoo.convert(model, "dsconv")).skipped)
    assert "centred padding" in reasons["0"] and "grouped" in reasons["1"] and "1x1" in reasons["2"]


@pytest.mark.parametrize("cls", [MulticeptionConv2d, MixConv2d])
def test_bad_kernels(cls) -> None:
    with pytest.raises(ValueError, match=r"kernels must be odd.*got 4"):
        cls(4, 4, kernels=(3, 4))
    with pytest.raises(ValueError, match="empty"):
        cls(4, 4, kernels=())
    with pytest.raises(TypeError, match="kernels must hold ints"):
        cls(4, 4, kernels=(3.0,))
    with pytest.raises(TypeError, match="kernels must be a non-empty sequence"):
        cls(4, 4, kernels=3)


@pytest.mark.parametrize("cls", [MulticeptionConv2d, DSConv2d, MixConv2d])
def test_bad_geometry(cls) -> None:
    with pytest.raises(ValueError, match=r"unsupported padding 0"):
        cls(4, 4, 3, 1, 0)
    with pytest.raises(ValueError, match=r"unsupported padding 'valid'"):
        cls(4, 4, 3, 1, "valid")
    with pytest.raises(ValueError, match="padding='same' requires stride=1"):
        cls(4, 4, 3, 2, "same")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        cls(4, 4, 2)
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        cls(0, 4)
    assert cls(4, 4, 3, 1, "same").padding == cls(4, 4, 3, 1, 1).padding == (1, 1)


def test_mixconv_needs_a_channel_per_kernel() -> None:
    with pytest.raises(ValueError, match="in_channels=2 cannot be split across 3 kernels"):
        MixConv2d(2, 4, kernels=(3, 5, 7))


def test_channels_last_input_keeps_its_memory_format() -> None:
    module = MulticeptionConv2d(4, 6, kernels=(3, 5)).eval()
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    assert module(x).is_contiguous(memory_format=torch.channels_last)
    assert module(x.contiguous()).is_contiguous()
    assert module.fuse()(x.contiguous()).is_contiguous()


def test_export_of_deploy_form() -> None:
    module = _randomized(MulticeptionConv2d(4, 6, 3, 2, kernels=(3, 5))).eval()
    fused = module.fuse()
    x = torch.randn(2, 4, 8, 8)
    exported = torch.export.export(fused, (x,))
    torch.testing.assert_close(exported.module()(x), module(x), rtol=1e-5, atol=1e-5)


def test_mixconv_training_routes_wide_splits_through_column_blocks_with_the_same_gradients() -> None:
    fast = MixConv2d(6, 4, kernels=(3, 5, 7), **F64).train()
    plain = copy.deepcopy(fast)
    x = torch.randn(2, 6, 9, 9, **F64, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    y = fast(x)
    y_plain = plain.bn_out(plain.pointwise(plain.depthwise(x_plain)))  # modules and autograd only
    torch.testing.assert_close(y, y_plain, rtol=1e-12, atol=1e-12)
    assert_same_backward(fast, plain, y, y_plain, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-10, atol=1e-12)
    seen, stack = {}, [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = type(node).__name__
            stack += [next_node for next_node, _ in node.next_functions]
    assert list(seen.values()).count("_ColumnBlockDepthwiseBackward") == 2  # the 5x5 and 7x7 splits


def test_accumulate_in_float32_equals_the_canonical_form() -> None:
    layer = _randomized(MulticeptionConv2d(8, 6, kernels=(3, 5, 7))).eval().fuse()
    layer.algorithm = "accumulate"
    x = torch.randn(3, 8, 11, 9)
    with torch.inference_mode():
        y = layer(x)
        expected = layer.pointwise(layer.depthwise(x))
    assert layer.last_algorithm == "accumulate" and y.is_contiguous()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MulticeptionConv2d(4, 8),
        lambda: MulticeptionConv2d(4, 8, kernels=(3, 3)),
        lambda: DSConv2d(4, 8),
        lambda: DSConv2d(4, 8, 5),
        lambda: MixConv2d(4, 8),
    ],
)
@pytest.mark.parametrize("train", [True, False])
def test_another_channel_count_names_the_layer_and_in_channels(make, train: bool) -> None:
    """Used to fail inside torch / timm / depthwise_conv2d without naming the layer's in_channels."""
    layer = make().train(train)
    name = type(layer).__name__
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    with pytest.raises(ValueError, match=rf"{name} has in_channels=4, got an input with 6 channels"):
        layer(x)
    with pytest.raises(ValueError, match=rf"{name} has in_channels=4, got an input with 3 channels"):
        layer(x[:, :3])
    if isinstance(layer, MulticeptionConv2d):
        with pytest.raises(ValueError, match=r"FusedMulticeptionConv2d has in_channels=4, got an input with 6"):
            layer.eval().fuse()(x)


@pytest.mark.parametrize("cls", [MulticeptionConv2d, DSConv2d, MixConv2d])
@pytest.mark.parametrize("shape", [(4, 8), (1, 1, 4, 8, 8)])
def test_other_ranks_get_a_clear_error(cls, shape) -> None:
    """Used to be "required rank 4 tensor to use channels_last format" from the CPU layout change."""
    with pytest.raises(ValueError, match=rf"{cls.__name__} expects a 4-D input \(B, C, H, W\) or an unbatched"):
        cls(4, 6)(torch.randn(*shape))


@pytest.mark.parametrize("cls", [MulticeptionConv2d, DSConv2d, MixConv2d])
@pytest.mark.parametrize("stride", [1, 2])
def test_unbatched_input_runs_as_a_batch_of_one(cls, stride: int) -> None:
    layer = _randomized(cls(4, 6, 3, stride, **F64)).eval()
    x = torch.randn(4, 9, 8, **F64)
    out = layer(x)
    assert out.shape == (6, (9 - 1) // stride + 1, (8 - 1) // stride + 1)
    torch.testing.assert_close(out, layer(x[None])[0], rtol=1e-12, atol=1e-12)
    # MixConv's deploy form used to hold timm's MixedConv2d, which split an unbatched input's H
    torch.testing.assert_close(layer.fuse()(x), out, rtol=1e-12, atol=1e-12)


def test_fuse_a_float16_layer_with_float32_batchnorms() -> None:
    """A half-precision model that keeps BatchNorm in float32: the fold computes in float32 (the 1x1
    weight @ BN shift used to mix Half and Float) and the fused form is float16."""
    torch.manual_seed(0)
    module = _randomized(MulticeptionConv2d(4, 6, 3, kernels=(3, 5))).half().eval()
    module.bn_in.float()
    module.bn_out.float()
    fused = module.fuse()
    assert {p.dtype for p in fused.parameters()} == {torch.float16}
    x = torch.randn(2, 4, 8, 8, dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x).float(), module(x).float(), rtol=0.02, atol=0.02)


def test_cpu_training_under_autocast() -> None:
    """On CPU the depthwise step runs channels-last with column-block weight gradients; under autocast
    it must leave them to F.conv2d (a bfloat16 gradient against float32 saved tensors failed in oneDNN)."""
    module = MulticeptionConv2d(4, 6, 3, kernels=(3, 5, 7))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.parameters())
