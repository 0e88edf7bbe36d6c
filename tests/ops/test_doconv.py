"""DO-Conv: exactness of conversion, kernel vs feature composition, fusing, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convzoo.ops.doconv import DOConv2d, compose_kernel, identity_init

# (in, out, kernel, stride, padding, dilation, groups, bias, padding_mode, height, width)
GEOMETRIES = [
    (4, 6, 3, 1, 1, 1, 1, True, "zeros", 9, 7),
    (4, 6, 3, 2, 1, 1, 1, False, "zeros", 9, 11),
    (6, 6, 3, 1, 2, 2, 1, True, "zeros", 10, 9),
    (6, 9, 3, 1, 1, 1, 3, True, "zeros", 7, 8),  # DO-GConv, out/groups = 3 > 1
    (4, 8, (3, 5), (2, 1), (1, 2), (1, 2), 2, False, "zeros", 11, 10),  # non-square, grouped
    (6, 6, 3, 2, 1, 1, 6, True, "zeros", 9, 9),  # DO-DConv
    (3, 12, 5, 1, 2, 1, 3, False, "zeros", 8, 9),  # depthwise with channel multiplier 4
    (4, 5, 3, 1, 1, 1, 1, True, "reflect", 7, 9),
    (4, 4, 3, 2, 1, 1, 2, True, "replicate", 9, 8),
    (4, 5, (3, 2), 1, (1, 1), 1, 1, False, "circular", 6, 7),
    (4, 5, 4, 1, "same", 2, 1, True, "zeros", 9, 8),  # even kernel, asymmetric 'same'
    (4, 6, 3, 1, "same", 1, 2, True, "reflect", 7, 7),
    (5, 3, 2, 3, "valid", 1, 1, True, "zeros", 13, 10),
]


def _conv(geometry, dtype=torch.float64) -> tuple[nn.Conv2d, torch.Tensor]:
    c_in, c_out, k, s, p, d, g, bias, mode, h, w = geometry
    conv = nn.Conv2d(c_in, c_out, k, s, p, d, g, bias, mode, dtype=dtype)
    x = torch.randn(2, c_in, h, w, dtype=dtype)
    return conv, x


def _randomize_d(module: DOConv2d) -> DOConv2d:
    with torch.no_grad():
        module.d_delta.normal_(0, 0.5)
    return module


def feature_composition(module: DOConv2d, x: torch.Tensor) -> torch.Tensor:
    """The paper's feature composition (Fig. 3-a): depthwise step with D, then a grouped 1x1 with W.

    The depthwise conv gives input channel c the D_mul outputs c*D_mul + d, each using D[c, :, d];
    the grouped 1x1 then reads, for output o in group g, channel (g*C_in/g + j)*D_mul + d with W[o, j, d].
    """
    spec = module.spec
    c_in, d_mul = module.in_channels, module.d_mul
    x, padding = spec.pad(x)
    depthwise = module.D.permute(0, 2, 1).reshape(c_in * d_mul, 1, *module.kernel_size)
    features = F.conv2d(x, depthwise, None, spec.stride, padding, spec.dilation, groups=c_in)
    pointwise = module.W_paper.reshape(module.out_channels, -1, 1, 1)
    return F.conv2d(features, pointwise, module.bias, groups=module.groups)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("extra", [0, 5, "double"])
def test_converted_layer_computes_exactly_the_conv(geometry, extra) -> None:
    """D = I computes the conv for every d_mul: M*N, M*N + 5, and 2*M*N + 1 (two identity tiles)."""
    conv, x = _conv(geometry)
    area = conv.kernel_size[0] * conv.kernel_size[1]
    d_mul = 2 * area + 1 if extra == "double" else area + extra
    do = DOConv2d.from_conv(conv, d_mul=d_mul)
    torch.testing.assert_close(do(x), conv(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(do.weight, conv.weight, rtol=0, atol=0)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("extra", [0, 5])
def test_kernel_composition_equals_feature_composition(geometry, extra) -> None:
    conv, x = _conv(geometry)
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    do = _randomize_d(DOConv2d.from_conv(conv, d_mul=kernel + extra))
    torch.testing.assert_close(do(x), feature_composition(do, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_fuse_computes_the_training_form_float64(geometry) -> None:
    conv, x = _conv(geometry)
    do = _randomize_d(DOConv2d.from_conv(conv))
    fused = do.fuse()
    assert type(fused) is nn.Conv2d
    torch.testing.assert_close(fused(x), do(x), rtol=1e-12, atol=1e-12)


def test_fuse_float32_within_1e5_relative() -> None:
    conv, x = _conv((8, 16, 3, 1, 1, 1, 2, True, "zeros", 12, 12), dtype=torch.float32)
    do = _randomize_d(DOConv2d.from_conv(conv))
    torch.testing.assert_close(do.fuse()(x), do(x), rtol=1e-5, atol=1e-5)


def test_d_is_tied_to_the_input_channel_it_multiplies() -> None:
    """Scaling D of one input channel only changes the kernel slices that read that channel."""
    do = DOConv2d(6, 9, 3, groups=3, dtype=torch.float64)
    before = do.weight.detach().clone()
    channel = 5  # group 2 (channels 4, 5), position 1 within the group
    with torch.no_grad():
        do.d_delta[channel] += torch.eye(9, dtype=torch.float64)  # D[channel] = 2 I
    after = do.weight.detach()
    changed = (after != before).any(dim=(2, 3))  # (C_out, C_in/groups)
    expected = torch.zeros_like(changed)
    expected[6:9, 1] = True  # outputs of group 2 reading its input position 1
    assert torch.equal(changed, expected)
    torch.testing.assert_close(after[6:9, 1], 2 * before[6:9, 1])


def test_identity_init_tiles_identities_and_zero_fills() -> None:
    eye = identity_init(4, 11, dtype=torch.float64)
    assert eye.shape == (4, 11)
    torch.testing.assert_close(eye[:, :4], torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(eye[:, 4:8], torch.eye(4, dtype=torch.float64))
    assert eye[:, 8:].abs().sum() == 0


def test_parameters_and_initial_state() -> None:
    do = DOConv2d(4, 8, (3, 5), groups=2, d_mul=20)
    assert do.W.shape == (4, 20, 4)  # input-major: (C_in, D_mul, C_out/groups)
    assert do.W_paper.shape == (8, 2, 20)
    assert do.d_delta.shape == (4, 15, 20)
    assert do.d_delta.abs().sum() == 0
    assert set(do.state_dict()) == {"W", "d_delta", "bias"}
    assert do.weight.shape == (8, 2, 3, 5)
    assert (do.in_channels, do.out_channels, do.kernel_size, do.groups) == (4, 8, (3, 5), 2)


def test_positional_arguments_follow_conv2d_order() -> None:
    do = DOConv2d(4, 8, 3, 2, 1, 1, 2, False, "reflect")
    assert do.stride == (2, 2) and do.padding == (1, 1) and do.groups == 2
    assert do.bias is None and do.padding_mode == "reflect"
    assert do.d_mul == 9


@pytest.mark.parametrize(
    ("c_in", "c_out", "groups", "d_mul"),
    [(2, 3, 1, 10), (2, 3, 1, None), (6, 9, 3, None), (6, 9, 3, 14), (6, 6, 6, None)],
    ids=["conv-dmul10", "conv-square-D", "gconv", "gconv-dmul14", "dconv"],
)
def test_gradients_reach_d_and_w(c_in, c_out, groups, d_mul) -> None:
    """gradcheck of the composed-kernel backward: square D (the default d_mul) and groups > 1 included."""
    do = _randomize_d(DOConv2d(c_in, c_out, 3, 2, 1, groups=groups, dtype=torch.float64, d_mul=d_mul))
    x = torch.randn(1, c_in, 5, 4, dtype=torch.float64, requires_grad=True)

    def f(x, w, d, b):
        return torch.func.functional_call(do, {"W": w, "d_delta": d, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, do.W, do.d_delta, do.bias))
    do(x).square().sum().backward()
    assert do.W.grad.abs().sum() > 0 and do.d_delta.grad.abs().sum() > 0


@pytest.mark.parametrize("geometry", GEOMETRIES[:7], ids=str)
def test_gradients_equal_feature_composition(geometry) -> None:
    """W and D gradients of the training form equal autograd through the feature-composition reference."""
    conv, x = _conv(geometry)
    do = _randomize_d(DOConv2d.from_conv(conv))
    grad_out = torch.randn_like(conv(x))
    fast = torch.autograd.grad((do(x) * grad_out).sum(), (do.W, do.d_delta))
    reference = torch.autograd.grad((feature_composition(do, x) * grad_out).sum(), (do.W, do.d_delta))
    for got, want in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip() -> None:
    source = _randomize_d(DOConv2d(4, 6, 3, 1, 1, groups=2, dtype=torch.float64))
    target = DOConv2d(4, 6, 3, 1, 1, groups=2, dtype=torch.float64)
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_converted_torchvision_resnet18_is_exact_in_float64() -> None:
    torchvision = pytest.importorskip("torchvision")
    from convzoo import convert
    from convzoo.testing import randomize_batchnorm_

    model = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10)).double().eval()
    converted = convert(model, "doconv")
    assert sum(isinstance(m, DOConv2d) for m in converted.modules()) == 17  # stem + 16 block 3x3 convs
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-10, atol=1e-10)


BAD_ARGUMENTS = [
    ({"d_mul": 8}, ValueError, "d_mul must be >= kernel area"),
    ({"d_mul": 9.0}, TypeError, "d_mul must be an int"),
    ({"kernel_size": 1}, ValueError, "larger than 1x1"),
    ({"groups": 3}, ValueError, "groups=3 must divide"),
    ({"padding": "full"}, ValueError, "padding must be"),
    ({"padding": "same", "stride": 2}, ValueError, "padding='same' requires stride=1"),
    ({"padding_mode": "mirror"}, ValueError, "padding_mode must be one of"),
    ({"in_channels": 0}, ValueError, "in_channels must be a positive int"),
    ({"out_channels": 2.5}, TypeError, "out_channels must be a positive int"),
    ({"kernel_size": (3, 3, 3)}, TypeError, "kernel_size must be an int or a pair"),
    ({"stride": 0}, ValueError, "stride must be >= 1"),
    ({"dilation": True}, TypeError, "dilation must be an int or a pair"),
    ({"padding": -1}, ValueError, "padding must be >= 0"),
    ({"bias": "yes"}, TypeError, "bias must be a bool"),
]


@pytest.mark.parametrize(("override", "error", "message"), BAD_ARGUMENTS, ids=lambda v: str(v)[:30])
def test_bad_arguments_get_clear_errors(override, error, message) -> None:
    arguments = {"in_channels": 4, "out_channels": 4, "kernel_size": 3} | override
    with pytest.raises(error, match=message):
        DOConv2d(**arguments)


@pytest.mark.parametrize(("stride", "dilation"), list(itertools.product([1, 2], [1, 2])))
def test_odd_sizes_compute_the_composed_conv(stride, dilation) -> None:
    conv = nn.Conv2d(3, 5, 3, stride, dilation, dilation, dtype=torch.float64)
    x = torch.randn(1, 3, 13, 7, dtype=torch.float64)
    do = _randomize_d(DOConv2d.from_conv(conv))
    expected = F.conv2d(x, do.weight, do.bias, stride, dilation, dilation)
    torch.testing.assert_close(do(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(do(x), feature_composition(do, x), rtol=1e-10, atol=1e-12)


def test_autocast_forward_and_backward() -> None:
    """Under autocast the kernel is composed in float32 (the conv casts it); the custom backward used to
    get a bfloat16 gradient against its float32 W and D and fail in bmm."""
    torch.manual_seed(0)
    layer = DOConv2d(4, 6, 3, padding=1, groups=2, d_mul=11)
    with torch.no_grad():
        layer.d_delta.normal_(0, 0.1)
    x = torch.randn(2, 4, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    grads = [p.grad for p in (layer.W, layer.d_delta, layer.bias)]
    reference = DOConv2d(4, 6, 3, padding=1, groups=2, d_mul=11)
    reference.load_state_dict(layer.state_dict())
    reference(x).sum().backward()
    for grad, expected in zip(grads, (reference.W.grad, reference.d_delta.grad, reference.bias.grad)):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected, rtol=0.05, atol=0.05 * float(expected.abs().max()))


def test_reset_parameters_after_to_empty_gives_d_the_exact_identity() -> None:
    """Built on the meta device then allocated with to_empty() and reset (the meta-init / FSDP pattern, and
    convzoo's own materialize()): D = D' + I with D' = 0 and the tiled identity for d_mul > M*N."""
    layer = DOConv2d(4, 6, 3, d_mul=11, device="meta").to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.equal(layer.D, identity_init(9, 11).expand(4, 9, 11))


def test_forward_mode_ad_and_torch_func_transforms_differentiate_the_composition() -> None:
    """jvp, vmap and dual tensors through compose_kernel equal the float64 einsum (its custom backward has no jvp)."""
    from torch.autograd import forward_ad

    torch.manual_seed(0)
    W, D, tangent = torch.randn(16, 9, 16), torch.randn(16, 9, 9), torch.randn(16, 9, 16)

    def reference(w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("isd,ido->ois", D.double(), w.double())

    _, jvp_out = torch.func.jvp(lambda w: compose_kernel(w, D, 1), (W,), (tangent,))
    torch.testing.assert_close(jvp_out.double(), reference(tangent), rtol=1e-5, atol=1e-5)
    with forward_ad.dual_level():
        dual_out = forward_ad.unpack_dual(compose_kernel(forward_ad.make_dual(W, tangent), D, 1)).tangent
    torch.testing.assert_close(dual_out.double(), reference(tangent), rtol=1e-5, atol=1e-5)
    batched = torch.func.vmap(lambda w: compose_kernel(w, D, 1))(torch.stack([W, tangent]))
    torch.testing.assert_close(batched[1].double(), reference(tangent), rtol=1e-5, atol=1e-5)


def test_a_module_built_on_meta_and_loaded_has_the_exact_identity() -> None:
    """to_empty + load_state_dict (the buffer is not in the state_dict): every path still sees D = D' + I."""
    torch.manual_seed(0)
    source = _randomize_d(DOConv2d(6, 4, 3, padding=1, dtype=torch.float64))
    with torch.device("meta"):
        loaded = DOConv2d(6, 4, 3, padding=1, dtype=torch.float64)
    loaded = loaded.to_empty(device="cpu")
    loaded.load_state_dict(source.state_dict())
    assert torch.equal(loaded.D, source.D)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)
