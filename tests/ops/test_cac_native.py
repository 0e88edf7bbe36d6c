"""CACSparseConv2d's native sparse path (convzoo's C++ kernel) against the dense masked form."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from convzoo.native import native_disabled, native_ops
from convzoo.ops.cac import CAConv2d
from convzoo.ops.cac_sparse import CACSparseConv2d

pytestmark = pytest.mark.skipif(
    native_disabled() or (shutil.which("c++") is None and shutil.which("g++") is None),
    reason="native kernels switched off (CONVZOO_NATIVE=0) or no C++ compiler",
)
F32 = {"rtol": 2e-5, "atol": 2e-5}


def _sparse(c_in: int, c_out: int, bias: bool = True, **conv) -> CACSparseConv2d:
    layer = CAConv2d(c_in, c_out, bias=bias, **conv)
    return CACSparseConv2d.from_cac(layer, threshold=1.0)  # always the sparse path


def _reference(sparse: CACSparseConv2d, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The dense masked form in float64 from the float32 weights: k×k conv where sharp, centre times Σw elsewhere."""
    double = CACSparseConv2d(
        sparse.spec, sparse.weight.double(), None if sparse.bias is None else sparse.bias.double(),
        sparse.gamma.double(), sparse.beta.double(),
    )  # fmt: skip
    out_size = tuple(mask.shape[1:])
    return double._masked(x.double(), mask, out_size)


