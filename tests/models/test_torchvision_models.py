"""ImageNet-size networks built by torchvision under plain names."""

from __future__ import annotations

import pytest
import torch
import torchvision

import convzoo
from convzoo.models.registry import get_model_entry
from convzoo.profiling import count_macs, count_parameters

PLAIN = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "mobilenet_v2": "mobilenet_v2",
    "densenet121": "densenet121",
    "shufflenet_v2_x1_0": "shufflenet_v2_x1_0",
}


@pytest.mark.parametrize(("name", "tv_name"), PLAIN.items())
def test_plain_names_are_torchvision_models(name: str, tv_name: str) -> None:
    model = convzoo.create_model(name, num_classes=1000)
    reference = torchvision.models.get_model(tv_name, weights=None)
    assert type(model) is type(reference)
    assert count_parameters(model) == count_parameters(reference)
    assert get_model_entry(name).input_size == (3, 224, 224)


def test_mobilenet_v2_widths_match_cpwc_table2() -> None:
    base = convzoo.create_model("mobilenet_v2", num_classes=1000)
    wide = convzoo.create_model("mobilenet_v2_x1_2", num_classes=1000)
    assert round(count_parameters(base) / 1e6, 1) == 3.5  # torchvision / MobileNetV2 paper: 3.4M-3.5M
    assert round(count_parameters(wide) / 1e6, 1) == 4.7  # CPWC Table 2: 4.7M
    assert count_macs(wide, (3, 224, 224)) == pytest.approx(465e6, rel=0.01)  # CPWC Table 2: 465M


def test_prefixed_names_still_work() -> None:
    assert isinstance(convzoo.create_model("tv:resnet18"), torchvision.models.ResNet)


def test_zero_init_residual_on_resnet_and_mobilenet() -> None:
    resnet = convzoo.create_model("resnet18", zero_init_residual=True)
    assert not resnet.layer1[0].bn2.weight.any()
    mobilenet = convzoo.create_model("mobilenet_v2", zero_init_residual=True)
    blocks = [m for m in mobilenet.modules() if isinstance(m, torchvision.models.mobilenetv2.InvertedResidual)]
    residual = [b for b in blocks if b.use_res_connect]
    assert residual and all(not b.conv[-1].weight.any() for b in residual)
    assert all(b.conv[-1].weight.all() for b in blocks if not b.use_res_connect)


def test_device_and_dtype() -> None:
    model = convzoo.create_model("resnet18", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
