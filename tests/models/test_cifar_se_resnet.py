"""CIFAR SE-ResNet-56: SE placement, counts vs Multiception's Table 5, names for presets, errors."""

from __future__ import annotations

import pytest
import torch

import convzoo
from convzoo.models.cifar_se_resnet import CifarSEResNet, SEBasicBlock, SqueezeExcite
from convzoo.profiling import count_macs, count_parameters
from convzoo.testing import randomize_batchnorm_


def test_se_follows_the_second_bn_before_the_addition() -> None:
    block = SEBasicBlock(4, 8, 2, reduction=8).double().eval()
    randomize_batchnorm_(block)
    with torch.no_grad():
        for p in block.se.parameters():
            p.normal_()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    out = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    squeeze = out.mean((2, 3))
    gate = torch.sigmoid(torch.relu(squeeze @ block.se.fc1.weight.T) @ block.se.fc2.weight.T)
    expected = torch.relu(out * gate[:, :, None, None] + block.downsample(x))
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
    assert block.se.fc1.out_features == 1  # 8 channels // reduction 8


def test_counts_match_hand_formula_and_multiception_table5() -> None:
    model = convzoo.create_model("cifar_se_resnet56")
    resnet = convzoo.create_model("cifar_resnet56")
    se = 9 * 2 * sum(c * (c // 8) for c in (16, 32, 64))  # two bias-free linears per block
    assert count_parameters(model) == count_parameters(resnet) + se == 867_866
    assert round(count_parameters(model) / 1e6, 4) == 0.8679  # Multiception Table 5: SeNet-56, 0.8679M
    se_macs = 9 * 2 * sum(c * (c // 8) for c in (16, 32, 64))
    assert count_macs(model) == count_macs(resnet) + se_macs


def test_keeps_the_resnet_names_the_multiception_preset_matches() -> None:
    names = set(dict(convzoo.create_model("cifar_se_resnet56").named_modules()))
    assert {f"layer{s}.{i}.conv1" for s in (1, 2, 3) for i in range(9)} <= names


def test_pointwise_kinds_leave_the_excitation_alone() -> None:
    if "cpwc" not in convzoo.list_convs():
        pytest.skip("the 'cpwc' kind is not registered yet")
    model = convzoo.create_model("cifar_se_resnet56", conv="cpwc")
    assert all(type(m.se.fc1) is torch.nn.Linear for stage in (model.layer1, model.layer2) for m in stage)


@pytest.mark.parametrize(
    ("call", "match"),
    [(lambda: CifarSEResNet(depth=55), "depth must be 6n\\+2"), (lambda: SqueezeExcite(8, 0), "reduction must be")],
)
def test_bad_arguments(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