GEOMETRIES = [
    # (C_in, C_out, conv kwargs, input H x W)
    (64, 64, {"kernel_size": 3, "padding": 1}, (16, 16)),
    (5, 16, {"kernel_size": 3, "stride": 2, "padding": 1}, (9, 11)),
    (16, 32, {"kernel_size": 5, "dilation": 2, "padding": 3}, (13, 10)),
    (8, 16, {"kernel_size": (3, 5), "stride": (2, 1), "dilation": (1, 2), "padding": (0, 2)}, (7, 12)),
    (16, 80, {"kernel_size": 3, "padding": 0}, (6, 7)),  # 80 outputs: four vectors, then one
    (3, 48, {"kernel_size": 4, "stride": 2, "padding": 1}, (9, 9)),  # even kernel: centre (k-1)//2
    (32, 16, {"kernel_size": 3, "padding": "same", "dilation": 3}, (5, 4)),
    (16, 16, {"kernel_size": 7, "stride": 3, "padding": 1}, (6, 8)),  # windows reaching into the padding
    (8, 16, {"kernel_size": (2, 4), "padding": "same", "dilation": (2, 1)}, (7, 9)),  # asymmetric padding
    (1, 16, {"kernel_size": 3, "padding": 1}, (1, 7)),  # one channel (both layouts at once), a 1 x N map
    (32, 32, {"kernel_size": 3, "padding": 1}, (5, 37)),  # NCHW rows moved in 16 x 16 tiles, then a tail
    (20, 16, {"kernel_size": 3, "stride": 2, "padding": 1}, (4, 35)),  # 16 channels tiled, 4 one by one
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("sharp", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(("c_in", "c_out", "conv", "size"), GEOMETRIES)
def test_native_equals_the_dense_masked_form(layout, sharp, c_in, c_out, conv, size) -> None:
    sparse = _sparse(c_in, c_out, bias=sharp != 0.3, **conv)
    x = torch.randn(3, c_in, *size)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out_size = sparse.spec.output_size(*size)
    mask = torch.rand(3, *out_size) < sharp
    with torch.no_grad():
        y = sparse._pixel_sparse(x, mask, out_size)
    assert sparse.last_native
    torch.testing.assert_close(y.double(), _reference(sparse, x, mask), **F32)
    expected = torch.channels_last if layout == "channels_last" and not x.is_contiguous() else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected)  # the input's layout


def test_the_module_runs_native_and_records_its_statistics() -> None:
    layer = CAConv2d(16, 32, 3, padding=1)
    with torch.no_grad():
        layer.gamma.fill_(1.0)
        layer.beta.fill_(-1.0)  # a data-dependent mask
    sparse = CACSparseConv2d.from_cac(layer, threshold=1.0)
    x = torch.randn(2, 16, 11, 9)
    with torch.no_grad():
        y = sparse(x)
    assert sparse.last_path == "sparse" and sparse.last_native
    mask = sparse.last_mask
    assert 0 < int(mask.sum()) < mask.numel()
    torch.testing.assert_close(y.double(), _reference(sparse, x, mask), **F32)
    torch.testing.assert_close(y, layer.eval()(x), **F32)  # and the training form


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_rows_across_threads(threads: int, layout: str) -> None:
    sparse = _sparse(16, 16, kernel_size=3, padding=1)
    x = torch.randn(1, 16, 13, 29)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    mask = torch.rand(1, 13, 29) < 0.5
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            y = sparse._pixel_sparse(x, mask, (13, 29))
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(y.double(), _reference(sparse, x, mask), **F32)


def test_an_empty_batch_gives_an_empty_output() -> None:
    sparse = _sparse(16, 16, kernel_size=3, padding=1)
    with torch.no_grad():
        y = sparse._pixel_sparse(torch.randn(0, 16, 5, 5), torch.zeros(0, 5, 5, dtype=torch.bool), (5, 5))
    assert y.shape == (0, 16, 5, 5)


@pytest.mark.parametrize(
    ("why", "sparse", "x"),
    [
        ("float64", _sparse(16, 16, kernel_size=3, padding=1).double(), torch.randn(2, 16, 6, 6).double()),
        ("8 outputs", _sparse(16, 8, kernel_size=3, padding=1), torch.randn(2, 16, 6, 6)),
        ("groups", _sparse(16, 16, kernel_size=3, padding=1, groups=4), torch.randn(2, 16, 6, 6)),
        ("reflect", _sparse(16, 16, kernel_size=3, padding=1, padding_mode="reflect"), torch.randn(2, 16, 6, 6)),
    ],
)
def test_the_torch_pixel_path_runs_where_native_does_not_apply(why, sparse, x) -> None:
    mask = torch.rand(2, 6, 6) < 0.4
    with torch.no_grad():
        y = sparse._pixel_sparse(x, mask, (6, 6))
    assert sparse.last_native is False, why
    torch.testing.assert_close(y, sparse._masked(x, mask, (6, 6)), rtol=1e-5, atol=1e-5)


def test_native_is_skipped_when_autograd_records_or_under_a_dispatch_mode() -> None:
    sparse = _sparse(16, 16, kernel_size=3, padding=1)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    mask = torch.rand(2, 6, 6) < 0.4
    sparse._pixel_sparse(x, mask, (6, 6)).sum().backward()
    assert sparse.last_native is False and x.grad is not None
    with torch.no_grad(), FlopCounterMode(display=False):
        sparse._pixel_sparse(x.detach(), mask, (6, 6))
    assert sparse.last_native is False


def test_native_weights_follow_in_place_updates() -> None:
    sparse = _sparse(16, 16, kernel_size=3, padding=1)
    x = torch.randn(2, 16, 7, 7)
    mask = torch.rand(2, 7, 7) < 0.5
    with torch.no_grad():
        sparse._pixel_sparse(x, mask, (7, 7))
        sparse.weight.mul_(-3.0)
        y = sparse._pixel_sparse(x, mask, (7, 7))
    torch.testing.assert_close(y.double(), _reference(sparse, x, mask), **F32)


def test_native_operands_by_hand() -> None:
    sparse = _sparse(4, 16, kernel_size=(3, 5), padding=1)
    taps, summed = sparse.native_weights()
    assert taps.shape == (15, 4, 16) and summed.shape == (4, 16)
    # tap (i, j) = (1, 3) is row i * kw + j = 8; its (c, o) entry is W[o, c, i, j]
    torch.testing.assert_close(taps[8, 2], sparse.weight[:, 2, 1, 3], rtol=0, atol=0)
    torch.testing.assert_close(summed[2], sparse.weight[:, 2].sum((1, 2)))


def test_the_op_rejects_bad_operands_with_a_message() -> None:
    sparse = _sparse(16, 16, kernel_size=3, padding=1)
    taps, summed = sparse.native_weights()
    x = torch.randn(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    mask = torch.ones(1, 5, 5, dtype=torch.bool)
    geometry = [[3, 3], [1, 1], [1, 1], [1, 1]]
    with pytest.raises(RuntimeError, match="x must be a 4-D float32 CPU tensor"):
        native_ops().cac_sparse(x.double(), mask, taps, summed, None, *geometry)
    with pytest.raises(RuntimeError, match="mask must be a contiguous bool"):
        native_ops().cac_sparse(x, mask.float(), taps, summed, None, *geometry)
    with pytest.raises(RuntimeError, match=r"weight must be \(kh\*kw, C_in, C_out\)"):
        native_ops().cac_sparse(x, mask, taps[:4], summed, None, *geometry)


def test_a_deployed_cac_model_uses_native_and_matches_its_training_form() -> None:
    model = nn.Sequential(CAConv2d(16, 32, 3, padding=1), nn.ReLU(), CAConv2d(32, 32, 3, stride=2, padding=1))
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, CAConv2d):
                layer.gamma.fill_(2.0)
                layer.beta.fill_(-1.5)
    model.eval()
    deployed = nn.Sequential(*[m.fuse() if isinstance(m, CAConv2d) else m for m in model])
    for layer in deployed:
        if isinstance(layer, CACSparseConv2d):
            layer.threshold = 1.0
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), **F32)
    assert all(m.last_native for m in deployed if isinstance(m, CACSparseConv2d))


