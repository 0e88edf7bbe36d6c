"""CPWC: the §2 grouping plan, the fast form vs a naive per-group reference, conversion, counts, errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import convzoo
from convzoo.ops.cpwc import CPWConv2d, cpwc_grouping_plan
from convzoo.profiling import count_macs, count_parameters
from convzoo.testing import randomize_batchnorm_

TIGHT = {"rtol": 1e-12, "atol": 1e-12}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """CPU convs with many groups in float64 (no oneDNN) loop over groups, and every group pays a
    thread-pool synchronisation: one thread runs these tests 10-40x faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ grouping plan
@pytest.mark.parametrize(
    ("c", "z", "case", "groups"),
    [
        (4, 4, 1, ((0,), (1,), (2,), (3,))),
        (6, 3, 2, ((0, 1), (2, 3), (4, 5))),
        (7, 3, 2, ((0, 1, 2), (3, 4), (5, 6))),  # rm = 1: the first group gets one more
        (11, 4, 2, ((0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10))),  # rm = 3
        (5, 1, 2, ((0, 1, 2, 3, 4),)),
        (2, 6, 3, ((0,), (0,), (0,), (1,), (1,), (1,))),
        (3, 7, 3, ((0,), (0,), (0,), (1,), (1,), (2,), (2,))),  # rm = 1: channel 0 shared once more
        (3, 8, 3, ((0,), (0,), (0,), (1,), (1,), (1,), (2,), (2,))),  # rm = 2
        (1, 3, 3, ((0,), (0,), (0,))),
    ],
)
def test_grouping_plan_examples(c: int, z: int, case: int, groups: tuple) -> None:
    plan = cpwc_grouping_plan(c, z)
    assert plan.case == case
    assert plan.groups == groups


def test_grouping_plan_of_the_papers_worked_example() -> None:
    plan = cpwc_grouping_plan(256, 64)
    assert plan.case == 2 and plan.quotient_remainder == (4, 0)
    assert plan.groups == tuple(tuple(range(4 * i, 4 * i + 4)) for i in range(64))


@pytest.mark.parametrize("c", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("z", [1, 2, 3, 5, 8, 13])
def test_grouping_plan_follows_the_three_cases(c: int, z: int) -> None:
    plan = cpwc_grouping_plan(c, z)
    groups = plan.groups
    assert len(groups) == z  # Z stage-1 filters
    assert sorted({ch for g in groups for ch in g}) == list(range(c))  # no input channel ignored
    flat = [ch for g in groups for ch in g]
    assert flat == sorted(flat)  # consecutive channels, in order
    assert sum(plan.channels_per_filter) == plan.num_connections == max(c, z)
    if z <= c:
        q, rm = divmod(c, z)
        assert plan.channels_per_filter == (q + 1,) * rm + (q,) * (z - rm)
        assert plan.filters_per_channel == (1,) * c  # exclusive groups
    else:
        q, rm = divmod(z, c)
        assert plan.channels_per_filter == (1,) * z
        assert plan.filters_per_channel == (q + 1,) * rm + (q,) * (c - rm)
    assert list(zip(plan.connection_filters, plan.connection_channels)) == [
        (i, ch) for i, g in enumerate(groups) for ch in g
    ]


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0, 4), ValueError, "in_channels must be a positive int, got 0"),
        ((4, 0), ValueError, "out_channels must be a positive int, got 0"),
        ((4.0, 2), TypeError, "in_channels must be a positive int, got 4.0"),
    ],
)
def test_grouping_plan_rejects_bad_channels(args: tuple, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        cpwc_grouping_plan(*args)


# ------------------------------------------------------------------------------ forward
def naive_cpwc(module: CPWConv2d, x: torch.Tensor) -> torch.Tensor:
    """The paper's Fig. 1 literally: one conv per stage-1 filter over its group, one per stage-2 channel.

    ``stage1_weight`` holds the groups' kernels filter by filter, channels ascending.
    """
    stride = module.stride
    weights = module.stage1_weight.split(list(module.plan.channels_per_filter))
    s1 = torch.cat(
        [
            F.conv2d(x[:, list(group)], w.reshape(1, len(group), 3, 3), stride=stride, padding=1)
            for group, w in zip(module.plan.groups, weights)
        ],
        1,
    )
    out = s1
    if module.stage2_weight is not None:
        out = out + torch.cat(
            [F.conv2d(s1[:, i : i + 1], module.stage2_weight[i : i + 1], padding=1) for i in range(s1.shape[1])], 1
        )
    if module.weight is not None:
        out = out + F.conv2d(x, module.weight, stride=stride)
    if module.bias is not None:
        out = out + module.bias.view(1, -1, 1, 1)
    return out


# (in, out, stride, height, width): every case with and without remainder, strided and odd sizes
GEOMETRIES = [
    (6, 6, 1, 7, 9),
    (8, 4, 1, 8, 8),
    (7, 3, 2, 9, 7),
    (11, 4, (2, 1), 7, 10),
    (3, 12, 1, 6, 5),
    (3, 7, 2, 11, 9),
    (5, 13, 3, 10, 10),
    (1, 1, 1, 5, 4),
]


def _random_module(c: int, z: int, stride, **options) -> CPWConv2d:
    module = CPWConv2d(c, z, stride, dtype=torch.float64, **options)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bias": True},
        {"stage2": False, "bias": True},
        {"pointwise": False},
        {"pointwise": False, "bias": True},
        {"pointwise": False, "stage2": False, "bias": True},
    ],
    ids=str,
)
def test_fast_form_equals_naive_reference_float64(geometry, options) -> None:
    c, z, stride, h, w = geometry
    module = _random_module(c, z, stride, **options)
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    out = module(x)
    conv = nn.Conv2d(c, z, 1, stride)
    assert out.shape == (2, z, *conv(x.float()).shape[2:])
    torch.testing.assert_close(out, naive_cpwc(module, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("geometry", [(8, 3, 2, 7, 7), (3, 7, 1, 5, 6)], ids=str)
def test_gradients_of_the_fast_form(geometry) -> None:
    c, z, stride, h, w = geometry
    module = _random_module(c, z, stride, bias=True)
    x = torch.randn(1, c, h, w, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,), fast_mode=True)
    module(x).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad()
    naive_cpwc(module, x).square().sum().backward()
    for name, p in module.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-10)


