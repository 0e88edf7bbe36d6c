"""CIFAR ShuffleNetV2: MACs and parameters by hand, CAC's Table 1, unit semantics, errors."""

from __future__ import annotations

import pytest
import torch

import convzoo
from convzoo.models.cifar_shufflenetv2 import CifarShuffleNetV2, ShuffleBasicUnit, ShuffleDownUnit
from convzoo.profiling import count_macs, count_parameters
from convzoo.testing import randomize_batchnorm_


def _counts(classes: int) -> tuple[int, int]:
    """(parameters, MACs) of kuangliu/pytorch-cifar's ShuffleNetV2 (width 1.0) on 32x32 inputs."""
    params, macs = 3 * 24 * 9 + 2 * 24, 3 * 24 * 9 * 32 * 32
    channels, side = 24, 32
    for out, units in zip((116, 232, 464), (3, 7, 3), strict=True):
        mid, side = out // 2, side // 2
        # down unit: left dw3x3/2 + 1x1; right 1x1 (full res) + dw3x3/2 + 1x1
        params += channels * 9 + 2 * channels + channels * mid + 2 * mid
        params += channels * mid + 2 * mid + mid * 9 + 2 * mid + mid * mid + 2 * mid
        macs += (channels * 9 + channels * mid + mid * 9 + mid * mid) * side**2 + channels * mid * (2 * side) ** 2
        for _ in range(units):  # basic unit on half the channels: 1x1, dw3x3, 1x1
            params += 2 * (mid * mid + 2 * mid) + mid * 9 + 2 * mid
            macs += (2 * mid * mid + mid * 9) * side**2
        channels = out
    params += 464 * 1024 + 2 * 1024 + 1024 * classes + classes
    return params, macs + 464 * 1024 * side**2 + 1024 * classes


def test_counts_match_hand_formula_and_cac_table1() -> None:
    model = convzoo.create_model("cifar_shufflenetv2")
    params, macs = _counts(10)
    assert count_parameters(model) == params == 1_263_854
    assert count_macs(model) == macs
    assert macs == pytest.approx(45.04e6, rel=1e-3)  # CAC Table 1: ShuffleNetV2, 45.04M MAdds


def test_basic_unit_transforms_the_second_half_then_shuffles() -> None:
    unit = ShuffleBasicUnit(8).double().eval()
    randomize_batchnorm_(unit)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    kept, other = x[:, :4], x[:, 4:]
    out = torch.relu(unit.bn3(unit.conv3(unit.bn2(unit.conv2(torch.relu(unit.bn1(unit.conv1(other))))))))
    cat = torch.cat((kept, out), 1)
    shuffled = cat.view(2, 2, 4, 5, 5).transpose(1, 2).reshape(2, 8, 5, 5)
    torch.testing.assert_close(unit(x), shuffled, rtol=1e-12, atol=1e-12)


def test_down_unit_halves_the_size_and_both_paths_give_half_the_channels() -> None:
    unit = ShuffleDownUnit(6, 10)
    assert unit(torch.randn(1, 6, 9, 9)).shape == (1, 10, 5, 5)
    assert unit.conv1.groups == 6 and unit.conv4.groups == 5


def test_stem_is_stride_1_without_max_pool_and_other_widths_build() -> None:
    model = CifarShuffleNetV2()
    assert model.conv1.out_channels == 24 and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert CifarShuffleNetV2(0.5, 3)(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: CifarShuffleNetV2(0.75), "width must be one of"),
        (lambda: ShuffleBasicUnit(7), "channels must be even"),
        (lambda: ShuffleDownUnit(4, 7), "out_channels must be even"),
    ],
)
def test_bad_arguments(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