def test_autocast_and_forward_mode_derivatives_take_the_torch_path() -> None:
    sparse = _sparse(16, 16, kernel_size=3, padding=1)
    x = torch.randn(2, 16, 6, 6)
    mask = torch.rand(2, 6, 6) < 0.4
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sparse._pixel_sparse(x, mask, (6, 6))
    assert sparse.last_native is False
    tangent = torch.randn_like(x)
    _, derivative = torch.func.jvp(lambda t: sparse._pixel_sparse(t, mask, (6, 6)), (x,), (tangent,))
    assert sparse.last_native is False
    expected = sparse._masked(tangent, mask, (6, 6)) - sparse.bias[:, None, None]
    torch.testing.assert_close(derivative, expected, rtol=1e-5, atol=1e-5)


def test_a_replaced_weight_is_repacked_even_at_the_same_address() -> None:
    sparse = _sparse(16, 16, kernel_size=3, padding=1)
    x = torch.randn(2, 16, 7, 7)
    mask = torch.rand(2, 7, 7) < 0.5
    with torch.no_grad():
        for _ in range(3):
            sparse.weight = nn.Parameter(torch.randn_like(sparse.weight), requires_grad=False)
            y = sparse._pixel_sparse(x, mask, (7, 7))
            torch.testing.assert_close(y.double(), _reference(sparse, x, mask), **F32)


def test_an_empty_map_is_refused_by_the_op() -> None:
    sparse = _sparse(16, 16, kernel_size=3, padding=1)
    taps, summed = sparse.native_weights()
    x = torch.randn(1, 16, 0, 5)
    with pytest.raises(RuntimeError, match="non-empty map"):
        native_ops().cac_sparse(
            x, torch.ones(1, 1, 3, dtype=torch.bool), taps, summed, None, [3, 3], [1, 1], [1, 1], [1, 1]
        )
    assert not sparse._native_applies(x)


def test_non_contiguous_inputs() -> None:
    sparse = _sparse(16, 32, kernel_size=3, stride=2, padding=1)
    base = torch.randn(2, 16, 14, 30)
    for x in (base[:, :, 2:13, 1:28], base.permute(0, 1, 3, 2), base[..., ::2]):
        out_size = sparse.spec.output_size(*x.shape[2:])
        mask = torch.rand(2, *out_size) < 0.5
        with torch.no_grad():
            y = sparse._pixel_sparse(x, mask, out_size)
        assert sparse.last_native
        torch.testing.assert_close(y.double(), _reference(sparse, x, mask), **F32)


