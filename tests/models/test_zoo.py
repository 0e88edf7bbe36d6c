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


def _applies(name: str, kind: str, model: nn.Module) -> bool:
    if kind in get_model_entry(name).presets:
        return True
    conv_kind = get_conv_kind(kind)
    return conv_kind.zoo_default and any(
        type(m) is nn.Conv2d and conv_kind.skip_reason(m) is None for m in model.modules()
    )


@torch.no_grad()
def _check_model(name: str, size: int | None) -> None:
    entry = get_model_entry(name)
    input_size = entry.input_size if size is None else (entry.input_size[0], size, size)
    x = torch.randn(1, *input_size)
    standard = convzoo.create_model(name, num_classes=7)
    assert standard.eval()(x).shape == (1, 7)
    for kind in convzoo.list_convs():
        if _applies(name, kind, standard):
            model = convzoo.create_model(name, conv=kind, num_classes=7).eval()
            assert any(getattr(type(m), "convzoo_kind", None) == kind for m in model.modules()), (name, kind)
            out = model(x)
            assert out.shape == (1, 7) and torch.isfinite(out).all(), (name, kind)
        else:
            with pytest.raises(ValueError, match=f"conv={kind!r} does not fit"):
                convzoo.create_model(name, conv=kind, num_classes=7)


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_model_builds_and_runs_with_every_kind_that_applies(name: str) -> None:
    _check_model(name, None)


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_model_builds_and_runs_with_every_kind_that_applies_at_64px(name: str) -> None:
    _check_model(name, 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_model_runs_at_its_input_size(name: str) -> None:
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
    with pytest.raises(ValueError, match="conv='dds' does not fit CifarPreResNet"):
        convzoo.create_model("cifar_preresnet20", conv="dds")  # no depthwise conv to replace


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
