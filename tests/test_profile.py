"""profile_model / count_macs: hand-worked MACs and parameters per operator, overrides, memory, formats."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
import torch
from torch import nn

import convzoo
from convzoo.ops.registry import get_conv_kind
from convzoo.profiling import count_macs, count_parameters, profile_model, register_op_macs


def _single_row(module: nn.Module, input_size: tuple[int, int, int]):
    report = profile_model(module, input_size, memory=False)
    (row,) = report.layers
    return report, row


# (in, out, kernel, stride, padding, dilation, groups, H, W)
GEOMETRIES = [
    (4, 6, 3, 1, 1, 1, 1, 9, 7),
    (4, 6, 3, 2, 1, 1, 1, 9, 11),
    (6, 6, 3, 1, 2, 2, 1, 10, 9),
    (6, 9, 3, 1, 1, 1, 3, 7, 8),
    (4, 8, (3, 5), (2, 1), (1, 2), (1, 2), 2, 11, 10),
    (6, 6, 3, 2, 1, 1, 6, 9, 9),
    (8, 16, 1, 1, 0, 1, 1, 5, 5),
]


def _out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _conv_macs(c_in, c_out, k, s, p, d, g, h, w) -> int:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (k, s, p, d))
    return c_out * (c_in // g) * kh * kw * _out(h, kh, sh, ph, dh) * _out(w, kw, sw, pw, dw)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_conv_macs_and_params_follow_the_formula(geometry) -> None:
    c_in, c_out, k, s, p, d, g, h, w = geometry
    conv = nn.Conv2d(c_in, c_out, k, s, p, d, g, bias=True)
    report, row = _single_row(conv, (c_in, h, w))
    kh, kw = _pair(k)
    assert row.macs == report.macs == _conv_macs(*geometry)
    assert row.parameters == report.parameters == c_out * (c_in // g) * kh * kw + c_out
    assert row.output_shape[1] == c_out and row.macs_source == "flop_counter"


def test_linear_and_per_image_division() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    assert count_macs(model, (3, 2, 2)) == 12 * 5
    assert count_macs(model, (3, 2, 2), batch_size=4) == 12 * 5


def test_doconv_training_form_counts_the_composition_and_deploys_to_the_plain_conv() -> None:
    kind = get_conv_kind("doconv")
    c_in, c_out, k, groups, side = 8, 12, 3, 2, 9
    conv = nn.Conv2d(c_in, c_out, k, 1, 1, groups=groups, bias=False)
    module = kind.from_conv(conv)
    plain = _conv_macs(c_in, c_out, k, 1, 1, 1, groups, side, side)
    d_mul = k * k
    # W (C_out, C_in/g, D_mul) and D (C_in, M*N, D_mul); composing W' = W D costs C_out * C_in/g * M*N * D_mul
    assert count_parameters(module) == c_out * (c_in // groups) * d_mul + c_in * k * k * d_mul
    assert count_macs(module, (c_in, side, side)) == plain + c_out * (c_in // groups) * k * k * d_mul
    assert count_macs(convzoo.deploy(module), (c_in, side, side)) == plain


def test_cpwc_follows_the_papers_formula() -> None:
    kind = get_conv_kind("cpwc")
    c, z, side = 16, 8, 6
    module = kind.from_conv(nn.Conv2d(c, z, 1, bias=False))
    # per output pixel: the pointwise conv Z*C, stage 1: 3x3 grouped to Z (9*max(C, Z)), stage 2: 3x3 depthwise (9*Z)
    assert count_macs(module, (c, side, side)) == (z * c + 9 * max(c, z) + 9 * z) * side * side
    assert count_parameters(module) == z * c + 9 * (c // z) * z + 9 * z


def test_dds_is_a_dilated_depthwise_then_pointwise_conv() -> None:
    kind = get_conv_kind("dds")
    c, c_out, side = 6, 10, 9
    dense = kind.from_conv(nn.Conv2d(c, c_out, 3, 1, 1, bias=False))
    assert count_macs(dense, (c, side, side)) == (9 * c + c * c_out) * side * side
    assert count_parameters(dense) == 9 * c + c * c_out
    depthwise = kind.from_conv(nn.Conv2d(c, c, 3, 2, 1, groups=c, bias=False))
    out = _out(side, 3, 2, 1, 1)
    assert count_macs(depthwise, (c, side, side)) == 9 * c * out * out


def test_pyramid_splits_channels_over_the_dilations() -> None:
    kind = get_conv_kind("pyramid")
    c, side = 9, 8
    module = kind.from_conv(nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False))
    # dilations (1, 2, 3) on three shares of the channels: each channel still has one 3x3 kernel
    assert count_macs(module, (c, side, side)) == 9 * c * side * side
    assert count_parameters(module) == 9 * c


@pytest.mark.parametrize(("beta", "sharp"), [(4.0, True), (-4.0, False)])
def test_cac_effective_macs_follow_eq_17(beta: float, sharp: bool) -> None:
    kind = get_conv_kind("cac")
    c_in, c_out, side = 4, 6, 8
    module = kind.from_conv(nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False))
    with torch.no_grad():
        module.gamma.fill_(0.0)
        module.beta.fill_(beta)  # score sigmoid(beta): every window sharp (beta > 0) or smooth (beta < 0)
    report, row = _single_row(module, (c_in, side, side))
    per_position = (9 if sharp else 1) * c_in * c_out + 13  # eq. 17: rho k^2 + (1 - rho) + 13 / (c_in c_out)
    assert row.macs_source == "convzoo_macs"
    assert row.macs == report.macs == per_position * side * side
    assert report.cac is not None and report.cac.layers == 1
    assert report.cac.baseline_macs == 9 * c_in * c_out * side * side
    assert report.cac.sharp_ratio == (1.0 if sharp else 0.0)
    assert "CAC effective MACs" in report.to_markdown()


def test_every_registered_kind_counts_non_zero_macs_on_every_operator_layer() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1), nn.ReLU()
    )
    for kind in convzoo.list_convs():
        conv_kind = get_conv_kind(kind)
        if not any(conv_kind.skip_reason(m) is None for m in model if isinstance(m, nn.Conv2d)):
            continue
        converted = convzoo.convert(model, kind)
        report = profile_model(converted, (3, 8, 8), memory=False)
        operators = [row for row in report.layers if row.kind == kind]
        assert operators and all(row.macs > 0 for row in operators), (kind, operators)


def test_convzoo_macs_overrides_the_flop_counter_for_the_subtree() -> None:
    class Cheap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

        def convzoo_macs(self, input: torch.Tensor, output: torch.Tensor) -> int:
            return 7 * input.shape[0]

    model = nn.Sequential(Cheap(), nn.Conv2d(2, 3, 1))
    report = profile_model(model, (2, 4, 4), batch_size=3, memory=False)
    assert [row.name for row in report.layers] == ["0", "1"]  # the override's children are not rows
    assert report.layers[0].macs == 7 and report.layers[0].macs_source == "convzoo_macs"
    assert report.macs == 7 + 2 * 3 * 16
    assert report.flop_counter_macs == 2 * 2 * 9 * 16 + 2 * 3 * 16


def test_custom_ops_get_a_registered_formula_and_zero_counts_warn() -> None:
    @torch.library.custom_op("convzoo_test::channel_mix", mutates_args=())
    def channel_mix(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,oc->bohw", x, weight)

    @channel_mix.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0], *x.shape[2:])

    class Mix(nn.Module):
        convzoo_kind = "mix_test"  # looks like an operator, so 0 MACs is suspicious

        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return channel_mix(x, self.weight)

    with pytest.warns(UserWarning, match="counted 0 MACs: \\(model\\) \\(Mix\\)"):
        assert count_macs(Mix(), (4, 3, 3)) == 0
    register_op_macs(torch.ops.convzoo_test.channel_mix, lambda x, w, out_shape=None: out_shape.numel() * x[1])
    assert count_macs(Mix(), (4, 3, 3)) == 5 * 9 * 4


def test_other_macs_collects_functional_ops_outside_layers() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 2, 1, 1))
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(torch.nn.functional.conv2d(x, self.weight))

    report = profile_model(Functional(), (2, 4, 4), memory=False)
    assert report.other_macs == report.macs == 3 * 2 * 16


def test_peak_activation_memory_counts_live_intermediates() -> None:
    class Chain(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = x * 2  # 1 buffer
            b = a + 1  # 2 live
            del a
            c = b.view(-1) * 3  # b and c live (the view shares b's storage)
            return c

    report = profile_model(Chain(), (4, 8, 8), batch_size=2)
    assert report.peak_activation_bytes == 2 * 2 * 4 * 8 * 8 * 4  # two float32 tensors of the whole batch


def test_model_mode_is_restored_and_eval_is_used() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    model.train()
    profile_model(model, (3, 8, 8))
    assert model.training and model[1].num_batches_tracked == 0  # eval pass: statistics untouched


def test_formats_round_trip() -> None:
    model = convzoo.create_model("cifar_resnet20")
    report = profile_model(model, name="cifar_resnet20")
    data = json.loads(report.format("json"))
    assert data["macs"] == report.macs == 40_813_184 and data["parameters"] == 272_474
    assert data["peak_activation_bytes"] > 16 * 32 * 32 * 4 and len(data["layers"]) == len(report.layers)
    rows = list(csv.DictReader(io.StringIO(report.format("csv"))))
    assert rows[-1]["name"] == "(total)" and int(rows[-1]["macs"]) == report.macs
    assert sum(int(r["macs"]) for r in rows[:-1]) == report.macs
    markdown = report.format("md")
    assert markdown.startswith("### cifar_resnet20") and "| layer1.0.conv1 | Conv2d | 16x32x32 | 2,304 |" in markdown
    assert "| layer" not in report.to_markdown(layers=False)


def test_top_level_api() -> None:
    assert convzoo.profile_model is profile_model and convzoo.count_macs is count_macs
    assert isinstance(convzoo.profile_model(nn.Conv2d(1, 1, 3), (1, 5, 5)), convzoo.ProfileReport)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: profile_model("model"), TypeError, "model must be an nn.Module"),
        (lambda: profile_model(nn.ReLU(), 32), TypeError, "input_size must be a tuple"),
        (lambda: profile_model(nn.ReLU(), (3, 0, 4)), ValueError, r"input_size must be \(C, H, W\), a tuple of 3"),
        (lambda: profile_model(nn.ReLU(), batch_size=0), ValueError, "batch_size must be a positive int"),
        (lambda: profile_model(nn.ReLU(), inputs=torch.ones(3)), ValueError, "inputs must be a batched tensor"),
        (lambda: profile_model(nn.ReLU(), inputs=[1.0]), TypeError, r"inputs must be a Tensor \(B, C, H, W\) or None"),
        (lambda: profile_model(nn.ReLU(), (1, 2, 2), memory="no"), TypeError, "memory must be a bool, got 'no'"),
        (lambda: count_parameters(None), TypeError, "model must be an nn.Module, got NoneType"),
        (lambda: count_macs(None), TypeError, "model must be an nn.Module, got NoneType"),
        (lambda: profile_model(nn.ReLU(), (1, 2, 2)).format("xml"), ValueError, "fmt must be one of"),
        (lambda: register_op_macs("aten::add", len), TypeError, "op must be an op overload packet"),
        (lambda: register_op_macs(torch.ops.aten.add, 3), TypeError, "formula must be callable"),
    ],
)
def test_errors(call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_multiception_counts_every_branch_and_the_pointwise() -> None:
    c, c_out, side, stride = 6, 10, 9, 2
    module = convzoo.MulticeptionConv2d(c, c_out, 3, stride, kernels=(3, 5, 7))
    out = _out(side, 3, stride, 1, 1)  # stride taken in the depthwise step, 'same' padding
    per_pixel = (9 + 25 + 49) * c + 3 * c * c_out  # three depthwise branches, then 1x1 over 3C channels
    assert count_macs(module, (c, side, side)) == per_pixel * out * out
    # depthwise kernels, BN(3C) affine, 1x1 weight + bias, BN(C_out) affine
    assert count_parameters(module) == (9 + 25 + 49) * c + 2 * 3 * c + 3 * c * c_out + c_out + 2 * c_out
    deployed = convzoo.deploy(module)
    assert count_macs(deployed, (c, side, side)) == per_pixel * out * out


def test_dsconv_and_mixconv_are_depthwise_then_pointwise() -> None:
    c, c_out, side = 7, 5, 8
    dsconv = convzoo.DSConv2d(c, c_out, 3, 1)
    assert count_macs(dsconv, (c, side, side)) == (9 * c + c * c_out) * side * side
    mixconv = convzoo.MixConv2d(c, c_out, 3, 1, kernels=(3, 5))
    splits = (4, 3)  # timm's split: equal parts, the first takes the remainder
    depthwise = 9 * splits[0] + 25 * splits[1]
    assert count_macs(mixconv, (c, side, side)) == (depthwise + c * c_out) * side * side


@pytest.mark.parametrize("input_size", [(3, 32), (32,), (1, 3, 32, 32), ()])
def test_input_size_must_be_c_h_w(input_size: tuple[int, ...]) -> None:
    match = f"input_size must be (C, H, W), a tuple of 3 positive ints such as (3, 32, 32), got {input_size!r}"
    with pytest.raises(ValueError, match=re.escape(match)):
        profile_model(nn.Conv2d(3, 4, 3), input_size)


@pytest.mark.parametrize(
    ("inputs", "error", "match"),
    [
        (
            torch.ones(1, 3, 8, 8, dtype=torch.long),
            TypeError,
            "inputs must be a floating-point tensor, got torch.int64",
        ),
        (
            torch.randn(3, 8, 8),
            ValueError,
            r"inputs must be a batched tensor \(B, C, H, W\), got shape \(3, 8, 8\); add the batch dimension",
        ),
        (torch.randn(2, 1, 3, 8, 8), ValueError, r"inputs must be a batched tensor .*got shape \(2, 1, 3, 8, 8\)$"),
        (torch.randn(0, 3, 8, 8), ValueError, r"inputs must hold at least one image, got shape \(0, 3, 8, 8\)"),
    ],
)
def test_inputs_must_be_a_non_empty_floating_point_batch(inputs: torch.Tensor, error: type[Exception], match: str):
    with pytest.raises(error, match=match):
        profile_model(nn.Conv2d(3, 4, 3), inputs=inputs)


def test_a_forward_that_refuses_the_input_raises_a_value_error_naming_it() -> None:
    model = convzoo.create_model("cifar_resnet20").train()
    with pytest.raises(ValueError) as refused:
        profile_model(model, (1, 32, 32))
    message = str(refused.value)
    assert message.startswith(
        "profile: CifarResNet cannot run on input_size=(1, 32, 32) (a batch of shape (1, 1, 32, 32)) "
        "in layer 'conv1' (Conv2d) (torch: Given groups=1"
    )
    assert "to have 3 channels, but got 1 channels" in message
    assert isinstance(refused.value.__cause__, RuntimeError) and model.training
    with pytest.raises(ValueError, match=r"cannot run on inputs of shape \(2, 3, 8, 8\) \(torch.float64, cpu\)"):
        profile_model(model, inputs=torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_cac_layers_on_the_meta_device_are_refused_and_standard_ones_count() -> None:
    assert profile_model(convzoo.create_model("cifar_resnet20", device="meta")).macs == 40_813_184
    cac = convzoo.create_model("cifar_resnet20", conv="cac", device="meta")
    with pytest.raises(ValueError, match=r"profile: CifarResNet has 19 CAC layer\(s\) on the meta device"):
        profile_model(cac, memory=False)
    with pytest.raises(ValueError, match="effective MACs .* depend on the content of real images"):
        profile_model(convzoo.create_model("cifar_resnet20", conv="cac"), inputs=torch.empty(1, 3, 8, 8, device="meta"))
    assert cac.training


def test_memory_not_measured_is_none_and_shown_as_such() -> None:
    report = profile_model(nn.Conv2d(3, 4, 3), (3, 8, 8), memory=False)
    assert report.peak_activation_bytes is None
    assert ("peak activation memory", "not measured") in report.summary_rows()
    assert "| peak activation memory | not measured |" in report.format("md")
    assert json.loads(report.format("json"))["peak_activation_bytes"] is None
    measured = profile_model(nn.Conv2d(3, 4, 3), (3, 8, 8))
    assert measured.peak_activation_bytes == 4 * 6 * 6 * 4
    assert ("peak activation memory", "576 B") in measured.summary_rows()