def test_a_deep_copy_repacks_its_own_weights() -> None:
    sparse = _sparse(16, 16, kernel_size=3, padding=1)
    x = torch.randn(2, 16, 7, 7)
    mask = torch.rand(2, 7, 7) < 0.5
    with torch.no_grad():
        sparse._pixel_sparse(x, mask, (7, 7))  # packed at the weights' version 0
        sparse.weight.mul_(-2.0)
        clone = copy.deepcopy(sparse)  # its weight is a new tensor whose version starts at 0 again
        torch.testing.assert_close(clone._pixel_sparse(x, mask, (7, 7)).double(), _reference(sparse, x, mask), **F32)
        torch.testing.assert_close(sparse._pixel_sparse(x, mask, (7, 7)).double(), _reference(sparse, x, mask), **F32)


def test_weights_that_require_grad_get_their_gradients_from_the_torch_path() -> None:
    sparse = _sparse(16, 16, kernel_size=3, padding=1).requires_grad_(True)
    x = torch.randn(2, 16, 6, 6)
    mask = torch.rand(2, 6, 6) < 0.4
    sparse._pixel_sparse(x, mask, (6, 6)).square().sum().backward()
    assert sparse.last_native is False
    reference = copy.deepcopy(sparse)
    reference.weight.grad = None
    reference._masked(x, mask, (6, 6)).square().sum().backward()
    torch.testing.assert_close(sparse.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)


def test_last_native_describes_the_last_call() -> None:
    layer = CAConv2d(16, 16, 3, padding=1)
    with torch.no_grad():
        layer.gamma.fill_(1.0)
        layer.beta.fill_(-1.0)
    sparse = CACSparseConv2d.from_cac(layer, threshold=0.5)
    with torch.no_grad():
        sparse(torch.randn(2, 16, 8, 8) * 0.01)  # a flat input: every window smooth, the sparse path
        assert sparse.last_path == "sparse" and sparse.last_native
        sparse(torch.randn(2, 16, 8, 8) * 100.0)  # a rough one: every window sharp, the dense conv
        assert sparse.last_path == "dense" and sparse.last_native is False
        y = sparse(torch.randn(0, 16, 8, 8))  # an empty batch, with a fixed threshold too
    assert y.shape == (0, 16, 8, 8) and sparse.last_native is False


GRADIENT_GEOMETRIES = [
    # (C_in, conv kwargs, input H x W)
    (64, {"kernel_size": 3, "padding": 1}, (16, 16)),
    (20, {"kernel_size": 3, "stride": 2, "padding": 1}, (9, 11)),  # 16 channels as a vector, then 4 more
    (5, {"kernel_size": 5, "dilation": 2, "padding": 3}, (13, 10)),
    (1, {"kernel_size": (3, 5), "stride": (2, 1), "dilation": (1, 2), "padding": (0, 2)}, (7, 12)),
    (16, {"kernel_size": 4, "stride": 2, "padding": 1}, (9, 9)),
    (32, {"kernel_size": (4, 6), "padding": "same", "dilation": (2, 1)}, (7, 9)),
    (16, {"kernel_size": 7, "stride": 3, "padding": 0}, (8, 11)),
]


def _torch_gradient_map(spec, x: torch.Tensor, out_size) -> torch.Tensor:
    """gradient_map's torch form, in float64 (the native kernel runs for float32 only)."""
    from convzoo.ops.cac import gradient_map

    return gradient_map(spec, x.double(), out_size)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(("c_in", "conv", "size"), GRADIENT_GEOMETRIES)
def test_the_native_gradient_map_equals_the_torch_form(layout, c_in, conv, size) -> None:
    from convzoo.ops.cac import _native_gradient_applies, gradient_map

    layer = CAConv2d(c_in, 16, **conv)
    x = torch.randn(3, c_in, *size)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out_size = layer.spec.output_size(*size)
    assert _native_gradient_applies(layer.spec, x)
    g = gradient_map(layer.spec, x, out_size)
    assert g.dtype == torch.float32 and g.shape == (3, *out_size)
    torch.testing.assert_close(g.double(), _torch_gradient_map(layer.spec, x, out_size), rtol=1e-5, atol=1e-5)


