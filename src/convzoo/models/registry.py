"""Model registry: ``create_model(name, conv=...)`` and ``list_models(pattern)``.

Entry points are registered with :func:`register_model`. ``conv=<kind>`` puts an
operator where that kind's paper put it: through the model's own placement preset
for that kind when it has one, otherwise by converting every conv the kind replaces.
Names prefixed ``tv:`` and ``timm:`` build torchvision / timm models (random weights;
nothing is downloaded).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from convzoo.convert import convert
from convzoo.ops.registry import check_callable, check_name, get_conv_kind

Preset = Callable[..., nn.Module]  # (model, **conv_options) -> model, converted in place


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder, default input size and per-kind placement presets."""

    name: str
    builder: Callable[..., nn.Module]
    input_size: tuple[int, int, int]
    presets: dict[str, Preset] = field(default_factory=dict)


_MODELS: dict[str, ModelEntry] = {}


def _check_input_size(input_size: object) -> tuple[int, int, int]:
    if not isinstance(input_size, tuple | list) or len(input_size) != 3:
        raise TypeError(f"input_size must be a (C, H, W) tuple of 3 positive ints, got {input_size!r}")
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in input_size):
        raise ValueError(f"input_size must be a (C, H, W) tuple of 3 positive ints, got {input_size!r}")
    return tuple(input_size)  # type: ignore[return-value]


def _check_presets(presets: object) -> dict[str, Preset]:
    if presets is None:
        return {}
    if not isinstance(presets, Mapping):
        raise TypeError(f"presets must be a dict of conv kind -> preset function, got {presets!r}")
    for kind, preset in presets.items():
        check_name(kind, "presets key (a conv kind)")
        check_callable(preset, f"presets[{kind!r}]")
    return dict(presets)


def register_model(
    name: str | None = None,
    *,
    input_size: tuple[int, int, int] = (3, 32, 32),
    presets: dict[str, Preset] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model builder ``fn(num_classes=..., **kw) -> nn.Module``.

    Args:
        name: the registry key (default: the builder's ``__name__``).
        input_size: (C, H, W) of one input image.
        presets: conv kind -> placement preset ``(model, **conv_options) -> model``.

    Raises:
        TypeError: ``name`` is not a non-empty str, ``input_size`` not 3 ints, a preset or the
            builder not callable.
        ValueError: ``name`` is already registered (built-in names cannot be replaced; pick another).
    """
    if name is not None:
        check_name(name, "model name")
    size = _check_input_size(input_size)
    preset_map = _check_presets(presets)

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        check_callable(fn, f"the model builder registered as {name!r}" if name else "the model builder")
        key = name if name is not None else getattr(fn, "__name__", None)
        if not isinstance(key, str) or not key or key == "<lambda>":
            raise TypeError(f"register_model() needs a name for builder {fn!r}, which has no usable __name__")
        existing = _MODELS.get(key)
        if existing is not None and existing.builder is not fn:
            raise ValueError(
                f"model {key!r} is already registered (builder {getattr(existing.builder, '__qualname__', '?')}); "
                "register yours under another name"
            )
        kept = existing.presets if existing is not None else {}  # the same builder again: keep its presets
        _MODELS[key] = ModelEntry(key, fn, size, {**kept, **preset_map})
        return fn

    return decorator


def add_preset(model_names: str | list[str], kind: str, preset: Preset) -> None:
    """Attach a placement preset for ``kind`` to already registered models (globs allowed)."""
    patterns = [model_names] if isinstance(model_names, str) else model_names
    if not isinstance(patterns, list | tuple):
        raise TypeError(f"model_names must be a glob string or a list of them, got {model_names!r}")
    if not patterns:
        raise ValueError("model_names must be a glob string or a non-empty list of them, got []")
    for pattern in patterns:
        check_name(pattern, "model name pattern")
    check_name(kind, "kind")
    check_callable(preset, "preset")
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

    Raises:
        TypeError: ``name`` or ``conv`` is not a str, ``conv_options`` not a dict with str keys.
        ValueError: an unknown model or kind, a bad ``num_classes``, or a kind that does not fit the model.
    """
    if not isinstance(name, str):
        raise TypeError(
            f"name must be a model name (str) from convzoo.list_models(), 'tv:<name>' or 'timm:<name>', got {name!r}"
        )
    if not isinstance(conv, str):
        raise TypeError(f"conv must be 'standard' or a conv kind (str) from convzoo.list_convs(), got {conv!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    conv_options = kwargs.pop("conv_options", None)
    if conv_options is None:
        conv_options = {}
    if not isinstance(conv_options, Mapping) or not all(isinstance(k, str) for k in conv_options):
        raise TypeError(f"conv_options must be a dict of operator options (str keys) or None, got {conv_options!r}")
    conv_options = dict(conv_options)
    if conv != "standard":
        get_conv_kind(conv)  # fail fast on an unknown kind, before building anything
    if name.startswith(("tv:", "timm:")):
        model = _external_model(name, num_classes, **kwargs)
        return apply_conv(model, conv, {}, **conv_options)
    entry = get_model_entry(name)
    model = entry.builder(num_classes=num_classes, **kwargs)
    return apply_conv(model, conv, entry.presets, **conv_options)
