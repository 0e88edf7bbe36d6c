"""Placement presets of Multiception / DSConv / MixConv: where they go, which kernels, parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convzoo
from convzoo.models.multiception_presets import first_convs, place_in_inverted_residuals, resolve_schedule
from convzoo.ops.multiception import MulticeptionConv2d, multiception_parameter_count
from convzoo.ops.separable import DSConv2d, MixConv2d
from convzoo.testing import count_parameters, randomize_batchnorm_


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


def test_a_schedule_with_more_stages_than_the_model_is_refused() -> None:
    five = ((3, 5, 7), (3, 5), (3, 3), (3,), (3,))
    with pytest.raises(ValueError, match="covers 5 stages, CifarResNet has 3: give one kernel tuple per stage"):
        convzoo.create_model("cifar_resnet20", conv="multiception", conv_options={"schedule": five})
    with pytest.raises(ValueError, match="covers 5 stages"):
        convzoo.create_model("cifar_resnet20", conv="mixconv", conv_options={"schedule": five})


@pytest.mark.parametrize("kind", ["multiception", "mixconv"])
@pytest.mark.parametrize("schedule", ["paper", "code", ((3,), (5,), (7,))])
def test_schedule_and_kernels_together_are_refused(kind, schedule) -> None:
    # multiception_preset used to bind the default schedule itself, so 'paper' was silently dropped for kernels
    with pytest.raises(
        ValueError, match=r"give either schedule or kernels, not both: got schedule=.* kernels=\(3, 5\)"
    ):
        convzoo.create_model("cifar_resnet20", conv=kind, conv_options={"schedule": schedule, "kernels": (3, 5)})


def test_kernels_alone_go_in_every_stage() -> None:
    model = convzoo.create_model("cifar_resnet20", conv="multiception", conv_options={"kernels": (3, 5)})
    assert set(_kernels_by_stage(model).values()) == {(3, 5)}


# ---------------------------------------------------------------------------- MobileNetV2 (STL-10)
_MOBILENET_BLOCKS = ("blocks.0.0", "blocks.1.0", "blocks.1.1")  # settings (1, 16, 1, 1) and (6, 24, 2, s)
_OPERATOR_CLASSES = {"multiception": MulticeptionConv2d, "dsconv": DSConv2d, "mixconv": MixConv2d}


def _placed(model: nn.Module, cls: type[nn.Module]) -> list[str]:
    return sorted(name for name, m in model.named_modules() if isinstance(m, cls))


@pytest.mark.parametrize("kind", ["multiception", "dsconv", "mixconv"])
def test_mobilenetv2_preset_replaces_depthwise_and_projection_of_the_first_two_settings(kind) -> None:
    cls = _OPERATOR_CLASSES[kind]
    standard = convzoo.create_model("cifar_mobilenetv2")
    model = convzoo.create_model("cifar_mobilenetv2", conv=kind)
    assert _placed(model, cls) == [f"{name}.conv_dw" for name in _MOBILENET_BLOCKS]
    for name in _MOBILENET_BLOCKS:
        block, before = model.get_submodule(name), standard.get_submodule(name)
        op = block.conv_dw
        assert (op.in_channels, op.out_channels) == (before.conv_dw.in_channels, before.conv_pwl.out_channels)
        assert op.stride == before.conv_dw.stride and op.training
        assert all(isinstance(getattr(block, a), nn.Identity) for a in ("bn2", "act2", "conv_pwl", "bn3"))
        assert block.has_residual == before.has_residual
        assert (block.conv_pw is None) == (name == "blocks.0.0")  # t = 1: no expansion
        if kind != "dsconv":
            assert op.kernels == (3, 5, 7)
    for stage in model.blocks[2:]:
        for block in stage:
            assert type(block.conv_dw) is nn.Conv2d and type(block.conv_pwl) is nn.Conv2d
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_mobilenetv2_multiception_at_stl10_size_and_kernels_option() -> None:
    model = convzoo.create_model("cifar_mobilenetv2_x1_2", conv="multiception").eval()
    assert [model.get_submodule(f"{n}.conv_dw").out_channels for n in _MOBILENET_BLOCKS] == [24, 32, 32]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)
    custom = convzoo.create_model("cifar_mobilenetv2", conv="mixconv", conv_options={"kernels": (3, 5)})
    assert {m.kernels for m in custom.modules() if isinstance(m, MixConv2d)} == {(3, 5)}


def test_mobilenetv2_multiception_parameter_count_by_hand() -> None:
    # blocks.1.0 of cifar_mobilenetv2: 16 -> expand 96 -> 24. Standard block:
    #   conv_pw 16*96 = 1536, bn1 2*96 = 192, conv_dw 9*96 = 864, bn2 192, conv_pwl 96*24 = 2304, bn3 48 -> 5136.
    # Multiception (3, 5, 7) from 96 to 24 in place of conv_dw..bn3:
    #   depthwise 96*(9+25+49) = 7968, BN(288) 576, 1x1 288*24 + 24 = 6936, BN(24) 48 -> 15528; block 1536+192+15528.
    standard = convzoo.create_model("cifar_mobilenetv2")
    model = convzoo.create_model("cifar_mobilenetv2", conv="multiception")
    assert count_parameters(standard.blocks[1][0]) == 5136
    assert count_parameters(model.blocks[1][0].conv_dw) == multiception_parameter_count(96, 24, (3, 5, 7)) == 15528
    assert count_parameters(model.blocks[1][0]) == 1536 + 192 + 15528 == 17256
    # whole model: blocks.0.0 (32 -> 16): +2656+192+1552+32 - (288+64+512+32) = +3536;
    # blocks.1.0: +12120; blocks.1.1 (24 -> 144 -> 24): +11952+864+10392+48 - (1296+288+3456+48) = +18168.
    assert count_parameters(standard) == 2_236_682
    assert count_parameters(model) == 2_236_682 + 3536 + 12120 + 18168 == 2_270_506
    # DSConv: depthwise 9*C + 1x1 C*C_out + C_out + BN 2*C_out, no BN(C) between: -2*C + C_out per block.
    dsconv = convzoo.create_model("cifar_mobilenetv2", conv="dsconv")
    assert count_parameters(dsconv) == 2_236_682 + (-64 + 16) + (-192 + 24) + (-288 + 24) == 2_236_202


@pytest.mark.parametrize("kind", ["multiception", "dsconv", "mixconv"])
def test_mobilenetv2_preset_deploys_exactly_with_stride(kind) -> None:
    # The 224 network has stride 2 in blocks.1.0, which the CIFAR one does not: the preset keeps it.
    from convzoo.models.mobilenet import mobilenetv2

    torch.manual_seed(0)
    model = place_in_inverted_residuals(mobilenetv2(10, width=0.5), kind)
    assert model.blocks[1][0].conv_dw.stride == (2, 2) and model.blocks[1][1].has_residual
    model = randomize_batchnorm_(model.double()).eval()
    x = torch.randn(1, 3, 17, 17, dtype=torch.float64)  # odd size: the stride-2 steps round up
    deployed = convzoo.deploy(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-10, atol=1e-10)


def test_mobilenetv2_preset_deploys_exactly_at_cifar_size() -> None:
    model = convzoo.create_model("cifar_mobilenetv2", conv="multiception").double().eval()
    randomize_batchnorm_(model, generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(convzoo.deploy(model)(x), model(x), rtol=1e-10, atol=1e-10)


def test_mobilenetv2_replaced_block_is_expand_then_operator_plus_residual() -> None:
    # No activation is left between the operator and the sum, and the residual still applies.
    model = convzoo.create_model("cifar_mobilenetv2", conv="multiception").double().eval()
    randomize_batchnorm_(model)
    block = model.blocks[1][1]  # 24 -> 144 -> 24, stride 1: residual
    x = torch.randn(1, 24, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = x + block.conv_dw(torch.clamp(block.bn1(block.conv_pw(x)), 0, 6))
        torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


def test_mobilenetv2_preset_bad_input() -> None:
    with pytest.raises(ValueError, match="takes only 'kernels'"):
        convzoo.create_model("cifar_mobilenetv2", conv="multiception", conv_options={"schedule": "paper"})
    with pytest.raises(ValueError, match="dsconv takes no kernels"):
        convzoo.create_model("cifar_mobilenetv2", conv="dsconv", conv_options={"kernels": (3, 5)})
    with pytest.raises(ValueError, match="kernels must be odd"):
        convzoo.create_model("cifar_mobilenetv2", conv="multiception", conv_options={"kernels": (3, 4)})
    with pytest.raises(ValueError, match="kind must be one of .*got 'cac'"):
        place_in_inverted_residuals(convzoo.create_model("cifar_mobilenetv2"), "cac")
    with pytest.raises(ValueError, match="has no inverted-residual stages"):
        place_in_inverted_residuals(convzoo.create_model("cifar_resnet20"), "multiception")
    with pytest.raises(ValueError, match="plain conv_dw and conv_pwl"):
        place_in_inverted_residuals(convzoo.create_model("cifar_mobilenetv2", conv="dsconv"), "multiception")
