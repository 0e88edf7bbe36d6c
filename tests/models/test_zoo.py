"""The whole zoo: every model builds with every operator kind that applies to it and runs forward.

A kind applies to a model when the model has a placement preset for it, or when the kind may
convert by its own rule (``zoo_default``) and at least one conv of the model is one it replaces.
Any other kind must be refused with a clear error. Forward passes use batch 1 in eval mode;
ImageNet-size models run at 64x64 here and at their own input size in the slow suite.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import convzoo
from convzoo.models.registry import get_model_entry
from convzoo.ops.registry import _KINDS, ConvKind, get_conv_kind, needs_spatial_kernel

CIFAR = convzoo.list_models("cifar_*")
IMAGENET = [n for n in convzoo.list_models() if n not in CIFAR]
# Over 3 GMACs at 32x32: every kind still builds and runs here, at 16x16; at 32x32 in the slow suite.
HEAVY_CIFAR = {"cifar_resnext29_8x64d", "cifar_resnext29_16x64d", "cifar_shakeshake26_2x96d"}
# Over 20M parameters: building them once per kind takes most of a minute; slow suite only.
HEAVY_IMAGENET = {"resnet50", "resnet101", "densenet121"}


def _plain_convs(module: nn.Module) -> list[nn.Conv2d]:
    """The plain nn.Conv2d of a model, not looking inside convzoo operators (convert() does not)."""
    convs = []
    for child in module.children():
        if getattr(type(child), "convzoo_kind", None) is None:
            convs += [child] if type(child) is nn.Conv2d else _plain_convs(child)
    return convs


def _default_rule_applies(kind: str, model: nn.Module) -> bool:
    conv_kind = get_conv_kind(kind)
    return conv_kind.zoo_default and any(conv_kind.skip_reason(m) is None for m in _plain_convs(model))


@torch.no_grad()
def _check_model(name: str, size: int | None) -> None:
    entry = get_model_entry(name)
    input_size = entry.input_size if size is None else (entry.input_size[0], size, size)
    x = torch.randn(1, *input_size)
    standard = convzoo.create_model(name, num_classes=7).eval()
    assert standard(x).shape == (1, 7)
    for kind in convzoo.list_convs():
        if kind in entry.presets:  # a preset places the kind, or refuses the model with a clear error
            try:
                model = convzoo.create_model(name, conv=kind, num_classes=7)
            except ValueError as error:
                assert f"conv={kind!r} does not fit" in str(error), (name, kind, str(error))
                continue
        elif _default_rule_applies(kind, standard):
            model = convzoo.create_model(name, conv=kind, num_classes=7)
        else:
            with pytest.raises(ValueError, match=f"conv={kind!r} does not fit"):
                convzoo.create_model(name, conv=kind, num_classes=7)
            continue
        model.eval()
        assert any(getattr(type(m), "convzoo_kind", None) == kind for m in model.modules()), (name, kind)
        out = model(x)
        assert out.shape == (1, 7) and torch.isfinite(out).all(), (name, kind)


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_model_builds_and_runs_with_every_kind_that_applies(name: str) -> None:
    _check_model(name, 16 if name in HEAVY_CIFAR else None)


@pytest.mark.parametrize("name", [n for n in IMAGENET if n not in HEAVY_IMAGENET])
def test_imagenet_model_builds_and_runs_with_every_kind_that_applies_at_64px(name: str) -> None:
    _check_model(name, 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEAVY_CIFAR) + IMAGENET)
def test_model_runs_at_its_input_size_with_every_kind_that_applies(name: str) -> None:
    _check_model(name, None)


def test_zoo_has_every_network_the_issue_lists() -> None:
    expected = {
        *(f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110, 50)),
        *(f"cifar_preresnet{d}" for d in (20, 56, 110, 164, 200)),
        "cifar_plain20",
        "cifar_resnext29_8x64d",
        "cifar_resnext29_16x64d",
        "cifar_se_resnet56",
        "cifar_shakeshake26_2x96d",
        "cifar_densenet121",
        "cifar_shufflenetv2",
        "resnet18",
        "resnet50",
        "resnet101",
        "mobilenet_v2",
        "mobilenet_v2_x1_2",
        "densenet121",
        "shufflenet_v2_x1_0",
    }
    assert expected <= set(convzoo.list_models())


def test_building_any_cifar_model_takes_less_than_a_second() -> None:
    convzoo.create_model("cifar_resnet20")  # first-use imports are not build time
    slow = {}
    for name in CIFAR:
        start = time.perf_counter()
        convzoo.create_model(name)
        elapsed = time.perf_counter() - start
        if elapsed >= 1.0:
            slow[name] = round(elapsed, 2)
    assert not slow, f"models slower than 1 s to build: {slow}"


def test_a_selective_kind_without_preset_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    class Selective(nn.Conv2d):
        convzoo_kind = "selective_test"

    kind = ConvKind("selective_test", "test", Selective, needs_spatial_kernel, lambda conv: conv, zoo_default=False)
    monkeypatch.setitem(_KINDS, "selective_test", kind)
    with pytest.raises(ValueError, match="conv='selective_test' does not fit CifarDenseNet.*no placement preset"):
        convzoo.create_model("cifar_densenet121", conv="selective_test")


def test_multiception_on_densenet_is_refused_clearly() -> None:
    if "multiception" not in convzoo.list_convs():
        pytest.skip("the 'multiception' kind is not registered yet")
    with pytest.raises(ValueError, match="conv='multiception' does not fit"):
        convzoo.create_model("cifar_densenet121", conv="multiception")


def test_a_kind_that_replaces_nothing_is_refused_clearly() -> None:
    if "dds" not in convzoo.list_convs():
        pytest.skip("the 'dds' kind is not registered yet")
    with pytest.raises(ValueError, match="conv='dds' does not fit CifarPreResNet: .* depthwise convs"):
        convzoo.create_model("cifar_preresnet20", conv="dds")  # the paper's placement: depthwise convs only
    standard = convzoo.create_model("cifar_shufflenetv2")
    replaced = [
        name for name, _ in convzoo.conversion_report(convzoo.create_model("cifar_shufflenetv2", conv="dds")).replaced
    ]
    depthwise = [n for n, m in standard.named_modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert replaced == depthwise and len(replaced) == 3 * 2 + 13


@pytest.mark.parametrize(
    "name", ["cifar_preresnet20", "cifar_resnext29_8x64d", "cifar_se_resnet56", "cifar_shakeshake26_2x96d"]
)
def test_zero_init_residual_zeroes_the_last_bn_of_every_block(name: str) -> None:
    model = convzoo.create_model(name, zero_init_residual=True)
    last = "bn2" if name != "cifar_resnext29_8x64d" else "bn3"
    zeroed = [n for n, m in model.named_modules() if n.startswith("layer") and n.endswith("." + last)]
    assert zeroed and all(not model.get_submodule(n).weight.any() for n in zeroed)
    others = [m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and n not in zeroed]
    assert others and all(bool((m.weight == 1).all()) for m in others)


@pytest.mark.parametrize("name", ["cifar_densenet121", "cifar_shufflenetv2", "densenet121", "shufflenet_v2_x1_0"])
def test_zero_init_residual_is_refused_where_blocks_concatenate(name: str) -> None:
    with pytest.raises(ValueError, match="zero_init_residual=True does not apply"):
        convzoo.create_model(name, zero_init_residual=True)
