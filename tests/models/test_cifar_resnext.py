"""CIFAR ResNeXt-29: counts by hand and against the ResNeXt paper / CPWC's Table 1, block, errors."""

from __future__ import annotations

import pytest
import torch

import convzoo
from convzoo.models.cifar_resnext import CifarResNeXt, ResNeXtBottleneck
from convzoo.profiling import count_macs, count_parameters
from convzoo.testing import randomize_batchnorm_


def _counts(cardinality: int, classes: int) -> tuple[int, int]:
    """(parameters, MACs) of ResNeXt-29 (C x 64d) on 32x32 inputs, layer by layer."""
    params, macs = 3 * 64 * 9 + 2 * 64, 3 * 64 * 9 * 32 * 32
    channels, side = 64, 32
    for stage, out in enumerate((256, 512, 1024)):
        width = cardinality * 64 * 2**stage
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            in_side, side = side, side // stride
            grouped = width * (width // cardinality) * 9
            params += channels * width + 2 * width + grouped + 2 * width + width * out + 2 * out
            macs += channels * width * in_side**2 + (grouped + width * out) * side**2
            if channels != out or stride != 1:
                params += channels * out + 2 * out
                macs += channels * out * side**2
            channels = out
    return params + 1024 * classes + classes, macs + 1024 * classes


@pytest.mark.parametrize(("cardinality", "paper_params", "paper_gmacs"), [(8, 34.4e6, 5.4), (16, 68.1e6, 10.7)])
def test_counts_match_hand_formula_and_paper(cardinality: int, paper_params: float, paper_gmacs: float) -> None:
    model = convzoo.create_model(f"cifar_resnext29_{cardinality}x64d", num_classes=100)
    params, macs = _counts(cardinality, 100)
    assert count_parameters(model) == params
    # ResNeXt's Table 7 (CIFAR-10 head), copied by CPWC's Table 1: 34.4M and 68.1M
    assert _counts(cardinality, 10)[0] == pytest.approx(paper_params, rel=0.001)
    if cardinality == 8:  # one forward pass of the smaller network checks the MAC formula
        assert count_macs(model) == macs
    assert round(macs / 1e9, 1) == paper_gmacs  # CPWC Table 1: 5.4G, 10.7G


def test_block_is_reduce_grouped_expand_plus_projection() -> None:
    block = ResNeXtBottleneck(8, 16, 2, cardinality=4, width=8).double().eval()
    randomize_batchnorm_(block)
    assert block.conv2.groups == 4 and block.conv2.stride == (2, 2)
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    out = torch.relu(block.bn1(block.conv1(x)))
    out = torch.relu(block.bn2(block.conv2(out)))
    expected = torch.relu(block.bn3(block.conv3(out)) + block.downsample(x))
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"depth": 28}, "depth must be 9n\\+2"), ({"cardinality": 0}, "cardinality must be a positive int")],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CifarResNeXt(**kwargs)