FUSED_GEOMETRIES = [
    # (C_in, conv kwargs, input H x W): 16 x 16 tiles of channels x pixels, then the tails of either
    (16, {"kernel_size": 3, "padding": 1}, (16, 16)),
    (48, {"kernel_size": 3, "padding": 1}, (5, 37)),  # two tiles and 5 pixels one by one in each row
    (20, {"kernel_size": 3, "stride": 2, "padding": 1}, (9, 11)),  # a tile of channels, then 4 one by one
    (5, {"kernel_size": 5, "dilation": 2, "padding": 3}, (13, 10)),  # no full tile
    (32, {"kernel_size": (4, 6), "padding": "same", "dilation": (2, 1)}, (7, 9)),
    (16, {"kernel_size": 7, "stride": 3, "padding": 0}, (8, 11)),
    (64, {"kernel_size": 3, "padding": 1}, (1, 1)),  # contiguous in both layouts
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nchw moved"])
@pytest.mark.parametrize(("c_in", "conv", "size"), FUSED_GEOMETRIES)
def test_the_fused_score_map_gives_g_the_mask_and_the_counts(layout, c_in, conv, size) -> None:
    from convzoo.ops.cac import _native_geometry, gradient_map, sharp_test

    layer = CAConv2d(c_in, 16, **conv)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, c_in, *size, generator=generator) * torch.logspace(-3, 3, 3).view(3, 1, 1, 1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out_size = layer.spec.output_size(*size)
    g = gradient_map(layer.spec, x, out_size)
    gamma, beta = torch.tensor(1.3), -torch.quantile(g.flatten(), 0.4) * 1.3  # about 60 % sharp
    move = layout == "nchw moved"
    scores = native_ops().cac_sharp_windows(x, *_native_geometry(layer.spec, out_size), gamma, beta, move)
    gradient, mask, counts, moved, total = scores
    assert torch.equal(gradient, g)  # cac_gradient's G, bit for bit
    assert mask.dtype == torch.bool and torch.equal(mask, sharp_test(g, gamma, beta))
    assert total == int(mask.sum()) and (0 < total < mask.numel() or g.unique().numel() == 1)  # 1×1 maps: G = 0
    assert counts.dtype == torch.int64 and torch.equal(counts, mask.flatten(1).sum(1))
    if move:
        assert torch.equal(moved, x) and moved.is_contiguous(memory_format=torch.channels_last)
    else:
        assert moved.numel() == 0


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_the_sharp_test_is_the_exact_sign_of_the_score(layout) -> None:
    """γ·G + β > 0 decided exactly: where γ·G rounds down in float32 and β = -(that rounded product), the exact
    score is a tiny positive number, so the window is sharp, in the native kernel and in the torch form alike
    (a float32 product then sum gives exactly 0 there, not sharp)."""
    from convzoo.ops import cac

    layer = CAConv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 9, 11, generator=torch.Generator().manual_seed(3))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = cac.gradient_map(layer.spec, x, (9, 11))
    gamma = torch.tensor(1.0 + 3 * 2.0**-23)
    product = g * gamma  # float32: one rounding
    rounded_down = (product.double() < g.double() * gamma.double()).flatten().nonzero().flatten()
    rounded_up = (product.double() > g.double() * gamma.double()).flatten().nonzero().flatten()
    assert rounded_down.numel() and rounded_up.numel()
    for index, sharp in ((int(rounded_down[0]), True), (int(rounded_up[0]), False)):
        beta = -product.flatten()[index]
        assert not bool((product.flatten()[index] + beta) > 0)  # the float32 product-then-sum says "not sharp"
        with torch.no_grad():
            layer.gamma.fill_(float(gamma))
            layer.beta.fill_(float(beta))
        native, counts = cac.sharp_windows(layer.spec, x, layer.gamma, layer.beta, (9, 11))
        assert bool(native.flatten()[index]) is sharp
        # the torch form's test on the same G (its own channel sum may round G differently on other CPUs)
        torch_form = cac.sharp_test(g, layer.gamma, layer.beta)
        assert torch.equal(native, torch_form) and torch.equal(counts, torch_form.flatten(1).sum(1))
        with torch.no_grad():  # the training form and the deployed layer take the same mask
            layer.eval()(x)
            deployed = CACSparseConv2d.from_cac(layer, threshold=1.0)
            deployed(x)
        assert torch.equal(layer.last_mask, native) and torch.equal(deployed.last_mask, native)


