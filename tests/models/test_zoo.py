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
from convzoo.models import registry as model_registry
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
    with pytest.raises(ValueError, match="conv='multiception' does not fit"):
        convzoo.create_model("cifar_densenet121", conv="multiception")


def test_a_kind_that_replaces_nothing_is_refused_clearly() -> None:
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


# ---------------------------------------------------------------------------- registry argument checks
@pytest.fixture
def models(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A private copy of the model registry, so a test registration does not leak."""
    copy = dict(model_registry._MODELS)
    monkeypatch.setattr(model_registry, "_MODELS", copy)
    return copy


def _builder(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))


def test_register_model_accepts_a_valid_builder(models: dict) -> None:
    convzoo.register_model("test_valid", input_size=[1, 8, 8])(_builder)
    assert get_model_entry("test_valid").input_size == (1, 8, 8)
    convzoo.register_model()(_builder)  # the builder's own name
    assert "_builder" in convzoo.list_models("_b*")
    model_registry.add_preset("test_valid", "doconv", lambda model, **options: model)
    convzoo.register_model("test_valid")(_builder)  # the same builder again: idempotent, presets kept
    assert list(get_model_entry("test_valid").presets) == ["doconv"]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: convzoo.register_model(5)(_builder), TypeError, "model name must be a non-empty str, got 5"),
        (lambda: convzoo.register_model("")(_builder), ValueError, "model name must be a non-empty str, got ''"),
        (
            lambda: convzoo.register_model("cifar_resnet20")(_builder),
            ValueError,
            "model 'cifar_resnet20' is already registered .*register yours under another name",
        ),
        (
            lambda: convzoo.register_model("test_x")(5),
            TypeError,
            "the model builder registered as 'test_x' must be callable, got 5",
        ),
        (lambda: convzoo.register_model()(lambda num_classes=10: nn.ReLU()), TypeError, "needs a name for builder"),
        (
            lambda: convzoo.register_model("test_x", input_size="x"),
            TypeError,
            r"input_size must be a \(C, H, W\) tuple of 3 positive ints, got 'x'",
        ),
        (
            lambda: convzoo.register_model("test_x", input_size=(3, 0, 32)),
            ValueError,
            r"input_size must be a \(C, H, W\) tuple of 3 positive ints, got \(3, 0, 32\)",
        ),
        (lambda: convzoo.register_model("test_x", presets=[1]), TypeError, "presets must be a dict"),
        (
            lambda: convzoo.register_model("test_x", presets={"doconv": 5}),
            TypeError,
            r"presets\['doconv'\] must be callable, got 5",
        ),
        (lambda: model_registry.add_preset(5, "doconv", len), TypeError, "model_names must be a glob string"),
        (lambda: model_registry.add_preset([], "doconv", len), ValueError, "non-empty list of them, got"),
        (lambda: model_registry.add_preset("cifar_*", None, len), TypeError, "kind must be a non-empty str"),
        (lambda: model_registry.add_preset("cifar_*", "doconv", 5), TypeError, "preset must be callable, got 5"),
    ],
)
def test_register_model_bad_arguments(models: dict, call, error: type[Exception], match: str) -> None:
    before = dict(models)
    with pytest.raises(error, match=match):
        call()
    assert models == before  # nothing registered or replaced
    assert convzoo.list_models() == sorted(before)  # and listing still works


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": None}, TypeError, "name must be a model name .*got None"),
        ({"name": 5}, TypeError, "name must be a model name .*got 5"),
        ({"conv": 5}, TypeError, r"conv must be 'standard' or a conv kind \(str\).*got 5"),
        ({"conv": "doconv", "conv_options": 5}, TypeError, "conv_options must be a dict .*got 5"),
        ({"conv": "doconv", "conv_options": [1]}, TypeError, r"conv_options must be a dict .*got \[1\]"),
        ({"conv": "doconv", "conv_options": {1: 2}}, TypeError, r"conv_options must be a dict .*str keys"),
        ({"num_classes": True}, ValueError, "num_classes must be a positive int, got True"),
    ],
)
def test_create_model_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    arguments = {"name": "cifar_resnet20", **kwargs}
    with pytest.raises(error, match=match):
        convzoo.create_model(**arguments)


def test_create_model_takes_conv_options_none_or_empty() -> None:
    for options in (None, {}):
        model = convzoo.create_model("cifar_resnet20", conv="doconv", conv_options=options)
        assert any(isinstance(m, convzoo.DOConv2d) for m in model.modules())


def _builders_from(*modules: str) -> list[str]:
    """Registered names whose builder is defined in one of ``modules`` (under convzoo.models)."""
    names = [f"convzoo.models.{module}" for module in modules]
    return [n for n in convzoo.list_models() if get_model_entry(n).builder.__module__ in names]


# every network convzoo implements (torchvision's builders take no in_channels)
OWN_NETWORKS = _builders_from(
    "cifar_densenet",
    "cifar_preresnet",
    "cifar_resnet",
    "cifar_resnext",
    "cifar_se_resnet",
    "cifar_shakeshake",
    "cifar_shufflenetv2",
    "mobilenet",
)
# every network with a zero_init_residual option (convzoo's MobileNets have none)
ZERO_INIT_NETWORKS = [n for n in OWN_NETWORKS if n not in _builders_from("mobilenet")] + _builders_from(
    "torchvision_models"
)


@pytest.mark.parametrize("name", OWN_NETWORKS)
@pytest.mark.parametrize(
    ("in_channels", "error"), [(0, ValueError), (-1, ValueError), (True, TypeError), ("3", TypeError), (3.0, TypeError)]
)
def test_in_channels_must_be_a_positive_int(name: str, in_channels: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=f"in_channels must be a positive int, got {in_channels!r}"):
        convzoo.create_model(name, in_channels=in_channels)


@pytest.mark.parametrize("name", ZERO_INIT_NETWORKS)
@pytest.mark.parametrize("value", ["no", 1, None])
def test_zero_init_residual_must_be_a_bool(name: str, value: object) -> None:
    with pytest.raises(TypeError, match=f"zero_init_residual must be a bool, got {value!r}"):
        convzoo.create_model(name, zero_init_residual=value)


def test_the_network_classes_check_their_options_too() -> None:
    from convzoo.models.cifar_resnet import CifarResNet

    with pytest.raises(TypeError, match="zero_init_residual must be a bool, got 'no'"):
        CifarResNet(1, zero_init_residual="no")
    model = CifarResNet(1, in_channels=1, zero_init_residual=True)
    assert model.conv1.in_channels == 1 and float(model.layer1[0].bn2.weight.detach().abs().sum()) == 0
    assert tuple(model(torch.randn(2, 1, 8, 8)).shape) == (2, 10)
