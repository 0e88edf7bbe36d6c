"""MobileNet family: shapes at 224 and 32, reference parameter/MAC counts, ddsnet structure, presets, deploy."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import fx, nn

import convzoo
from convzoo.models.mobilenet import InvertedResidual, make_divisible
from convzoo.ops.dilated import PyramidDilatedConv2d
from convzoo.profiling import count_macs
from convzoo.testing import count_parameters, randomize_batchnorm_

IMAGENET_MODELS = ["mobilenetv1", "mobilenetv2", "mobilenetv2_x1_2", "ddsnet"]
CIFAR_MODELS = ["cifar_mobilenetv2", "cifar_mobilenetv2_x1_2"]


def _prelu_parameters(model: nn.Module) -> int:
    return sum(m.num_parameters for m in model.modules() if isinstance(m, nn.PReLU))


def test_models_are_registered_with_input_sizes() -> None:
    names = convzoo.list_models("*mobilenet*") + convzoo.list_models("ddsnet")
    assert set(IMAGENET_MODELS + CIFAR_MODELS) <= set(names)
    from convzoo.models import get_model_entry

    assert get_model_entry("ddsnet").input_size == (3, 224, 224)
    assert get_model_entry("cifar_mobilenetv2").input_size == (3, 32, 32)


@pytest.mark.parametrize(
    ("name", "size"),
    [(name, size) for name in IMAGENET_MODELS for size in (224, 32)]
    + [(name, 32) for name in CIFAR_MODELS]
    # CIFAR nets keep 32x32 features for three stages: at 224 that is 49x the work, so slow
    + [pytest.param(name, 224, marks=pytest.mark.slow) for name in CIFAR_MODELS],
)
def test_output_shapes(name: str, size: int) -> None:
    model = convzoo.create_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 7)


@pytest.mark.parametrize(("width", "expected"), [(1.0, 3_504_872), (1.2, 4_725_992)])
def test_mobilenetv2_matches_torchvision_parameters(width: float, expected: int) -> None:
    model = convzoo.create_model("mobilenetv2", num_classes=1000, width=width)
    reference = torchvision.models.mobilenet_v2(width_mult=width)
    assert count_parameters(model) == count_parameters(reference) == expected
    assert count_parameters(convzoo.create_model("mobilenetv2_x1_2", num_classes=1000)) == 4_725_992


def test_mobilenetv1_parameters_match_the_reference() -> None:
    # Howard et al. 1.0 MobileNet-224: 4.2M parameters (4,231,976 with BN's affine parameters)
    assert count_parameters(convzoo.create_model("mobilenetv1", num_classes=1000)) == 4_231_976


def test_cifar_mobilenetv2_matches_cpwc_table1_baseline() -> None:
    model = convzoo.create_model("cifar_mobilenetv2", num_classes=100)
    assert model.conv_stem.stride == (1, 1)
    assert count_parameters(model) == 2_351_972  # CPWC Table 1: 2.4M
    assert round(count_macs(model, (3, 32, 32)) / 1e9, 2) == 0.30  # CPWC Table 1: 0.30G
    wide = convzoo.create_model("cifar_mobilenetv2_x1_2", num_classes=100)
    assert count_parameters(wide) == count_parameters(
        convzoo.create_model("cifar_mobilenetv2", num_classes=100, width=1.2)
    )
    assert count_parameters(wide) > count_parameters(model)


def test_ddsnet_has_mobilenetv2_parameters_plus_prelu_slopes() -> None:
    model = convzoo.create_model("ddsnet", num_classes=1000)
    baseline = convzoo.create_model("mobilenetv2", num_classes=1000)
    assert count_parameters(model) == count_parameters(baseline) + _prelu_parameters(model)
    assert sum(len(stage) for stage in model.blocks) == 17  # Table 3's repeats: 1+1+1+1+2+1+6+1+3


@pytest.mark.slow
def test_ddsnet_macs_equal_mobilenetv2_at_224() -> None:
    macs = count_macs(convzoo.create_model("ddsnet"), (3, 224, 224))
    assert macs == count_macs(convzoo.create_model("mobilenetv2"), (3, 224, 224))


def test_ddsnet_macs_equal_mobilenetv2_at_32() -> None:
    assert count_macs(convzoo.create_model("ddsnet"), (3, 32, 32)) == count_macs(
        convzoo.create_model("mobilenetv2"), (3, 32, 32)
    )


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, PyramidDilatedConv2d) or super().is_leaf_module(m, qualified_name)


def test_ddsnet_prelu_after_every_conv_but_each_blocks_last_pointwise() -> None:
    model = convzoo.create_model("ddsnet")
    modules = dict(model.named_modules())
    graph = _LeafTracer().trace(model)
    convs = [
        n
        for n in graph.nodes
        if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d | PyramidDilatedConv2d)
    ]
    assert len(convs) == 1 + 2 + 16 * 3 + 1  # stem, first block (dw, pwl), 16 blocks (pw, dw, pwl), head
    for node in convs:
        (bn,) = node.users
        assert isinstance(modules[bn.target], nn.BatchNorm2d)
        following = [modules[u.target] if u.op == "call_module" else u.target for u in bn.users]
        if node.target.endswith("conv_pwl"):
            assert not any(isinstance(f, nn.PReLU) for f in following), node.target
        else:
            assert [type(f) for f in following] == [nn.PReLU], node.target
    depthwise = [m for name, m in model.named_modules() if name.endswith("conv_dw")]
    assert len(depthwise) == 17 and all(isinstance(m, PyramidDilatedConv2d) for m in depthwise)
    assert all(m.dilations == (1, 2, 3) and m.split for m in depthwise)


def test_ddsnet_uses_he_initialization_for_prelu() -> None:
    model = convzoo.create_model("ddsnet")
    weight = model.conv_head.weight  # 1280 x 320: fan_in 320
    expected = math.sqrt(2 / ((1 + 0.25**2) * 320))
    assert weight.std().item() == pytest.approx(expected, rel=0.02)
    assert weight.mean().abs().item() < 0.05 * expected
    branch = model.blocks[5][0].conv_dw.branches[0].weight  # depthwise: fan_in = 9
    assert branch.std().item() == pytest.approx(math.sqrt(2 / ((1 + 0.25**2) * 9)), rel=0.15)


def test_ddsnet_options() -> None:
    model = convzoo.create_model("ddsnet", dilations=(1, 2), split=False)
    block = model.blocks[1][0]
    assert block.conv_dw.out_channels == 2 * 96 and block.conv_pwl.in_channels == 2 * 96
    assert count_parameters(model) > count_parameters(convzoo.create_model("ddsnet"))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(("name", "kind", "count"), [("cifar_mobilenetv2", "dds", 17), ("mobilenetv1", "pyramid", 13)])
def test_dds_kinds_go_on_depthwise_convs_only(name: str, kind: str, count: int) -> None:
    model = convzoo.create_model(name, conv=kind)
    replaced = [layer for layer, _ in convzoo.conversion_report(model).replaced]
    assert len(replaced) == count and all(layer.endswith("conv_dw") for layer in replaced)
    assert type(model.conv_stem) is nn.Conv2d
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_pyramid_preset_on_cifar_mobilenetv2_takes_options() -> None:
    model = convzoo.create_model("cifar_mobilenetv2", conv="pyramid", conv_options={"dilations": (1, 2)})
    assert model.blocks[0][0].conv_dw.dilations == (1, 2)


def test_deploy_ddsnet_is_exact_in_float64() -> None:
    model = convzoo.create_model("ddsnet").to(torch.float64)
    randomize_batchnorm_(model)
    model.eval()
    deployed = convzoo.deploy(model)
    assert not any(isinstance(m, nn.BatchNorm2d | PyramidDilatedConv2d) for m in deployed.modules())
    x = torch.randn(2, 3, 19, 17, dtype=torch.float64)
    torch.testing.assert_close(deployed(x), model(x), rtol=1e-9, atol=1e-9)


def test_inverted_residual_residual_rule() -> None:
    assert InvertedResidual(16, 16, 1, 6).has_residual
    assert not InvertedResidual(16, 16, 2, 6).has_residual
    assert not InvertedResidual(16, 24, 1, 6).has_residual
    assert InvertedResidual(16, 16, 1, 1).conv_pw is None


def test_make_divisible_matches_torchvision() -> None:
    from torchvision.models._utils import _make_divisible

    for value in (19.2, 38.4, 1536.0, 4.0, 115.2, 28.8):
        assert make_divisible(value) == _make_divisible(value, 8)


@pytest.mark.parametrize("width", [0, -1.0, "wide", float("nan")])
def test_width_is_validated(width: object) -> None:
    with pytest.raises(ValueError, match=r"width must be a positive number, got"):
        convzoo.create_model("cifar_mobilenetv2", width=width)
