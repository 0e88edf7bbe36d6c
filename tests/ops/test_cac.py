"""CAConv2d: exactness at ρ = 1 and ρ = 0, a direct per-window reference, straight-through gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import convzoo
from convzoo.ops.cac import CAConv2d, cac_layers, gradient_map, has_cac_layers
from convzoo.ops.cac_sharp import CACSharpConv2d
from convzoo.ops.conv_spec import ConvSpec
from convzoo.testing import randomize_batchnorm_

F64 = {"dtype": torch.float64}
TIGHT = {"rtol": 1e-12, "atol": 1e-12}

# (kwargs of nn.Conv2d beyond channels, input H, W): stride 1/2, dilation 1/2, kernels 3/5, odd sizes,
# padding other than k//2, even and non-square kernels, asymmetric 'same', groups, every padding mode.
GEOMETRIES = [
    ({"kernel_size": 3, "padding": 1}, 9, 7),
    ({"kernel_size": 3, "stride": 2, "padding": 1}, 9, 7),
    ({"kernel_size": 5, "padding": 2}, 9, 11),
    ({"kernel_size": 5, "stride": 2, "padding": 1}, 11, 9),
    ({"kernel_size": 3, "dilation": 2, "padding": 2}, 9, 7),
    ({"kernel_size": 5, "dilation": 2, "stride": 2, "padding": 3}, 13, 11),
    ({"kernel_size": 3, "padding": 0}, 7, 9),
    ({"kernel_size": 3, "padding": (2, 0), "stride": (1, 2)}, 7, 9),
    ({"kernel_size": (2, 4), "padding": "same"}, 7, 8),
    ({"kernel_size": (1, 3), "padding": (0, 1)}, 5, 7),
    ({"kernel_size": 3, "padding": 1, "groups": 2}, 7, 7),
    ({"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}, 7, 9),
    ({"kernel_size": 3, "padding": 2, "padding_mode": "replicate", "stride": 2}, 9, 7),
    ({"kernel_size": 3, "padding": 1, "padding_mode": "circular", "dilation": 2}, 7, 9),
]
IDS = [f"{kw}-{h}x{w}" for kw, h, w in GEOMETRIES]


def _conv(kwargs: dict, c_in: int = 4, c_out: int = 6) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, **kwargs, **F64)


def _padded_mean(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference padding of x (B, C, H, W) as nn.Conv2d pads it, and the channel mean of the padded input."""
    spec = ConvSpec.from_conv(conv)
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    padded = F.pad(x, spec.explicit_padding, mode=mode)
    return padded, padded.mean(1)


