"""Pre-activation CIFAR ResNets: counts by hand, CPWC's Table 1, block semantics, zero init, errors."""

from __future__ import annotations

import pytest
import torch

import convzoo
from convzoo.models.cifar_preresnet import CifarPreResNet, PreActBasicBlock, PreActBottleneck
from convzoo.profiling import count_macs, count_parameters
from convzoo.testing import randomize_batchnorm_


def _basic_counts(depth: int, classes: int) -> tuple[int, int]:
    """(parameters, MACs) of the basic pre-activation ResNet, layer by layer on 32x32 inputs."""
    n = (depth - 2) // 6
    params, macs = 3 * 16 * 9, 3 * 16 * 9 * 32 * 32
    channels, side = 16, 32
    for stage, width in enumerate((16, 32, 64)):
        for block in range(n):
            stride = 2 if stage > 0 and block == 0 else 1
            side //= stride
            params += 2 * channels + channels * width * 9 + 2 * width + width * width * 9
            macs += (channels * width * 9 + width * width * 9) * side * side
            if channels != width or stride != 1:
                params += channels * width
                macs += channels * width * side * side
            channels = width
    params += 2 * 64 + 64 * classes + classes
    return params, macs + 64 * classes


def _bottleneck_counts(depth: int, classes: int) -> tuple[int, int]:
    n = (depth - 2) // 9
    params, macs = 3 * 16 * 9, 3 * 16 * 9 * 32 * 32
    channels, side = 16, 32
    for stage, width in enumerate((16, 32, 64)):
        for block in range(n):
            stride = 2 if stage > 0 and block == 0 else 1
            in_side, side = side, side // stride
            params += 2 * channels + channels * width + 2 * width + 9 * width * width + 2 * width + width * 4 * width
            macs += channels * width * in_side**2 + (9 * width * width + width * 4 * width) * side**2
            if channels != 4 * width or stride != 1:
                params += channels * 4 * width
                macs += channels * 4 * width * side**2
            channels = 4 * width
    params += 2 * 256 + 256 * classes + classes
    return params, macs + 256 * classes


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_basic_counts_match_hand_formula(depth: int) -> None:
    model = convzoo.create_model(f"cifar_preresnet{depth}")
    params, macs = _basic_counts(depth, 10)
    assert count_parameters(model) == params
    if depth == 20:  # the same formula at every depth; one forward pass is enough
        assert count_macs(model) == macs == 40_813_184


@pytest.mark.parametrize(("depth", "paper_params", "paper_gmacs"), [(164, 1.74e6, 0.25), (200, 2.11e6, 0.30)])
def test_bottleneck_counts_match_hand_formula_and_cpwc_table1(depth: int, paper_params: float, paper_gmacs: float):
    model = convzoo.create_model(f"cifar_preresnet{depth}", num_classes=100)
    params, macs = _bottleneck_counts(depth, 100)
    assert count_parameters(model) == params
    assert count_macs(model) == macs
    # CPWC's Table 1 (CIFAR-100) prints 1.74M / 2.11M and 0.25G / 0.30G: within 1.5% and rounding.
    assert params == pytest.approx(paper_params, rel=0.015)
    assert round(macs / 1e9, 2) == paper_gmacs


def test_blocks_are_preactivated_with_projection_on_the_preactivated_input() -> None:
    block = PreActBasicBlock(4, 8, stride=2).double().eval()
    randomize_batchnorm_(block)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    pre = torch.relu(block.bn1(x))
    expected = block.conv2(torch.relu(block.bn2(block.conv1(pre)))) + block.downsample(pre)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
    block = PreActBottleneck(16, 4).double().eval()
    assert block.downsample is None
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    pre = torch.relu(block.bn1(x))
    branch = block.conv3(torch.relu(block.bn3(block.conv2(torch.relu(block.bn2(block.conv1(pre)))))))
    torch.testing.assert_close(block(x), branch + x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["cifar_preresnet20", "cifar_preresnet164"])
def test_zero_init_residual_makes_identity_blocks_identities(name: str) -> None:
    model = convzoo.create_model(name, zero_init_residual=True).eval()
    block = model.layer1[1]
    x = torch.randn(2, block.bn1.num_features, 8, 8)
    torch.testing.assert_close(block(x), x)
    plain = convzoo.create_model(name).eval()
    assert not torch.allclose(plain.layer1[1](x), x)


def test_builds_on_requested_dtype_and_names_follow_torchvision() -> None:
    model = convzoo.create_model("cifar_preresnet20", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    names = dict(model.named_modules())
    assert {"layer1.0.conv1", "layer3.2.conv2", "layer2.0.downsample", "fc"} <= set(names)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 21}, "depth must be 6n\\+2"),
        ({"depth": 57, "block": "bottleneck"}, "depth must be 9n\\+2"),
        ({"depth": 20, "block": "wide"}, "block must be one of"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CifarPreResNet(**kwargs)
