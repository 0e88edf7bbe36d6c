"""CIFAR DenseNet-121: MACs and parameters by hand, CAC's Table 1, layer semantics, errors."""

from __future__ import annotations

import math

import pytest
import torch

import convzoo
from convzoo.models.cifar_densenet import CifarDenseNet, DenseLayer
from convzoo.profiling import count_macs, count_parameters
from convzoo.testing import randomize_batchnorm_


def _counts(classes: int, growth: int = 32, blocks: tuple[int, ...] = (6, 12, 24, 16)) -> tuple[int, int]:
    """(parameters, MACs) of the kuangliu/pytorch-cifar DenseNet on 32x32 inputs, layer by layer."""
    channels, side = 2 * growth, 32
    params, macs = 3 * channels * 9, 3 * channels * 9 * side**2
    for index, layers in enumerate(blocks):
        for _ in range(layers):
            inner = 4 * growth
            params += 2 * channels + channels * inner + 2 * inner + inner * growth * 9
            macs += (channels * inner + inner * growth * 9) * side**2
            channels += growth
        if index < len(blocks) - 1:
            out = math.floor(channels * 0.5)
            params += 2 * channels + channels * out
            macs += channels * out * side**2
            channels, side = out, side // 2
    return params + 2 * channels + channels * classes + classes, macs + channels * classes


def test_counts_match_hand_formula_and_cac_table1() -> None:
    model = convzoo.create_model("cifar_densenet121")
    params, macs = _counts(10)
    assert count_parameters(model) == params == 6_956_298
    assert count_macs(model) == macs
    assert macs == pytest.approx(888.51e6, rel=5e-4)  # CAC Table 1: DenseNet121, 888.51M MAdds


def test_dense_layer_is_preactivated_bottleneck_concatenated_after_its_input() -> None:
    layer = DenseLayer(6, 4).double().eval()
    randomize_batchnorm_(layer)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    new = layer.conv2(torch.relu(layer.bn2(layer.conv1(torch.relu(layer.bn1(x))))))
    torch.testing.assert_close(layer(x), torch.cat((new, x), 1), rtol=1e-12, atol=1e-12)


def test_structure_stem_transitions_and_classifier() -> None:
    model = CifarDenseNet((2, 2), growth_rate=4, num_classes=3)
    assert model.conv1.out_channels == 8 and model.conv1.stride == (1, 1)
    assert model.trans1.conv.out_channels == math.floor((8 + 2 * 4) * 0.5)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"block_config": ()}, "block_config must be"), ({"reduction": 0.0}, "reduction must be in")],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CifarDenseNet(**kwargs)