def test_forward_ad_sees_the_torch_score_map_and_keeps_the_layout() -> None:
    """Inside a forward-AD level the score map takes the torch form and an NCHW input is not moved (a detached
    dual tensor has no tangent, so the check is on the transform itself): the tangent flows as in the conv."""
    from torch.autograd import forward_ad

    from convzoo.ops import cac

    layer = CAConv2d(16, 16, 3, padding=1).eval()
    x, tangent = torch.randn(2, 16, 6, 7), torch.randn(2, 16, 6, 7)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, tangent)
        assert not cac._native_gradient_applies(layer.spec, dual)
        scores = cac.score_windows(layer.spec, dual, layer.gamma, layer.beta, (6, 7), to_channels_last=True)
        assert scores.x is dual and scores.total is None
        out = forward_ad.unpack_dual(CACSparseConv2d.from_cac(layer, threshold=1.0)(dual)).tangent
    assert out is not None and out.abs().sum() > 0


def test_the_fused_score_op_rejects_bad_operands() -> None:
    x = torch.randn(2, 16, 6, 6)
    geometry = [[3, 3], [1, 1], [1, 1], [1, 1], [6, 6]]
    one = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="gamma and beta must be one-element CPU tensors"):
        native_ops().cac_sharp_windows(x, *geometry, torch.ones(2), one, False)
    with pytest.raises(RuntimeError, match="needs a contiguous NCHW x"):
        native_ops().cac_sharp_windows(x[:, :, :, 1:], *geometry[:4], [6, 5], one, one, True)
    with pytest.raises(RuntimeError, match="4-D float32 CPU tensor"):
        native_ops().cac_sharp_windows(x.double(), *geometry, one, one, False)
    empty = native_ops().cac_sharp_windows(x[:0], *geometry, one, one, False)
    assert empty[1].shape == (0, 6, 6) and empty[2].shape == (0,) and empty[4] == 0


def test_a_deployed_layer_runs_an_nchw_input_channels_last_with_the_training_form_mask() -> None:
    from convzoo.ops.cac import gradient_map, score_windows

    layer = CAConv2d(32, 16, 3, padding=1).eval()
    x = torch.randn(2, 32, 9, 13)
    smallest = float(gradient_map(layer.spec, x, (9, 13)).min())
    for beta, threshold, path in [(-smallest / 2, 0.5, "dense"), (-0.7, 1.0, "sparse")]:  # all sharp; a mixed mask
        with torch.no_grad():
            layer.gamma.fill_(1.0)
            layer.beta.fill_(beta)
            expected = layer(x)
        sparse = CACSparseConv2d.from_cac(layer, threshold=threshold)
        with torch.no_grad():
            y = sparse(x)
        assert sparse.last_path == path and torch.equal(sparse.last_mask, layer.last_mask)
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        torch.testing.assert_close(y, expected, **F32)

    def moved(spec, x, size=(9, 13)) -> bool:
        return score_windows(spec, x, layer.gamma, layer.beta, size, to_channels_last=True).x is not x

    spec = layer.spec
    assert moved(spec, x)
    assert not moved(spec, x.contiguous(memory_format=torch.channels_last))
    assert not moved(spec, x[:, :, :, 1:], (9, 12))  # not contiguous
    assert not moved(CAConv2d(24, 16, 3, padding=1).spec, x[:, :24])  # 24 channels
    assert not moved(spec, x.double())
    assert not moved(spec, x.requires_grad_())  # the copy would carry no gradient
    y = sparse(x)  # so the input's gradient still flows through the dense and the sparse path alike
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("c_out", "groups", "algorithm", "threshold", "moved"),
    [
        (16, 1, "pixel", 0.0, True),  # dense with the 1×1 written over the smooth windows
        (16, 1, "pixel", "auto", True),  # the timing runs the paths on the moved input too
        (16, 1, "block", 1.0, True),
        (24, 1, "pixel", 1.0, True),  # C_out not a multiple of 16: the torch pixel path, on the moved input
        (32, 32, "pixel", 1.0, True),  # depthwise
        (32, 4, "pixel", 1.0, False),  # other groups stay NCHW (oneDNN is slower channels-last there)
    ],
)
def test_every_path_equals_the_training_form_on_a_moved_nchw_input(c_out, groups, algorithm, threshold, moved) -> None:
    from convzoo.ops.cac import score_windows

    layer = CAConv2d(32, c_out, 3, padding=1, groups=groups).eval()
    with torch.no_grad():
        layer.gamma.fill_(1.0)
        layer.beta.fill_(-0.7)
    sparse = CACSparseConv2d.from_cac(layer, threshold=threshold, algorithm=algorithm)
    x = torch.randn(2, 32, 9, 13)
    scores = score_windows(layer.spec, x, layer.gamma, layer.beta, (9, 13), to_channels_last=True)
    assert (scores.x is not x) == moved
    with torch.no_grad():
        expected, y = layer(x), sparse(x)
        assert torch.equal(sparse.last_mask, layer.last_mask) and 0 < int(sparse.last_mask.sum()) < 2 * 9 * 13
        unbatched = sparse(x[0])
    torch.testing.assert_close(y, expected, **F32)
    torch.testing.assert_close(unbatched, expected[0], **F32)
    assert unbatched.is_contiguous()  # as nn.Conv2d gives an unbatched output