def reference(conv: nn.Conv2d, x: torch.Tensor, gamma: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct per-window CAC: Sobel at the centre tap of each window, k×k or Σw·centre per window.

    Returns (output (B, C_out, H', W'), gradient magnitude G (B, H', W')).
    """
    spec = ConvSpec.from_conv(conv)
    padded, mean = _padded_mean(conv, x)
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel_size, spec.stride, spec.dilation
    out_h, out_w = spec.output_size(x.shape[2], x.shape[3])
    ch, cw = (kh - 1) // 2, (kw - 1) // 2
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], **F64)
    batch, g = x.shape[0], spec.groups
    weight, bias = conv.weight.detach(), conv.bias.detach()
    c_in_g, c_out_g = spec.in_channels // g, spec.out_channels // g
    out = torch.zeros(batch, spec.out_channels, out_h, out_w, **F64)
    grad = torch.zeros(batch, out_h, out_w, **F64)
    for i in range(out_h):
        for j in range(out_w):
            top, left = i * sh, j * sw
            rows = [min(max(top + dh * (ch + t), 0), padded.shape[2] - 1) for t in (-1, 0, 1)]
            cols = [min(max(left + dw * (cw + t), 0), padded.shape[3] - 1) for t in (-1, 0, 1)]
            patch = mean[:, rows][:, :, cols]  # (B, 3, 3), replicate beyond the padded map
            gx = (patch * sobel_x).sum((1, 2))
            gy = (patch * sobel_x.T).sum((1, 2))
            grad[:, i, j] = torch.sqrt(gx**2 + gy**2)
            window = padded[:, :, top : top + dh * (kh - 1) + 1 : dh, left : left + dw * (kw - 1) + 1 : dw]
            centre = padded[:, :, top + dh * ch, left + dw * cw]  # (B, C_in)
            sharp = gamma * grad[:, i, j] + beta > 0  # (B,)
            for o in range(spec.out_channels):
                group = o // c_out_g
                part = slice(group * c_in_g, (group + 1) * c_in_g)
                full = (window[:, part] * weight[o]).sum((1, 2, 3))
                one = centre[:, part] @ weight[o].sum((1, 2))
                out[:, o, i, j] = torch.where(sharp, full, one) + bias[o]
    return out, grad


def _threshold_between(values: torch.Tensor, quantile: float) -> float:
    """A threshold strictly between two distinct sorted values near ``quantile`` (never on a value)."""
    distinct = values.flatten().unique().sort().values
    k = min(max(int(quantile * len(distinct)), 1), len(distinct) - 1)
    return float((distinct[k - 1] + distinct[k]) / 2)


def _cac(conv: nn.Conv2d, gamma: float, beta: float) -> CAConv2d:
    cac = CAConv2d.from_conv(conv)
    with torch.no_grad():
        cac.gamma.fill_(gamma)
        cac.beta.fill_(beta)
    return cac


@pytest.mark.parametrize(("kwargs", "h", "w"), GEOMETRIES, ids=IDS)
def test_rho_one_equals_the_conv(kwargs: dict, h: int, w: int) -> None:
    conv = _conv(kwargs)
    cac = CAConv2d.from_conv(conv)
    x = torch.randn(2, 4, h, w, **F64)
    out = cac(x)
    assert bool(cac.last_mask.all())
    assert_close(out, conv(x), **TIGHT)
    assert_close(cac.last_rho(), torch.ones(2, **F64))


@pytest.mark.parametrize(("kwargs", "h", "w"), GEOMETRIES, ids=IDS)
def test_an_always_sharp_layer_deploys_to_the_plain_conv(kwargs: dict, h: int, w: int) -> None:
    cac = CAConv2d.from_conv(_conv(kwargs)).eval()
    with torch.no_grad():  # a trained-looking always-sharp layer: γ > 0, β > 0, weights moved
        cac.gamma.fill_(0.7)
        cac.beta.fill_(0.01)
        cac.weight.mul_(1.5)
    x = torch.randn(2, 4, h, w, **F64)
    fused = cac.fuse()
    assert cac.always_sharp() and isinstance(fused, CACSharpConv2d) and not fused.training
    assert fused.padding_mode == cac.padding_mode and fused.stride == cac.stride and fused.groups == cac.groups
    with torch.no_grad():
        assert_close(fused(x), cac(x), **TIGHT)
    assert bool(cac.last_mask.all())


@pytest.mark.parametrize(
    ("gamma", "beta", "always"),
    [(0.0, 1.0, True), (2.0, 1e-6, True), (1.0, 0.0, False), (-1e-3, 5.0, False), (0.0, -1.0, False)],
)
def test_always_sharp_needs_nonnegative_gamma_and_positive_beta(gamma: float, beta: float, always: bool) -> None:
    from convzoo.ops.cac_sparse import CACSparseConv2d

    cac = CAConv2d(4, 4, 3)  # no zero padding: a constant input then has G = 0 in every window
    with torch.no_grad():
        cac.gamma.fill_(gamma)
        cac.beta.fill_(beta)
    assert cac.always_sharp() is always
    assert isinstance(cac.fuse(), CACSharpConv2d if always else CACSparseConv2d)
    assert isinstance(cac.fuse(fold_always_sharp=False), CACSparseConv2d)
    if not always and beta <= 0:  # a constant input (G = 0 everywhere) makes every window smooth
        cac(torch.ones(1, 4, 6, 6))
        assert not bool(cac.last_mask.any())
    with pytest.raises(TypeError, match="fold_always_sharp must be a bool, got 'yes'"):
        cac.fuse(fold_always_sharp="yes")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_score_map_does_not_overflow(dtype: torch.dtype) -> None:
    """A float16 channel sum (64 channels of ~1100) or Sobel response (a step of 30000) overflows; G must not."""
    cac = CAConv2d(64, 8, 3, padding=1, dtype=dtype).eval()  # γ = 0, β = 1: sharp for every finite input
    flat = torch.full((1, 64, 6, 6), 1100.0, dtype=dtype)
    step = torch.zeros(1, 64, 6, 6, dtype=dtype)
    step[..., 3:] = 30000.0
    for x in (flat, step):
        grad = gradient_map(cac.spec, x, (6, 6))
        assert grad.dtype == torch.float32 and bool(torch.isfinite(grad).all())
        with torch.no_grad():
            out = cac(x)
            assert bool(cac.last_mask.all())
            assert_close(cac.fuse()(x).float(), out.float(), rtol=0, atol=0)


def test_a_layer_on_the_meta_device_deploys_to_the_sparse_form() -> None:
    from convzoo.ops.cac_sparse import CACSparseConv2d

    cac = CAConv2d(4, 4, 3, padding=1, device="meta")
    assert not cac.always_sharp() and isinstance(cac.fuse(), CACSparseConv2d)


@pytest.mark.parametrize(("kwargs", "h", "w"), GEOMETRIES, ids=IDS)
def test_matches_per_window_reference(kwargs: dict, h: int, w: int) -> None:
    conv = _conv(kwargs)
    x = torch.randn(2, 4, h, w, **F64)
    _, grad = reference(conv, x, 0.0, 1.0)
    threshold = _threshold_between(grad, 0.5)  # about half the windows sharp
    expected, _ = reference(conv, x, 1.0, -threshold)
    cac = _cac(conv, 1.0, -threshold)
    out = cac(x)
    assert_close(gradient_map(cac.spec, x, out.shape[-2:]), grad, **TIGHT)
    assert 0 < cac.last_mask.double().mean() < 1
    assert_close(out, expected, **TIGHT)


@pytest.mark.parametrize(("kwargs", "h", "w"), GEOMETRIES, ids=IDS)
def test_rho_zero_is_summed_kernel_at_window_centres(kwargs: dict, h: int, w: int) -> None:
    conv = _conv(kwargs)
    x = torch.randn(2, 4, h, w, **F64)
    cac = _cac(conv, 0.0, -1.0)
    out = cac(x)
    assert not bool(cac.last_mask.any())
    spec = ConvSpec.from_conv(conv)
    padded, _ = _padded_mean(conv, x)
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel_size, spec.stride, spec.dilation
    centres = padded[:, :, dh * ((kh - 1) // 2) :: sh, dw * ((kw - 1) // 2) :: sw][..., : out.shape[2], : out.shape[3]]
    summed = conv.weight.sum((2, 3), keepdim=True)
    assert_close(out, F.conv2d(centres, summed, conv.bias, groups=spec.groups), **TIGHT)


def test_smooth_window_reads_its_centre_pixel_not_a_corner() -> None:
    """With 'same' padding the 1x1 path is the summed kernel at the same pixel, borders included."""
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False, **F64)
    x = torch.randn(1, 3, 6, 6, **F64)
    out = _cac(conv, 0.0, -1.0)(x)
    assert_close(out, F.conv2d(x, conv.weight.sum((2, 3), keepdim=True)), **TIGHT)


def test_training_forward_value_is_the_hard_mask_exactly() -> None:
    conv = _conv({"kernel_size": 3, "padding": 1})
    x = torch.randn(2, 4, 7, 7, **F64)
    _, grad = reference(conv, x, 0.0, 1.0)
    cac = _cac(conv, 1.0, -_threshold_between(grad, 0.4))
    cac.train()
    out = cac(x)
    with torch.no_grad():
        expected = cac(x)
    assert out.requires_grad
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_pick_equals_where(dtype: torch.dtype, channels_last: bool) -> None:
    from convzoo.ops.cac import _PickStraightThrough

    sharp, smooth = torch.randn(2, 5, 4, 3, dtype=dtype), torch.randn(2, 5, 4, 3, dtype=dtype)
    if channels_last:
        sharp, smooth = (t.contiguous(memory_format=torch.channels_last) for t in (sharp, smooth))
    mask = torch.rand(2, 1, 4, 3) < 0.5
    soft = torch.rand(2, 1, 4, 3, requires_grad=True)
    fused = _PickStraightThrough.apply(mask, sharp, smooth, soft)
    assert torch.equal(fused.detach(), torch.where(mask, sharp, smooth))


def test_pick_straight_through_matches_the_additive_estimator() -> None:
    """The fused op's gradients equal those of where(...) + (M - M.detach()) * (sharp - smooth).detach()."""
    from convzoo.ops.cac import _PickStraightThrough

    generator = torch.Generator().manual_seed(0)
    sharp, smooth = (torch.randn(2, 3, 4, 5, generator=generator, **F64) for _ in range(2))
    soft = torch.rand(2, 1, 4, 5, generator=generator, **F64)
    mask = soft > 0.5
    upstream = torch.randn(2, 3, 4, 5, generator=generator, **F64)
    leaves = [t.clone().requires_grad_() for t in (sharp, smooth, soft)]
    fused = _PickStraightThrough.apply(mask, *leaves)
    torch.autograd.backward(fused, upstream)
    reference = [t.clone().requires_grad_() for t in (sharp, smooth, soft)]
    a, b, m = reference
    additive = torch.where(mask, a, b) + (m - m.detach()) * (a - b).detach()
    torch.autograd.backward(additive, upstream)
    assert torch.equal(fused.detach(), additive.detach())
    for mine, theirs in zip(leaves, reference):
        assert_close(mine.grad, theirs.grad, **TIGHT)
    # the true derivative w.r.t. the branches (the soft score's is straight-through by design, not checkable)
    torch.autograd.gradcheck(lambda a, b: _PickStraightThrough.apply(mask, a, b, soft), reference[:2])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # raised inside torch.func
def test_straight_through_under_torch_func_and_forward_mode() -> None:
    """torch.func.grad and forward-mode AD see the same straight-through derivative as backward."""
    from torch.func import functional_call, grad

    from convzoo.ops.cac import _PickStraightThrough

    conv = _conv({"kernel_size": 3, "padding": 1})
    x = torch.randn(2, 4, 6, 6, **F64)
    _, g = reference(conv, x, 0.0, 1.0)
    cac = _cac(conv, 0.7, -0.7 * _threshold_between(g, 0.5))
    params = {name: p.detach() for name, p in cac.named_parameters()}
    functional = grad(lambda p: functional_call(cac, (p,), (x,)).square().sum())(params)
    cac.zero_grad()
    cac(x).square().sum().backward()
    for name, p in cac.named_parameters():
        assert_close(functional[name], p.grad, **TIGHT)
    # forward mode: the tangent of the fused op equals that of the additive estimator
    generator = torch.Generator().manual_seed(0)
    sharp, smooth, s_t, m_t = (torch.randn(2, 3, 4, 5, generator=generator, **F64) for _ in range(4))
    soft, soft_t = torch.rand(2, 1, 4, 5, **F64), torch.randn(2, 1, 4, 5, **F64)
    mask = soft > 0.5
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        a, b, m = fwad.make_dual(sharp, s_t), fwad.make_dual(smooth, m_t), fwad.make_dual(soft, soft_t)
        fused = fwad.unpack_dual(_PickStraightThrough.apply(mask, a, b, m)).tangent
        additive = torch.where(mask, a, b) + (m - m.detach()) * (a - b).detach()
        assert_close(fused, fwad.unpack_dual(additive).tangent, **TIGHT)


def test_straight_through_gradients_reach_gamma_and_beta() -> None:
    conv = _conv({"kernel_size": 3, "padding": 1, "stride": 2})
    x = torch.randn(2, 4, 9, 9, **F64)
    _, grad = reference(conv, x, 0.0, 1.0)
    gamma, beta = 0.7, -0.7 * _threshold_between(grad, 0.5)
    cac = _cac(conv, gamma, beta)
    upstream = torch.randn(2, 6, 5, 5, **F64)
    (cac(x) * upstream).sum().backward()
    # STE: dL/dM = sum_c upstream * (y_kxk - y_1x1); dM/dγ = M(1-M)G, dM/dβ = M(1-M).
    sharp_out, _ = reference(conv, x, 0.0, 1.0)
    smooth_out, _ = reference(conv, x, 0.0, -1.0)
    d_m = (upstream * (sharp_out - smooth_out)).sum(1)
    m = torch.sigmoid(gamma * grad + beta)
    assert cac.gamma.grad.abs() > 0 and cac.beta.grad.abs() > 0
    assert_close(cac.beta.grad, (d_m * m * (1 - m)).sum(), **TIGHT)
    assert_close(cac.gamma.grad, (d_m * m * (1 - m) * grad).sum(), **TIGHT)


def test_weight_gradient_follows_the_hard_mask() -> None:
    conv = _conv({"kernel_size": 3, "padding": 1})
    x = torch.randn(2, 4, 6, 6, **F64)
    _, grad = reference(conv, x, 0.0, 1.0)
    beta = -_threshold_between(grad, 0.5)
    cac = _cac(conv, 1.0, beta)
    cac(x).sum().backward()
    weight = conv.weight.detach().clone().requires_grad_(True)
    copy = _conv({"kernel_size": 3, "padding": 1})
    with torch.no_grad():
        copy.weight.copy_(weight)
        copy.bias.copy_(conv.bias)
    ref = _cac(copy, 1.0, beta)
    ref.gamma.requires_grad_(False)
    ref.beta.requires_grad_(False)
    ref(x).sum().backward()
    assert_close(cac.weight.grad, ref.weight.grad, **TIGHT)


@pytest.mark.parametrize(("kwargs", "h", "w"), [GEOMETRIES[i] for i in (0, 3, 5, 10, 12)], ids=str)
def test_weight_and_bias_gradients_equal_an_independent_form(kwargs: dict, h: int, w: int) -> None:
    """W and bias gradients against autograd through where(mask, k×k conv, Σw · centre pixel), written here.

    Both branches must pass gradients: the sharp windows' to W through the k×k conv, the smooth ones'
    to W through Σw, and both to the bias.
    """
    conv = _conv(kwargs)
    x = torch.randn(2, 4, h, w, **F64)
    _, grad = reference(conv, x, 0.0, 1.0)
    cac = _cac(conv, 1.0, -_threshold_between(grad, 0.5))
    grad_out = torch.randn_like(conv(x))
    (cac(x) * grad_out).sum().backward()
    mask = cac.sharp_mask(x)
    assert 0 < mask.float().mean() < 1

    spec = ConvSpec.from_conv(conv)
    weight = conv.weight.detach().clone().requires_grad_(True)
    bias = conv.bias.detach().clone().requires_grad_(True)
    padded, _ = _padded_mean(conv, x)
    sharp = F.conv2d(padded, weight, bias, spec.stride, 0, spec.dilation, spec.groups)
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel_size, spec.stride, spec.dilation
    out_h, out_w = sharp.shape[-2:]
    top, left = dh * ((kh - 1) // 2), dw * ((kw - 1) // 2)
    centres = padded[:, :, top : top + sh * (out_h - 1) + 1 : sh, left : left + sw * (out_w - 1) + 1 : sw]
    smooth = F.conv2d(centres, weight.sum((2, 3), keepdim=True), bias, groups=spec.groups)
    (torch.where(mask.unsqueeze(1), sharp, smooth) * grad_out).sum().backward()
    assert_close(cac.weight.grad, weight.grad, **TIGHT)
    assert_close(cac.bias.grad, bias.grad, **TIGHT)


def test_convzoo_macs_counts_effective_macs() -> None:
    conv = _conv({"kernel_size": 3, "padding": 1, "groups": 2})
    cac = _cac(conv, 0.0, -1.0)
    x = torch.randn(3, 4, 5, 5, **F64)
    out = cac(x)
    # all smooth: 25 positions x (6 * 2 * 1 + 13) per image
    assert cac.convzoo_macs(x, out) == 3 * 25 * (6 * 2 + 13)
    cac.beta.data.fill_(1.0)
    out = cac(x)
    assert cac.convzoo_macs(x, out) == 3 * 25 * (6 * 2 * 9 + 13)


def test_from_conv_copies_weights_device_dtype_and_attributes() -> None:
    conv = nn.Conv2d(4, 8, 3, 2, 1, 1, 2, False, "reflect", **F64)
    cac = CAConv2d.from_conv(conv)
    assert torch.equal(cac.weight, conv.weight) and cac.bias is None
    assert cac.weight.dtype == torch.float64
    assert (cac.in_channels, cac.out_channels, cac.kernel_size, cac.stride) == (4, 8, (3, 3), (2, 2))
    assert (cac.padding, cac.dilation, cac.groups, cac.padding_mode) == ((1, 1), (1, 1), 2, "reflect")
    assert "reflect" in repr(cac)


def test_positional_arguments_follow_nn_conv2d() -> None:
    cac = CAConv2d(4, 8, 3, 2, 1, 2, 4, False, "circular")
    assert (cac.stride, cac.padding, cac.dilation, cac.groups, cac.bias) == ((2, 2), (1, 1), (2, 2), 4, None)
    assert cac.padding_mode == "circular"


def test_create_model_replaces_every_spatial_conv_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    base = convzoo.create_model("cifar_resnet20").double().eval()
    randomize_batchnorm_(base)
    model = convzoo.convert(base, "cac").eval()
    spatial = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    pointwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [n for n, _ in cac_layers(model)] == spatial
    assert "conv1" in spatial and "layer2.0.conv1" in spatial  # the stem and the stride-2 convs too
    assert pointwise and all(model.get_submodule(n).kernel_size == (1, 1) for n in pointwise)
    assert has_cac_layers(model) and not has_cac_layers(base)
    x = torch.randn(2, 3, 16, 16, **F64)
    assert_close(model(x), base(x), **TIGHT)
    zoo = convzoo.create_model("cifar_resnet20", conv="cac")
    assert len(cac_layers(zoo)) == len(spatial)


def test_kind_is_registered() -> None:
    assert "cac" in convzoo.list_convs()
    assert convzoo.get_conv_kind("cac").module_cls is CAConv2d


# ---------------------------------------------------------------------------- errors
def test_pointwise_kernel_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"kernel_size must be larger than 1x1 for CAC, got 1"):
        CAConv2d(4, 4, 1)


def test_geometry_errors_come_from_conv_spec() -> None:
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        CAConv2d(4, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="groups=3 must divide"):
        CAConv2d(4, 4, 3, groups=3)


@pytest.mark.parametrize("name", ["gamma_init", "beta_init"])
@pytest.mark.parametrize("value", [math.nan, "1", True])
def test_init_values_must_be_finite_reals(name: str, value: object) -> None:
    with pytest.raises(TypeError, match=f"{name} must be a finite real number, got"):
        CAConv2d(4, 4, 3, **{name: value})


def test_sparse_threshold_is_checked() -> None:
    with pytest.raises(ValueError, match=r"sparse_threshold must be in \[0, 1\], got 1.5"):
        CAConv2d(4, 4, 3, sparse_threshold=1.5)
    with pytest.raises(TypeError, match="sparse_threshold must be a real number"):
        CAConv2d(4, 4, 3, sparse_threshold="half")


def test_input_is_checked_and_unbatched_input_is_a_batch_of_one() -> None:
    layer = _cac(_conv({"kernel_size": 3, "padding": 1}), 1.0, -0.5)
    with pytest.raises(ValueError, match=r"expects a 4-D input \(B, C, H, W\) or an unbatched 3-D input"):
        layer(torch.randn(5, 5, **F64))
    with pytest.raises(ValueError, match="CAConv2d has in_channels=4, got an input with 3 channels"):
        layer(torch.randn(2, 3, 5, 5, **F64))
    x = torch.randn(4, 7, 6, **F64)
    assert_close(layer(x), layer(x.unsqueeze(0)).squeeze(0), **TIGHT)


def test_last_rho_before_any_call_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="has not been run yet"):
        CAConv2d(4, 4, 3).last_rho()


