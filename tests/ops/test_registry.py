"""The operator-kind registry: the registered kinds, register_conv / list_convs argument checks, shared checks."""

from __future__ import annotations

import pytest
from torch import nn

import convzoo
from convzoo.ops import registry
from convzoo.ops.registry import check_callable, check_module, check_name, needs_pointwise, needs_spatial_kernel

# The table of /work/shared/ARCHITECTURE.md: kind key -> module class.
ARCHITECTURE_KINDS = {
    "doconv": "DOConv2d",
    "cpwc": "CPWConv2d",
    "multiception": "MulticeptionConv2d",
    "dsconv": "DSConv2d",
    "mixconv": "MixConv2d",
    "dds": "DilatedSeparableConv2d",
    "pyramid": "PyramidDilatedConv2d",
    "cac": "CAConv2d",
}


def test_list_convs_is_exactly_the_architecture_table() -> None:
    kinds = convzoo.list_convs()
    assert sorted(kinds) == sorted(ARCHITECTURE_KINDS)
    assert {name: registry.get_conv_kind(name).module_cls.__name__ for name in kinds} == ARCHITECTURE_KINDS
    assert all(isinstance(d, str) and d for d in kinds.values())
    assert list(convzoo.list_convs("d*")) == ["dds", "doconv", "dsconv"]


@pytest.fixture
def kinds(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A private copy of the kind registry, so a test registration does not leak."""
    copy = dict(registry._KINDS)
    monkeypatch.setattr(registry, "_KINDS", copy)
    return copy


def _operator() -> type[nn.Module]:
    class Operator(nn.Module):
        @classmethod
        def from_conv(cls, conv: nn.Conv2d) -> Operator:
            return cls()

    return Operator


def test_register_conv_accepts_a_valid_kind(kinds: dict) -> None:
    cls = registry.register_conv("test_kind", description="a test", skip_reason=needs_spatial_kernel)(_operator())
    assert cls.convzoo_kind == "test_kind" and "test_kind" in convzoo.list_convs()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": 5}, TypeError, "conv kind name must be a non-empty str, got 5"),
        ({"name": ""}, ValueError, "conv kind name must be a non-empty str, got ''"),
        ({"description": None}, TypeError, "description must be a str, got None"),
        ({"skip_reason": "3x3"}, TypeError, "skip_reason must be callable, got '3x3'"),
        ({"from_conv": 5}, TypeError, "from_conv must be callable, got 5"),
        ({"zoo_default": "no"}, TypeError, "zoo_default must be a bool, got 'no'"),
        ({"exact_weight": 1}, TypeError, "exact_weight must be a bool, got 1"),
    ],
)
def test_register_conv_bad_arguments(kinds: dict, kwargs: dict, error: type[Exception], match: str) -> None:
    arguments = {"name": "test_kind", "description": "a test", "skip_reason": needs_spatial_kernel, **kwargs}
    name = arguments.pop("name")
    with pytest.raises(error, match=match):
        registry.register_conv(name, **arguments)(_operator())
    assert sorted(registry._KINDS) == sorted(ARCHITECTURE_KINDS)  # nothing was registered
    convzoo.list_convs()  # and listing still works


def test_register_conv_decorates_module_classes_only(kinds: dict) -> None:
    decorator = registry.register_conv("test_kind", description="a test", skip_reason=needs_spatial_kernel)
    with pytest.raises(TypeError, match=r"register_conv\('test_kind'\) decorates an nn.Module subclass, got 5"):
        decorator(5)
    with pytest.raises(TypeError, match="decorates an nn.Module subclass, got <function"):
        decorator(lambda conv: conv)


def test_register_conv_refuses_a_taken_name(kinds: dict) -> None:
    with pytest.raises(ValueError, match="conv kind 'doconv' is already registered by DOConv2d"):
        registry.register_conv("doconv", description="a test", skip_reason=needs_spatial_kernel)(_operator())


def test_list_convs_needs_a_glob_string() -> None:
    with pytest.raises(TypeError, match="pattern must be a glob string, got 5"):
        convzoo.list_convs(5)


def test_shared_checks() -> None:
    assert check_name("x", "key") == "x"
    with pytest.raises(TypeError, match="key must be a non-empty str, got None"):
        check_name(None, "key")
    check_callable(len, "fn")
    with pytest.raises(TypeError, match="fn must be callable, got 3"):
        check_callable(3, "fn")
    module = nn.ReLU()
    assert check_module(module) is module
    with pytest.raises(TypeError, match="net must be an nn.Module, got str"):
        check_module("resnet", "net")


@pytest.mark.parametrize(
    ("padding", "reason"),
    [(0, None), ("valid", None), ("same", None), ((0, 1), "padded pointwise conv (padding=(0, 1))")],
)
def test_needs_pointwise_skips_padded_1x1_only(padding: object, reason: str | None) -> None:
    """'same' on a 1x1 conv pads nothing: CPWC replaces it; a padded 1x1 is skipped, not an error."""
    assert needs_pointwise(nn.Conv2d(4, 4, 1, padding=padding)) == reason