def test_ablations_drop_their_parameters() -> None:
    assert CPWConv2d(8, 4, stage2=False).stage2_weight is None
    assert CPWConv2d(8, 4, pointwise=False).weight is None
    assert CPWConv2d(8, 4).bias is None and CPWConv2d(8, 4, bias=True).bias.shape == (4,)


# ------------------------------------------------------------------------------ counts
def test_parameter_count_of_the_papers_worked_example() -> None:
    # PWC 1*1*256*64 + stage 1: Z = 64 filters of 3*3*(256/64) + stage 2: 64 filters of 3*3*1
    assert count_parameters(CPWConv2d(256, 64)) == 256 * 64 + 3 * 3 * 4 * 64 + 3 * 3 * 1 * 64 == 19_264
    assert count_parameters(CPWConv2d(256, 64, stage2=False)) == 19_264 - 576
    assert count_parameters(CPWConv2d(256, 64, pointwise=False)) == 19_264 - 16_384


@pytest.mark.parametrize(("c", "z", "stride", "size"), [(256, 64, 1, 8), (7, 3, 2, 9), (3, 7, 1, 5), (6, 6, 2, 7)])
def test_macs_follow_the_formula(c: int, z: int, stride: int, size: int) -> None:
    out = (size - 1) // stride + 1
    per_pixel = {"pwc": z * c, "stage1": 9 * max(c, z), "stage2": 9 * z}
    assert count_macs(CPWConv2d(c, z, stride), (c, size, size)) == sum(per_pixel.values()) * out * out
    no_stage2 = per_pixel["pwc"] + per_pixel["stage1"]
    assert count_macs(CPWConv2d(c, z, stride, stage2=False), (c, size, size)) == no_stage2 * out * out


def test_resnet50_parameters_match_table_2() -> None:
    """Table 2: ResNet-50 25.56M, with CPWC 26.05M, w/o stage 2 25.84M (every 1x1 conv replaced)."""
    with torch.device("meta"):  # counting only: no memory, no init
        model = torchvision.models.resnet50()
    assert round(count_parameters(model) / 1e6, 2) == 25.56
    assert round(count_parameters(convzoo.convert(model, "cpwc")) / 1e6, 2) == 26.05
    no_stage2 = count_parameters(convzoo.convert(model, "cpwc", stage2=False)) / 1e6
    assert abs(no_stage2 - 25.84) < 0.01


def test_mobilenet_v2_macs_match_table_2() -> None:
    """Table 2: MobileNetV2 (1.0x) 300M FLOPs (MACs), with CPWC 387M, at 224x224."""
    model = torchvision.models.mobilenet_v2()
    assert round(count_macs(model, (3, 224, 224)) / 1e6, -1) == 300
    assert round(count_macs(convzoo.convert(model, "cpwc"), (3, 224, 224)) / 1e6, -1) == 390


