"""Model registry: ``create_model(name, conv=...)`` and ``list_models(pattern)``.

Entry points are registered with :func:`register_model`. ``conv=<kind>`` puts an
operator where that kind's paper put it: through the model's own placement preset
for that kind when it has one, otherwise by converting every conv the kind replaces.
Names prefixed ``tv:`` and ``timm:`` build torchvision / timm models (random weights;
nothing is downloaded).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from convzoo.convert import convert
from convzoo.ops.registry import get_conv_kind

Preset = Callable[..., nn.Module]  # (model, **conv_options) -> model, converted in place


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder, default input size and per-kind placement presets."""

    name: str
    builder: Callable[..., nn.Module]
    input_size: tuple[int, int, int]
    presets: dict[str, Preset] = field(default_factory=dict)


_MODELS: dict[str, ModelEntry] = {}


def register_model(
    name: str | None = None,
    *,
    input_size: tuple[int, int, int] = (3, 32, 32),
    presets: dict[str, Preset] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model builder ``fn(num_classes=..., **kw) -> nn.Module``."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        _MODELS[key] = ModelEntry(key, fn, input_size, dict(presets or {}))
        return fn

    return decorator


def add_preset(model_names: str | list[str], kind: str, preset: Preset) -> None:
    """Attach a placement preset for ``kind`` to already registered models (globs allowed)."""
    patterns = [model_names] if isinstance(model_names, str) else model_names
    for pattern in patterns:
        matched = [n for n in _MODELS if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(f"add_preset: no registered model matches {pattern!r}")
        for model_name in matched:
            _MODELS[model_name].presets[kind] = preset


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob, e.g. ``list_models("cifar_*")``."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a glob string, got {pattern!r}")
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; an unknown name gets a ValueError listing the known ones."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {name!r}")
    if name not in _MODELS:
        close = [n for n in _MODELS if name.split("_")[0] in n][:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint}; see convzoo.list_models(), or use 'tv:<torchvision name>' "
            "or 'timm:<timm name>'"
        )
    return _MODELS[name]


def _external_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    source, _, model_name = name.partition(":")
    if source == "tv":
        import torchvision

        if model_name not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision model {model_name!r}; see torchvision.models.list_models()")
        return torchvision.models.get_model(model_name, weights=None, num_classes=num_classes, **kwargs)
    import timm

    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r}; see timm.list_models()")
    return timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)


def apply_conv(model: nn.Module, conv: str, presets: dict[str, Preset], **conv_options: Any) -> nn.Module:
    """Place operator ``conv`` in ``model`` in place, by preset or by the kind's own rule."""
    if conv == "standard":
        if conv_options:
            raise ValueError(f"conv='standard' takes no conv options, got {sorted(conv_options)}")
        return model
    kind = get_conv_kind(conv)
    if conv in presets:
        return presets[conv](model, **conv_options)
    if not kind.zoo_default:
        raise ValueError(
            f"conv={conv!r} does not fit {type(model).__name__}: its paper places it selectively and this "
            f"model has no placement preset for it (models with one: "
            f"{', '.join(n for n, e in _MODELS.items() if conv in e.presets) or 'none'})"
        )
    try:
        return convert(model, conv, inplace=True, strict=True, **conv_options)
    except ValueError as error:
        raise ValueError(f"conv={conv!r} does not fit {type(model).__name__}: {error}") from None


def create_model(name: str, conv: str = "standard", num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a model with operator ``conv`` placed where its paper placed it.

    Args:
        name: a registered name (``list_models()``), ``"tv:<name>"`` or ``"timm:<name>"``.
        conv: ``"standard"`` or an operator kind (``list_convs()``).
        num_classes: size of the classifier.
        **kwargs: model options; ``conv_options`` (a dict) is passed to the operator.

    Returns:
        The model in training mode, with random weights.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    conv_options = dict(kwargs.pop("conv_options", None) or {})
    if conv != "standard":
        get_conv_kind(conv)  # fail fast on an unknown kind, before building anything
    if name.startswith(("tv:", "timm:")):
        model = _external_model(name, num_classes, **kwargs)
        return apply_conv(model, conv, {}, **conv_options)
    entry = get_model_entry(name)
    model = entry.builder(num_classes=num_classes, **kwargs)
    return apply_conv(model, conv, entry.presets, **conv_options)