def test_has_cac_layers_needs_a_module() -> None:
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        has_cac_layers(3)


def test_cost_api_is_reachable_from_the_cac_module() -> None:
    """The training engine looks up ``convzoo.ops.cac.CACLoss`` (the agreed interface)."""
    from convzoo.ops import cac, cac_cost

    assert cac.CACLoss is cac_cost.CACLoss and cac.cac_statistics is cac_cost.cac_statistics
    with pytest.raises(AttributeError, match="module 'convzoo.ops.cac' has no attribute 'nothing'"):
        _ = cac.nothing


def test_backward_is_finite_on_flat_inputs() -> None:
    """G = 0 on flat regions (e.g. the digits' background); the score map must not make gradients NaN."""
    layer = CAConv2d(3, 4, 3, padding=1, dtype=torch.float64)
    x = torch.zeros(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        x[:, :, 2:5, 2:5] = 1.0  # flat background with one square
    layer(x).square().sum().backward()
    for name, grad in [("x", x.grad), ("gamma", layer.gamma.grad), ("beta", layer.beta.grad), ("w", layer.weight.grad)]:
        assert torch.isfinite(grad).all(), name


def test_training_output_keeps_the_autocast_dtype() -> None:
    """The straight-through term (float32 score map) used to promote the bfloat16 output to float32 in
    training, unlike eval; it is 0 in value and still carries the gradient to gamma and beta."""
    layer = CAConv2d(4, 6, 3, padding=1, gamma_init=1.0, beta_init=-0.5)
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected = layer.eval()(x)
    assert y.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(y, expected)
    y.float().square().sum().backward()
    assert layer.gamma.grad is not None and layer.beta.grad is not None and float(layer.beta.grad) != 0
