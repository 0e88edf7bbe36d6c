"""CACSparseConv2d: the sparse and dense inference paths equal the dense masked training form."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import convzoo
from convzoo.models.cifar_resnet import CifarResNet
from convzoo.ops.cac import CAConv2d, cac_layers, gradient_map
from convzoo.ops.cac_cost import calibrate_sharp_ratio_
from convzoo.ops.cac_sharp import CACSharpConv2d
from convzoo.ops.cac_sparse import CACSparseConv2d
from convzoo.ops.conv_spec import ConvSpec
from convzoo.testing import randomize_batchnorm_

F64 = {"dtype": torch.float64}
TIGHT = {"rtol": 1e-12, "atol": 1e-12}

GEOMETRIES = [
    ({"kernel_size": 3, "padding": 1}, 9, 7),
    ({"kernel_size": 3, "stride": 2, "padding": 1}, 9, 7),
    ({"kernel_size": 5, "stride": 2, "padding": 1, "dilation": 2}, 13, 11),
    ({"kernel_size": 3, "padding": (2, 0), "stride": (1, 2)}, 7, 9),
    ({"kernel_size": (2, 4), "padding": "same"}, 7, 8),
    ({"kernel_size": (1, 3), "padding": (0, 1)}, 5, 7),
    ({"kernel_size": 3, "padding": 1, "groups": 2}, 7, 7),
    ({"kernel_size": 3, "padding": 1, "groups": 4, "bias": False}, 7, 7),
    ({"kernel_size": 3, "padding": 2, "padding_mode": "reflect", "stride": 2}, 9, 7),
    ({"kernel_size": 3, "padding": 1, "padding_mode": "circular", "dilation": 2}, 7, 9),
]
IDS = [f"{kw}-{h}x{w}" for kw, h, w in GEOMETRIES]


def _half_sharp(kwargs: dict, x: torch.Tensor, quantile: float = 0.5) -> CAConv2d:
    cac = CAConv2d.from_conv(nn.Conv2d(4, 8, **kwargs, **F64))
    spec = cac.spec
    grad = gradient_map(spec, x, spec.output_size(x.shape[2], x.shape[3]))
    distinct = grad.flatten().unique().sort().values
    k = min(max(int(quantile * len(distinct)), 1), len(distinct) - 1)
    with torch.no_grad():
        cac.gamma.fill_(1.0)
        cac.beta.fill_(-float(distinct[k - 1] + distinct[k]) / 2)
    return cac.eval()


@pytest.mark.parametrize(("kwargs", "h", "w"), GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("quantile", [0.0, 0.4, 0.8, 1.0])  # 0.4: 60 % sharp, 0.8: 20 % (the picking dense path)
@pytest.mark.parametrize("algorithm", ["pixel", "block"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_sparse_and_dense_paths_equal_the_dense_masked_form(
    kwargs: dict, h: int, w: int, quantile: float, algorithm: str, layout: str
) -> None:
    x = torch.randn(2, 4, h, w, **F64)
    if layout == "channels_last":  # the 1x1 then reads x itself wherever the centres lie inside it
        x = x.contiguous(memory_format=torch.channels_last)
    cac = _half_sharp(kwargs, x, quantile)
    if quantile == 0.0:
        cac.beta.data.fill_(1.0)  # every window sharp
    if quantile == 1.0:
        cac.beta.data.fill_(-1e9)  # every window smooth
    with torch.no_grad():
        expected = cac(x)
    sparse = CACSparseConv2d.from_cac(cac, algorithm=algorithm)
    fused = cac.fuse()
    if quantile == 0.0:  # γ = 1, β = 1: every window of every input is sharp, so it deploys to the plain conv
        assert cac.always_sharp() and isinstance(fused, CACSharpConv2d)
        with torch.no_grad():
            assert_close(fused(x), expected, **TIGHT)
    else:
        assert isinstance(fused, CACSparseConv2d) and fused.algorithm == "pixel"
    for threshold, path in ((1.0, "sparse"), (0.0, "dense")):
        sparse.threshold = threshold
        with torch.no_grad():
            out = sparse(x)
        if not (path == "dense" and not bool(cac.last_mask.any())):  # all-smooth never exceeds 0 sharp
            assert sparse.last_path == path
        assert torch.equal(sparse.last_mask, cac.last_mask)
        assert out.shape == expected.shape
        assert_close(out, expected, **TIGHT)


@pytest.mark.parametrize("shape", [(2, 1, 7, 6), (3, 4, 1, 1), (2, 4, 2, 1)], ids=["one-channel", "1x1-map", "2x1-map"])
@pytest.mark.parametrize("algorithm", ["pixel", "block"])
def test_ambiguous_layouts_and_tiny_maps(shape: tuple[int, ...], algorithm: str) -> None:
    """Inputs that are NCHW- and channels-last-contiguous at once (one channel, 1x1 maps) take every path."""
    x = torch.randn(*shape, **F64)
    kwargs = {"kernel_size": 3, "padding": 1}
    cac = CAConv2d.from_conv(nn.Conv2d(shape[1], 4, **kwargs, **F64))
    with torch.no_grad():
        cac.gamma.fill_(1.0)
        cac.beta.fill_(-float(gradient_map(cac.spec, x, tuple(shape[2:])).median()))
    cac.eval()
    with torch.no_grad():
        expected = cac(x)
    sparse = CACSparseConv2d.from_cac(cac, algorithm=algorithm)
    for threshold in (1.0, 0.0):
        sparse.threshold = threshold
        assert_close(sparse(x), expected, **TIGHT)


def test_threshold_selects_the_path_by_fraction_of_active_blocks() -> None:
    x = torch.randn(2, 4, 8, 8, **F64)
    x[:, :, :4] = 0.0  # the top half is flat: its blocks hold no sharp window
    cac = _half_sharp({"kernel_size": 3, "padding": 1}, x, 0.0)
    cac.gamma.data.fill_(1.0)
    cac.beta.data.fill_(-1e-9)  # sharp iff G > 0
    sparse = CACSparseConv2d.from_cac(cac, threshold=0.7, tile=2, algorithm="block")
    sparse(x)
    # 2x2 blocks: only block row 0 (output rows 0-1, whose Sobel taps all read zeros) is inactive
    assert sparse.last_active == 0.75 and sparse.last_path == "dense"
    sparse.threshold = 0.75
    sparse(x)
    assert sparse.last_path == "sparse"


def test_pixel_threshold_selects_the_path_by_fraction_of_sharp_windows() -> None:
    x = torch.randn(2, 4, 8, 8, **F64)
    cac = _half_sharp({"kernel_size": 3, "padding": 1}, x, 0.5)
    sparse = CACSparseConv2d.from_cac(cac, threshold=1.0)
    sparse(x)
    rho = float(sparse.last_rho().mean())
    assert sparse.algorithm == "pixel" and sparse.last_active == pytest.approx(rho) and 0 < rho < 1
    sparse.threshold = rho - 1e-6
    sparse(x)
    assert sparse.last_path == "dense"
    sparse.threshold = rho
    sparse(x)
    assert sparse.last_path == "sparse"


def test_pixel_path_in_several_column_chunks_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    import convzoo.ops.cac_sparse as cac_sparse

    x = torch.randn(3, 4, 9, 10, **F64)
    cac = _half_sharp({"kernel_size": 3, "stride": 2, "padding": 1, "groups": 2}, x, 0.3)
    with torch.no_grad():
        expected = cac(x)
    sparse = CACSparseConv2d.from_cac(cac, threshold=1.0)
    # 3 windows' columns per chunk: many chunks, the last one partial
    monkeypatch.setattr(cac_sparse, "_COLUMN_CHUNK_BYTES", 3 * 9 * 4 * 8)
    assert_close(sparse(x), expected, **TIGHT)
    assert sparse.last_path == "sparse"


@pytest.mark.parametrize(
    ("size", "out", "kernel", "stride", "dilation", "pad"),
    [(6, 6, 3, 1, 1, 1), (7, 3, 2, 2, 1, 2), (4, 3, 5, 1, 2, 3), (5, 5, 1, 1, 1, 0)],
)
def test_axis_taps_against_a_loop_over_windows(size, out, kernel, stride, dilation, pad) -> None:
    from convzoo.ops.cac_sparse import axis_taps

    at, outside, reaches_out = axis_taps(size, out, kernel, stride, dilation, pad, torch.device("cpu"))
    assert at.shape == outside.shape == (out, kernel) and at.dtype == torch.int64
    for window in range(out):
        for tap in range(kernel):
            coordinate = window * stride - pad + tap * dilation
            inside = 0 <= coordinate < size
            assert bool(outside[window, tap]) is not inside
            # a tap in the padding reads a clamped (valid) pixel, zeroed after the gather
            assert int(at[window, tap]) == (coordinate if inside else min(max(coordinate, 0), size - 1))
        assert bool(reaches_out[window]) is bool(outside[window].any())
    assert axis_taps(size, out, kernel, stride, dilation, pad, torch.device("cpu"))[0] is at  # cached


@pytest.mark.parametrize("per_window_table", [True, False])
@pytest.mark.parametrize(
    ("image", "out", "kernel", "stride", "dilation", "top_left"),
    [((5, 6), (5, 6), (3, 3), (1, 1), (1, 1), (1, 1)), ((7, 4), (3, 3), (2, 5), (2, 1), (1, 2), (2, 3))],
)
def test_sharp_window_taps_against_a_loop_over_windows(
    image, out, kernel, stride, dilation, top_left, per_window_table, monkeypatch: pytest.MonkeyPatch
) -> None:
    import convzoo.ops.cac_sparse as cac_sparse

    if not per_window_table:  # the path of large maps: pixels from the per-axis tables, chunk by chunk
        monkeypatch.setattr(cac_sparse, "_TAP_TABLE_MAX_ENTRIES", 0)
    batch, (height, width), (out_h, out_w), (kh, kw) = 3, image, out, kernel
    positions = torch.randperm(batch * out_h * out_w, generator=torch.Generator().manual_seed(0))[:20]
    geometry = cac_sparse.WindowGeometry(image, out, kernel, stride, dilation, top_left)
    pixels, border, outside = cac_sparse.sharp_window_taps(positions, geometry)
    expected_outside = []
    for n, position in enumerate(positions.tolist()):
        b, rest = divmod(position, out_h * out_w)
        i, j = divmod(rest, out_w)
        taps_outside = []
        for tap in range(kh * kw):
            r = i * stride[0] - top_left[0] + (tap // kw) * dilation[0]
            c = j * stride[1] - top_left[1] + (tap % kw) * dilation[1]
            inside = 0 <= r < height and 0 <= c < width
            taps_outside.append(not inside)
            r, c = min(max(r, 0), height - 1), min(max(c, 0), width - 1)  # clamped: a valid row, zeroed later
            assert int(pixels[n, tap]) == (b * height + r) * width + c
        if any(taps_outside):
            expected_outside.append((n, taps_outside))
    assert border.tolist() == [n for n, _ in expected_outside]
    assert outside.tolist() == [taps for _, taps in expected_outside]


@pytest.mark.parametrize(("kwargs", "h", "w"), GEOMETRIES, ids=IDS)
def test_pixel_path_without_per_window_tables_is_unchanged(
    kwargs: dict, h: int, w: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import convzoo.ops.cac_sparse as cac_sparse

    x = torch.randn(2, 4, h, w, **F64)
    cac = _half_sharp(kwargs, x, 0.4)
    with torch.no_grad():
        expected = cac(x)
    monkeypatch.setattr(cac_sparse, "_TAP_TABLE_MAX_ENTRIES", 0)
    monkeypatch.setattr(cac_sparse, "_COLUMN_CHUNK_BYTES", 5 * 9 * 4 * 8)  # several chunks too
    sparse = CACSparseConv2d.from_cac(cac, threshold=1.0)
    assert_close(sparse(x), expected, **TIGHT)
    assert sparse.last_path == "sparse"


def test_default_thresholds_follow_the_algorithm() -> None:
    from convzoo.ops.cac_sparse import DEFAULT_BLOCK_THRESHOLD

    cac = CAConv2d(4, 4, 3, padding=1)
    assert CACSparseConv2d.from_cac(cac).threshold == "auto"
    assert CACSparseConv2d.from_cac(cac, algorithm="block").threshold == DEFAULT_BLOCK_THRESHOLD
    assert CAConv2d(4, 4, 3, sparse_threshold=0.2).fuse(fold_always_sharp=False).threshold == 0.2
    assert CAConv2d(4, 4, 3, sparse_threshold="auto").fuse(fold_always_sharp=False).threshold == "auto"
    with pytest.raises(ValueError, match=r"algorithm must be one of \('pixel', 'block'\), got 'tiles'"):
        CACSparseConv2d.from_cac(cac, algorithm="tiles")
    with pytest.raises(ValueError, match="threshold='auto' needs algorithm='pixel', got algorithm='block'"):
        CACSparseConv2d.from_cac(cac, threshold="auto", algorithm="block")
    with pytest.raises(TypeError, match="sparse_threshold must be a real number in \\[0, 1\\] or 'auto', got 'half'"):
        CAConv2d(4, 4, 3, sparse_threshold="half")


@pytest.mark.parametrize(
    ("pixel", "dense", "expected"),
    [
        ((1.0, 3.0), (2.0, 1.0), 0.2 + 1.0 / 3.0 * 0.4),  # lines cross between the two points
        ((4.0, 6.0), (2.0, 1.0), 0.0),  # slower at both, crossing below 0: clipped
        ((1.0, 1.5), (4.0, 3.9), 1.0),  # faster at both, crossing above 1: clipped
        ((1.0, 0.9), (2.0, 2.5), 1.0),  # never loses ground, faster at the high point
        ((3.0, 2.0), (2.0, 2.5), 1.0),  # gains ground, faster at the high point
        ((3.0, 2.9), (2.0, 2.0), 0.0),  # gains ground, still slower at the high point
    ],
)
def test_crossover_of_the_two_cost_lines(pixel, dense, expected) -> None:
    from convzoo.ops.cac_sparse import crossover

    assert crossover(pixel, dense, (0.2, 0.6)) == pytest.approx(expected)


def test_auto_threshold_is_measured_once_per_input_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    import convzoo.ops.cac_sparse as cac_sparse

    x = torch.randn(2, 4, 9, 8, **F64)
    cac = _half_sharp({"kernel_size": 3, "padding": 1}, x, 0.5)
    with torch.no_grad():
        expected = cac(x)
    sparse = CACSparseConv2d.from_cac(cac)
    calls = []
    # fake timings: pixel costs 1 + 10 ρ, dense 5 - 2 ρ -> they cross at ρ = 1/3
    monkeypatch.setattr(cac_sparse, "best_time", lambda run, device, repeats: calls.append(run) or _fake_cost(run))
    assert_close(sparse(x), expected, **TIGHT)
    assert sparse.last_threshold == pytest.approx(1 / 3) and len(calls) == 4
    sparse(x)
    sparse(x[:1])  # a new shape is tuned again
    assert len(calls) == 8 and len(sparse._tuned_thresholds) == 2
    assert sparse.last_path == ("sparse" if sparse.last_active <= 1 / 3 else "dense")


def test_auto_threshold_keeps_the_plain_conv_when_every_window_is_sharp(monkeypatch: pytest.MonkeyPatch) -> None:
    import convzoo.ops.cac_sparse as cac_sparse

    x = torch.randn(2, 4, 8, 8, **F64)
    cac = _half_sharp({"kernel_size": 3, "padding": 1}, x, 0.5)
    cac.beta.data.fill_(1.0)  # every window sharp
    sparse = CACSparseConv2d.from_cac(cac)
    # fake timings where the pixel path always wins: the measured threshold is 1
    monkeypatch.setattr(
        cac_sparse, "best_time", lambda run, device, repeats: 1.0 if run.func.__name__ == "_pixel_sparse" else 2.0
    )
    with torch.no_grad():
        assert_close(sparse(x), cac(x), **TIGHT)
    assert sparse.last_threshold == 1.0 and sparse.last_path == "dense"  # the plain conv, nothing gathered


def _fake_cost(run) -> float:
    mask = run.args[1]
    rho = float(mask.float().mean())
    return 1.0 + 10.0 * rho if run.func.__name__ == "_pixel_sparse" else 5.0 - 2.0 * rho


def test_auto_threshold_times_nothing_under_a_dispatch_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    import convzoo.ops.cac_sparse as cac_sparse

    x = torch.randn(2, 4, 8, 8, **F64)
    sparse = CACSparseConv2d.from_cac(_half_sharp({"kernel_size": 3, "padding": 1}, x, 0.5))
    monkeypatch.setattr(cac_sparse, "best_time", lambda *args, **kwargs: pytest.fail("timed under a dispatch mode"))
    with FlopCounterMode(display=False):
        sparse(x)
    assert sparse.last_threshold == cac_sparse.DEFAULT_SPARSE_THRESHOLD and not sparse._tuned_thresholds


@pytest.mark.parametrize("tile", [1, 3, 4, 16])
def test_every_tile_size_gives_the_same_output(tile: int) -> None:
    x = torch.randn(2, 4, 11, 10, **F64)
    cac = _half_sharp({"kernel_size": 3, "stride": 2, "padding": 2, "dilation": 2}, x, 0.6)
    with torch.no_grad():
        expected = cac(x)
    sparse = CACSparseConv2d.from_cac(cac, threshold=1.0, tile=tile, algorithm="block")
    assert_close(sparse(x), expected, **TIGHT)
    assert sparse.last_path == "sparse" and 0 < sparse.last_active <= 1


def test_sparse_form_of_a_float32_layer_is_close_and_channels_last() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1)
    cac = CAConv2d.from_conv(conv).eval()
    x = torch.randn(2, 8, 8, 8)
    cac.gamma.data.fill_(1.0)
    cac.beta.data.fill_(-float(gradient_map(cac.spec, x, (8, 8)).median()))
    sparse = CACSparseConv2d.from_cac(cac, threshold=1.0)
    out = sparse(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close(out, cac(x), rtol=1e-5, atol=1e-5)


def test_deploy_selects_the_sparse_form_and_keeps_outputs() -> None:
    model = convzoo.convert(CifarResNet(1).double(), "cac")  # 7 CAC layers
    randomize_batchnorm_(model)
    x = torch.randn(2, 3, 12, 12, **F64)
    achieved = calibrate_sharp_ratio_(model, x, [0.1, 0.3, 0.5, 0.8, 1.0, 0.0, 0.6])
    assert min(achieved.values()) == 0.0 and max(achieved.values()) == 1.0
    model.eval()
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fx tracing must not fail: the sparse form is a leaf
        deployed = convzoo.deploy(model)
    # the layer calibrated to ρ = 1 (γ = 1, β = 1) is sharp for every input: the plain conv, its BN folded
    sharp = deployed.layer2[0].conv2
    assert isinstance(sharp, CACSharpConv2d) and isinstance(deployed.layer2[0].bn2, nn.Identity)
    assert [m for _, m in cac_layers(deployed)].index(sharp) == 4  # still a CAC layer for the statistics
    layers = [(name, m) for name, m in cac_layers(deployed) if m is not sharp]
    assert len(layers) == 6 and all(isinstance(m, CACSparseConv2d) for _, m in layers)
    assert {m.threshold for _, m in layers} == {"auto"}
    for _, layer in layers:  # a fixed threshold, so that which path runs does not depend on timings
        layer.threshold = 0.45
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.get_submodule("layer2.0.downsample"))
    with torch.no_grad():
        out = deployed(x)
    assert_close(out, expected, **TIGHT)
    paths = {m.last_path for _, m in layers}
    assert paths == {"sparse", "dense"}


def test_sparse_form_records_statistics_like_the_training_form() -> None:
    x = torch.randn(3, 4, 8, 8, **F64)
    cac = _half_sharp({"kernel_size": 3, "padding": 1}, x)
    out = cac(x)
    macs = cac.convzoo_macs(x, out)
    sparse = cac.fuse()
    out = sparse(x)
    assert torch.equal(sparse.last_sharp_count, cac.last_sharp_count)
    assert sparse.convzoo_macs(x, out) == macs
    assert (sparse.in_channels, sparse.out_channels, sparse.kernel_size) == (4, 8, (3, 3))


def test_convert_skips_the_deployed_form() -> None:
    sparse = CAConv2d(4, 4, 3, padding=1).fuse(fold_always_sharp=False)
    model = nn.Sequential(sparse, nn.Conv2d(4, 4, 3))
    converted = convzoo.convert(model, "cac")
    assert converted[0].__class__ is CACSparseConv2d and isinstance(converted[1], CAConv2d)


# ---------------------------------------------------------------------------- errors
def test_from_cac_needs_a_cac_layer() -> None:
    with pytest.raises(TypeError, match="layer must be a CAConv2d, got Conv2d"):
        CACSparseConv2d.from_cac(nn.Conv2d(2, 2, 3))


def test_constructor_checks_spec_and_weight_shape() -> None:
    spec = ConvSpec.create(4, 8, 3)
    scalar = torch.zeros(())
    with pytest.raises(TypeError, match="spec must be a ConvSpec, got dict"):
        CACSparseConv2d({}, torch.zeros(8, 4, 3, 3), None, scalar, scalar)
    shapes = r"weight must have shape \(8, 4, 3, 3\) for 4->8 k3x3 s1 g1, got \(8, 4, 5, 5\)"
    with pytest.raises(ValueError, match=shapes):
        CACSparseConv2d(spec, torch.zeros(8, 4, 5, 5), None, scalar, scalar)
    with pytest.raises(ValueError, match=r"sparse_threshold must be in \[0, 1\], got -0.1"):
        CACSparseConv2d(spec, torch.zeros(8, 4, 3, 3), None, scalar, scalar, threshold=-0.1)
    with pytest.raises(ValueError, match="tile must be a positive int, got 0"):
        CACSparseConv2d(spec, torch.zeros(8, 4, 3, 3), None, scalar, scalar, tile=0)


def test_input_is_checked_and_unbatched_input_is_a_batch_of_one() -> None:
    layer = CAConv2d(4, 4, 3, padding=1).fuse(fold_always_sharp=False)
    with pytest.raises(ValueError, match="CACSparseConv2d expects a 4-D input"):
        layer(torch.randn(5, 5))
    with pytest.raises(ValueError, match="CACSparseConv2d has in_channels=4, got an input with 8 channels"):
        layer(torch.randn(2, 8, 5, 5))
    x = torch.randn(4, 7, 6)
    torch.testing.assert_close(layer(x), layer(x.unsqueeze(0)).squeeze(0))


@pytest.mark.parametrize("bias", [True, False])
def test_fuse_batchnorm_is_exact(bias: bool) -> None:
    x = torch.randn(2, 4, 9, 9, **F64)
    cac = _half_sharp({"kernel_size": 3, "padding": 1, "groups": 2, "bias": bias}, x)
    bn = randomize_batchnorm_(nn.BatchNorm2d(8, **F64)).eval()
    with torch.no_grad():
        expected = bn(cac(x))
    for threshold in (0.0, 1.0):
        fused = CACSparseConv2d.from_cac(cac, threshold=threshold).fuse_batchnorm(bn)
        assert_close(fused(x), expected, **TIGHT)


def test_fuse_batchnorm_errors() -> None:
    sparse = CAConv2d(4, 8, 3).fuse(fold_always_sharp=False)
    with pytest.raises(TypeError, match="bn must be an nn.BatchNorm2d with running statistics, got LayerNorm"):
        sparse.fuse_batchnorm(nn.LayerNorm(8))
    with pytest.raises(ValueError, match="bn has 4 features, the layer 8 output channels"):
        sparse.fuse_batchnorm(nn.BatchNorm2d(4))


def test_block_algorithm_under_autocast_with_partial_tiles() -> None:
    """Its output buffer takes the convs' dtype: under autocast that is bfloat16 / float16 while x is
    float32, and index_copy_ refuses to mix the two (the map here is not a whole number of tiles)."""
    torch.manual_seed(0)
    layer = CAConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 9, 11)
    calibrate_sharp_ratio_(layer, x, 0.3)
    sparse = CACSparseConv2d.from_cac(layer, algorithm="block", threshold=1.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse(x)
        expected = layer.eval()(x)
    assert sparse.last_path == "sparse" and y.dtype == torch.bfloat16
    assert_close(y, expected, rtol=0.02, atol=0.02)


def test_fuse_batchnorm_keeps_the_layer_dtype() -> None:
    """A float32 BN after a float16 layer folds into float16 tensors (as torch's fuse_conv_bn_eval)."""
    layer = CAConv2d(4, 6, 3, padding=1, bias=False, dtype=torch.float16)
    bn = randomize_batchnorm_(nn.BatchNorm2d(6)).eval()
    fused = layer.fuse(fold_always_sharp=False).fuse_batchnorm(bn)
    assert {p.dtype for p in fused.parameters()} == {torch.float16}
    x = torch.randn(2, 4, 8, 8, dtype=torch.float16)
    with torch.no_grad():
        assert_close(fused(x).float(), bn(layer.eval()(x).float()), rtol=0.02, atol=0.02)