# ------------------------------------------------------------------------------ conversion
@pytest.mark.parametrize(("c", "z", "stride", "bias"), [(8, 4, 1, True), (3, 7, 2, False), (5, 5, (1, 2), True)])
def test_zero_context_conversion_computes_the_conv(c: int, z: int, stride, bias: bool) -> None:
    conv = nn.Conv2d(c, z, 1, stride, bias=bias, dtype=torch.float64)
    x = torch.randn(2, c, 9, 8, dtype=torch.float64)
    module = CPWConv2d.from_conv(conv, zero_init_context=True)
    torch.testing.assert_close(module(x), conv(x), **TIGHT)
    assert torch.equal(module.weight, conv.weight)
    assert module.stage2_weight.abs().sum() > 0  # only stage 1 starts at zero
    default = CPWConv2d.from_conv(conv)
    assert torch.equal(default.weight, conv.weight)
    assert not torch.allclose(default(x), conv(x))  # the paper's default: a random context


def test_zero_context_layer_trains_its_context() -> None:
    module = CPWConv2d(8, 4, zero_init_context=True)
    module(torch.randn(2, 8, 6, 6)).square().sum().backward()
    assert module.stage1_weight.grad.abs().sum() > 0


def test_zero_context_resnet50_computes_the_original_float64() -> None:
    model = torchvision.models.resnet50().double().eval()
    randomize_batchnorm_(model)
    one_by_one = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    converted = convzoo.convert(model, "cpwc", zero_init_context=True, strict=True, inplace=True)
    report = convzoo.conversion_report(converted)
    assert sorted(name for name, _ in report.replaced) == sorted(one_by_one)
    assert "layer2.0.downsample.0" in one_by_one  # strided shortcut projections too
    assert type(converted.layer2[0].downsample[0]) is CPWConv2d
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected, rtol=1e-10, atol=1e-10)


def test_create_model_replaces_every_pointwise_conv() -> None:
    original = torchvision.models.mobilenet_v2()
    pointwise = [m for m in original.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    model = convzoo.create_model("tv:mobilenet_v2", conv="cpwc")
    assert len([m for m in model.modules() if isinstance(m, CPWConv2d)]) == len(pointwise) == 34
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())


def test_module_follows_device_and_dtype() -> None:
    module = CPWConv2d(3, 7, 2, True, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    module = module.float()
    assert module.stage1_channels.dtype == torch.long
    assert module(torch.randn(1, 3, 5, 5)).dtype == torch.float32
    assert module.kernel_size == (1, 1) and module.stride == (2, 2) and module.groups == 1


def test_deploy_keeps_the_output() -> None:
    model = nn.Sequential(nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 1, 2)).double()
    randomize_batchnorm_(model)
    converted = convzoo.convert(model, "cpwc").eval()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    deployed = convzoo.deploy(converted)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), converted(x), **TIGHT)
    # the BN after the first CPWC was folded into it (fuse_batchnorm), not kept
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert isinstance(deployed[0], CPWConv2d) and deployed[0].bias is not None


@pytest.mark.parametrize("options", [{}, {"bias": True}, {"stage2": False}, {"pointwise": False}], ids=str)
@pytest.mark.parametrize(("c", "z", "stride"), [(7, 3, 2), (3, 7, 1)])
def test_fuse_batchnorm_is_exact(options: dict, c: int, z: int, stride: int) -> None:
    module = _random_module(c, z, stride, **options)
    bn = randomize_batchnorm_(nn.BatchNorm2d(z, dtype=torch.float64)).eval()
    x = torch.randn(2, c, 9, 8, dtype=torch.float64)
    fused = module.fuse_batchnorm(bn)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bn(module(x)), rtol=1e-10, atol=1e-10)
    assert fused.bias is not None and count_parameters(fused) == count_parameters(module) + z * (module.bias is None)