def test_the_native_gradient_map_is_not_used_where_the_torch_form_differs() -> None:
    from convzoo.ops.cac import _native_gradient_applies

    x = torch.randn(2, 4, 8, 8)
    assert not _native_gradient_applies(CAConv2d(4, 4, (1, 3), padding=(0, 1)).spec, x)  # replicated margins
    assert not _native_gradient_applies(CAConv2d(4, 4, 3, padding=1, padding_mode="reflect").spec, x)
    assert _native_gradient_applies(CAConv2d(4, 4, 3, padding=0, padding_mode="reflect").spec, x)  # no padding
    assert not _native_gradient_applies(CAConv2d(4, 4, 3, padding=1).spec, x.double())
    with FlopCounterMode(display=False):
        assert not _native_gradient_applies(CAConv2d(4, 4, 3, padding=1).spec, x)


def test_training_and_deployed_masks_agree_exactly_with_the_native_score_map() -> None:
    layer = CAConv2d(16, 32, 3, padding=1).eval()
    with torch.no_grad():
        layer.gamma.fill_(1.0)
        layer.beta.fill_(-0.7)
    sparse = CACSparseConv2d.from_cac(layer, threshold=1.0)
    x = torch.randn(4, 16, 12, 12)
    with torch.no_grad():
        layer(x)
        sparse(x)
    assert 0 < int(layer.last_mask.sum()) < layer.last_mask.numel()
    assert torch.equal(layer.last_mask, sparse.last_mask)


def test_the_gradient_op_rejects_bad_operands() -> None:
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(RuntimeError, match="at least 3x3"):
        native_ops().cac_gradient(x, [1, 3], [1, 1], [1, 1], [0, 1], [5, 5])
    with pytest.raises(RuntimeError, match="4-D float32 CPU tensor"):
        native_ops().cac_gradient(x.double(), [3, 3], [1, 1], [1, 1], [1, 1], [5, 5])
    assert native_ops().cac_gradient(x[:0], [3, 3], [1, 1], [1, 1], [1, 1], [5, 5]).shape == (0, 5, 5)


def test_the_native_gradient_map_does_not_overflow_where_hypot_does_not() -> None:
    from convzoo.ops.cac import _native_gradient_applies, gradient_map

    layer = CAConv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 9, 9) * 1e37  # Sobel responses ~1e38: their squares overflow float32, not double
    assert _native_gradient_applies(layer.spec, x)
    g = gradient_map(layer.spec, x, (9, 9))
    reference = _torch_gradient_map(layer.spec, x, (9, 9))
    finite = reference < torch.finfo(torch.float32).max  # a few responses may exceed float32 itself
    assert finite.any()
    assert torch.isfinite(g[finite]).all()
    torch.testing.assert_close(g[finite].double(), reference[finite], rtol=1e-5, atol=0)


