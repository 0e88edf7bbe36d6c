"""Placement presets of Multiception / DSConv / MixConv: where they go, which kernels, parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convzoo
from convzoo.models.multiception_presets import first_convs, resolve_schedule
from convzoo.ops.multiception import MulticeptionConv2d
from convzoo.ops.separable import DSConv2d, MixConv2d
from convzoo.testing import count_parameters


def _kernels_by_stage(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: m.kernels for name, m in model.named_modules() if isinstance(m, MulticeptionConv2d)}


def test_resnet20_authors_code_schedule_and_placement() -> None:
    model = convzoo.create_model("cifar_resnet20", conv="multiception")
    kernels = _kernels_by_stage(model)
    assert sorted(kernels) == sorted(f"layer{s}.{i}.conv1" for s in (1, 2, 3) for i in range(3))
    assert {kernels[f"layer{s}.0.conv1"] for s in (1, 2, 3)} == {(3, 5, 7), (3, 5), (3, 3)}
    assert kernels["layer3.2.conv1"] == (3, 3) and kernels["layer2.0.conv1"] == (3, 5)
    assert model.layer2[0].conv1.stride == (2, 2)
    for block in (*model.layer1, *model.layer2, *model.layer3):
        assert isinstance(block.bn1, nn.Identity)  # the operator ends in its own BN, like the authors' conv_bn
        assert type(block.conv2) is nn.Conv2d
    assert type(model.conv1) is nn.Conv2d
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_paper_schedule_and_explicit_schedule() -> None:
    paper = convzoo.create_model("cifar_resnet20", conv="multiception", conv_options={"schedule": "paper"})
    assert _kernels_by_stage(paper)["layer3.1.conv1"] == (3,)
    custom = ((5,), (3, 3, 3), (7,))
    model = convzoo.create_model("cifar_resnet20", conv="multiception", conv_options={"schedule": custom})
    assert [_kernels_by_stage(model)[f"layer{s}.0.conv1"] for s in (1, 2, 3)] == list(custom)


@pytest.mark.parametrize(
    ("name", "standard", "multiception"),
    [("cifar_resnet50", 758_554, 509_434), ("cifar_resnet20", 272_474, 189_434)],
)
def test_parameter_counts_match_the_paper(name, standard, multiception) -> None:
    # Paper Table 5: ResNet-50 0.7586M -> 0.5094M, ResNet-20 0.2724M -> 0.1899M (reported).
    assert count_parameters(convzoo.create_model(name)) == standard
    assert count_parameters(convzoo.create_model(name, conv="multiception")) == multiception


@pytest.mark.parametrize("name", ["cifar_resnet32", "cifar_resnet56", "cifar_se_resnet56", "cifar_shakeshake26_2x96d"])
def test_other_models_get_the_preset(name) -> None:
    model = convzoo.create_model(name, conv="multiception")
    assert len(_kernels_by_stage(model)) == len(first_convs(convzoo.create_model(name)))


@pytest.mark.parametrize(("kind", "cls"), [("dsconv", DSConv2d), ("mixconv", MixConv2d)])
def test_baselines_share_the_placement(kind, cls) -> None:
    model = convzoo.create_model("cifar_resnet20", conv=kind)
    placed = sorted(name for name, m in model.named_modules() if isinstance(m, cls))
    assert placed == sorted(first_convs(convzoo.create_model("cifar_resnet20")))
    if cls is MixConv2d:
        assert {m.kernels for m in model.modules() if isinstance(m, cls)} == {(3, 5, 7)}


def test_multiception_is_not_a_zoo_default() -> None:
    with pytest.raises(ValueError, match="no placement preset"):
        convzoo.create_model("cifar_preresnet20", conv="multiception")


def test_bad_schedules() -> None:
    with pytest.raises(ValueError, match="schedule must be one of"):
        resolve_schedule("text")
    with pytest.raises(ValueError, match="covers 2 stages"):
        convzoo.create_model("cifar_resnet20", conv="multiception", conv_options={"schedule": ((3,), (5,))})
    with pytest.raises(ValueError, match="kernels must be odd"):
        convzoo.create_model("cifar_resnet20", conv="multiception", conv_options={"schedule": ((3,), (4,), (3,))})