@pytest.mark.parametrize(("c", "z"), [(7, 3), (3, 7), (6, 6)])
def test_fuse_batchnorm_keeps_float32_precision_for_a_small_bn_scale(c: int, z: int) -> None:
    """Folding s into stage 2's W2 + I and storing (W2 + I)s - I cancelled at the scale of 1 (1.8e-4 relative
    error at s = 1e-4, in float32); the scale goes into stage 1 instead."""
    module = _random_module(c, z, 1)
    bn = randomize_batchnorm_(nn.BatchNorm2d(z, dtype=torch.float64)).eval()
    with torch.no_grad():
        bn.weight.fill_(1e-4)
        bn.bias.zero_()
    x = torch.randn(2, c, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = bn(module(x))
        folded = module.float().fuse_batchnorm(bn.float())(x.float()).double()
    scale = expected.abs().max()
    torch.testing.assert_close(folded / scale, expected / scale, rtol=0, atol=2e-6)


def test_fuse_batchnorm_rejects_a_mismatched_bn() -> None:
    with pytest.raises(ValueError, match=r"bn must be a BatchNorm2d\(4\) with running statistics"):
        CPWConv2d(8, 4).fuse_batchnorm(nn.BatchNorm2d(5))


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("conv_args", "error", "match"),
    [
        ((4, 4, 3), ValueError, r"CPWC replaces 1x1 convs; conv has kernel_size=\(3, 3\)"),
        ((4, 4, (1, 3)), ValueError, r"kernel_size=\(1, 3\)"),
        ((4, 4, 1, 1, 0, 1, 2), ValueError, "groups=1; conv has groups=2"),
        ((4, 4, 1, 1, 1), ValueError, r"unpadded 1x1 convs; conv has padding=\(1, 1\)"),
        ((0, 4, 1), ValueError, "in_channels must be a positive int, got 0"),
        ((4, 0, 1), ValueError, "out_channels must be a positive int, got 0"),
    ],
)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_from_conv_rejects_what_it_cannot_replace(conv_args: tuple, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        CPWConv2d.from_conv(nn.Conv2d(*conv_args))


def test_from_conv_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d, got Linear"):
        CPWConv2d.from_conv(nn.Linear(4, 4))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"in_channels": 0}, ValueError, "in_channels must be a positive int, got 0"),
        ({"out_channels": -1}, ValueError, "out_channels must be a positive int, got -1"),
        ({"stride": 0}, ValueError, "stride must be >= 1, got 0"),
        ({"bias": 1}, TypeError, "bias must be a bool, got 1"),
        ({"stage2": "yes"}, TypeError, "stage2 must be a bool, got 'yes'"),
        ({"pointwise": None}, TypeError, "pointwise must be a bool, got None"),
        ({"zero_init_context": True, "pointwise": False}, ValueError, "zero_init_context=True needs pointwise=True"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    args = {"in_channels": 4, "out_channels": 4} | kwargs
    with pytest.raises(error, match=match):
        CPWConv2d(**args)


@pytest.mark.parametrize("options", [{}, {"pointwise": False}], ids=str)
@pytest.mark.parametrize(("c", "z"), [(4, 8), (8, 4), (4, 4)])
def test_forward_rejects_another_channel_count(options: dict, c: int, z: int) -> None:
    """Without the PWC, extra channels used to be ignored (stage 1 reads only the channels it needs)."""
    module = CPWConv2d(c, z, **options).eval()
    x = torch.randn(2, 2 * c, 6, 6)
    with pytest.raises(ValueError, match=rf"CPWConv2d has in_channels={c}, got an input with {2 * c} channels"):
        module(x)
    with pytest.raises(ValueError, match=rf"in_channels={c}, got an input with {c - 1} channels"):
        module(x[:, : c - 1])


@pytest.mark.parametrize(
    ("c", "z", "options"), [(4, 4, {"bias": True, "pointwise": False}), (8, 4, {}), (3, 7, {"stride": 2})], ids=str
)
def test_unbatched_input_as_nn_conv2d(c: int, z: int, options: dict) -> None:
    """(C, H, W) -> (Z, H', W'); it used to give (1, Z, H, W) or fail to unpack the shape."""
    module = _random_module(c, z, options.pop("stride", 1), **options)
    x = torch.randn(c, 7, 6, dtype=torch.float64)
    out = module(x)
    assert out.dim() == 3 and out.shape[0] == z
    torch.testing.assert_close(out, module(x[None])[0], rtol=0, atol=0)


@pytest.mark.parametrize("channels", [(2, 5), (5, 2)])
def test_reset_parameters_refills_the_buffers_after_to_empty(channels: tuple[int, int]) -> None:
    """Built on the meta device then allocated with to_empty(), the identity kernel and case 3's channel
    index are uninitialized memory until reset_parameters() (garbage indices: a CUDA device-side assert)."""
    reference = CPWConv2d(*channels)
    layer = CPWConv2d(*channels, device="meta").to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.equal(layer.stage2_identity, reference.stage2_identity)
    if reference.stage1_channels is None:
        assert layer.stage1_channels is None
    else:
        assert torch.equal(layer.stage1_channels, reference.stage1_channels)


@pytest.mark.parametrize("stage2", [True, False])
def test_fuse_batchnorm_adds_a_bias_in_the_layer_dtype(stage2: bool) -> None:
    """The bias a bias-free CPWC gets from a float32 BN is float16 like the layer (conv2d refuses to mix)."""
    layer = CPWConv2d(4, 6, stage2=stage2, dtype=torch.float16).eval()
    bn = randomize_batchnorm_(nn.BatchNorm2d(6)).eval()
    fused = layer.fuse_batchnorm(bn)
    assert {p.dtype for p in fused.parameters()} == {torch.float16}
    x = torch.randn(2, 4, 6, 6, dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x).float(), bn(layer(x).float()), rtol=0.02, atol=0.02)