def test_the_native_gradient_map_handles_inf_and_nan_as_the_torch_form() -> None:
    from convzoo.ops import cac
    from convzoo.ops.cac import gradient_map

    layer = CAConv2d(1, 16, 3, padding=1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=generator)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 3e38, -3e38])
    where = torch.rand(x.shape, generator=generator) < 0.15
    x[where] = special[torch.randint(0, 5, (int(where.sum()),), generator=generator)]
    g = gradient_map(layer.spec, x, (8, 8))
    original = cac._native_gradient_applies
    cac._native_gradient_applies = lambda *args: False
    try:
        expected = gradient_map(layer.spec, x, (8, 8))  # the float32 torch form (hypot(inf, NaN) = inf)
    finally:
        cac._native_gradient_applies = original
    assert torch.isinf(expected).any() and torch.isnan(expected).any()
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=0, equal_nan=True)


def test_every_form_takes_the_same_mask_even_at_the_threshold() -> None:
    from convzoo.ops.cac import gradient_map, sharp_windows

    torch.manual_seed(0)
    layer = CAConv2d(16, 32, 3, padding=1)
    x = torch.randn(4, 16, 12, 12)
    g = gradient_map(layer.spec, x, (12, 12))
    with torch.no_grad():
        layer.gamma.fill_(1.0)
        layer.beta.fill_(-float(g.flatten()[100]))  # window 100 exactly on the threshold: γG + β = 0
    mask, counts = sharp_windows(layer.spec, x, layer.gamma, layer.beta, (12, 12))
    assert not mask.flatten()[100]  # sharp means > 0, not >= 0
    assert torch.equal(counts, mask.flatten(1).sum(1)) and counts.dtype == torch.int64
    assert torch.equal(sharp_windows(layer.spec, x, layer.gamma, layer.beta, (12, 12), g)[0], mask)
    layer.train()(x).sum().backward()  # the training form with the straight-through estimator
    trained = layer.last_mask
    assert layer.gamma.grad is not None
    sparse = CACSparseConv2d.from_cac(layer.eval(), threshold=1.0)
    with torch.no_grad():
        layer(x)
        sparse(x)
        logits = layer.score_logits(x)
    assert 0 < int(trained.sum()) < trained.numel()
    for other in (layer.last_mask, sparse.last_mask, layer.sharp_mask(x), logits > 0):
        assert torch.equal(trained, other)
    assert torch.equal(trained, mask)


@pytest.mark.parametrize(("gamma", "beta"), [(0.0, 0.5), (0.0, -0.5), (1.0, -0.5), (-1.0, 0.5)])
def test_the_native_mask_follows_the_torch_form_on_non_finite_scores(gamma, beta) -> None:
    from convzoo.ops import cac

    layer = CAConv2d(1, 16, 3, padding=1)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, generator=generator)
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    where = torch.rand(x.shape, generator=generator) < 0.2
    x[where] = special[torch.randint(0, 3, (int(where.sum()),), generator=generator)]
    with torch.no_grad():
        layer.gamma.fill_(gamma)
        layer.beta.fill_(beta)
    native, counts = cac.sharp_windows(layer.spec, x, layer.gamma, layer.beta, (8, 8))
    original = cac._native_gradient_applies
    cac._native_gradient_applies = lambda *args: False
    try:
        torch_form, torch_counts = cac.sharp_windows(layer.spec, x, layer.gamma, layer.beta, (8, 8))
        scores = cac.gradient_map(layer.spec, x, (8, 8))
    finally:
        cac._native_gradient_applies = original
    assert torch.isinf(scores).any() and torch.isnan(scores).any()  # γ·inf, 0·inf = NaN and NaN all occur
    assert torch.equal(native, torch_form) and torch.equal(counts, torch_counts)
