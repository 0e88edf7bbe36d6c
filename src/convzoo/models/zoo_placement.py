"""Paper placements that a kind's own conversion rule does not give on every zoo model.

DDS replaces the *depthwise* convs of a network (the paper builds on MobileNetV2), but the
``dds`` kind can also replace dense k x k convs, and ``create_model(conv="dds")`` would fall back
to that rule on models without a preset. Here every registered model that has no ``dds`` preset
of its own gets one that converts only its depthwise convs, and refuses, with a clear error, a
model that has none (the ResNets, DenseNet, ...). Import this module after every model family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from convzoo.convert import convert
from convzoo.models.registry import _MODELS, add_preset
from convzoo.ops.registry import operator_kind

DEPTHWISE_KINDS = ("dds",)


def is_depthwise(conv: nn.Module) -> bool:
    """A k x k (k > 1) conv with groups == in_channels == out_channels."""
    return (
        isinstance(conv, nn.Conv2d)
        and tuple(conv.kernel_size) != (1, 1)
        and conv.groups == conv.in_channels == conv.out_channels
    )


def _plain_depthwise_convs(module: nn.Module, prefix: str = "") -> list[str]:
    """Names of the plain depthwise ``nn.Conv2d``s, not looking inside convzoo operators."""
    names = []
    for name, child in module.named_children():
        if operator_kind(child) is not None:
            continue
        if type(child) is nn.Conv2d:
            if is_depthwise(child):
                names.append(prefix + name)
        else:
            names += _plain_depthwise_convs(child, f"{prefix}{name}.")
    return names


def depthwise_preset(kind: str) -> Callable[..., nn.Module]:
    """A preset converting exactly the depthwise convs of a model to ``kind``."""

    def preset(model: nn.Module, **options: Any) -> nn.Module:
        names = _plain_depthwise_convs(model)
        if not names:
            raise ValueError(
                f"conv={kind!r} does not fit {type(model).__name__}: its paper replaces depthwise convs "
                "and this model has no plain depthwise nn.Conv2d"
            )
        return convert(model, kind, include=names, inplace=True, strict=True, **options)

    return preset


def add_depthwise_presets() -> None:
    """Give every registered model without its own preset for a depthwise kind the depthwise preset."""
    for kind in DEPTHWISE_KINDS:
        names = [name for name, entry in _MODELS.items() if kind not in entry.presets]
        if names:
            add_preset(names, kind, depthwise_preset(kind))


add_depthwise_presets()
