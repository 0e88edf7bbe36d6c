"""Registry of operator kinds: which ``nn.Conv2d`` each replaces and how to build it.

A kind is registered with the :func:`register_conv` class decorator::

    @register_conv("doconv", description="...", skip_reason=needs_spatial_kernel)
    class DOConv2d(nn.Module):
        @classmethod
        def from_conv(cls, conv: nn.Conv2d, **options) -> "DOConv2d": ...

``skip_reason(conv)`` returns ``None`` when the kind can replace ``conv`` and
otherwise a short sentence saying why not; conversion reports show it.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from convzoo.ops.conv_spec import ConvSpec, check_bool

SkipReason = Callable[[nn.Conv2d], "str | None"]
ConvFactory = Callable[..., nn.Module]


class ConvNotReplaceableError(ValueError):
    """Raised by a kind's ``from_conv`` when this conv cannot be replaced with these options (too few channels
    for MixConv's kernels or the pyramid's dilations, ...): ``convert()`` skips and reports the conv, as it does
    for ``skip_reason``, instead of failing the whole conversion. A ``ValueError`` for direct callers."""


# ------------------------------------------------------------ argument checks
# Shared by the registries, convert() / deploy(), profiling and viz (this module imports only
# conv_spec of convzoo's, so they import these without a cycle). Flags: conv_spec.check_bool.
def check_name(value: object, name: str) -> str:
    """Check a registry key (or glob) is a non-empty str and return it."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a non-empty str, got {value!r}")
    if not value:
        raise ValueError(f"{name} must be a non-empty str, got {value!r}")
    return value


def check_callable(value: object, name: str) -> None:
    """Check ``value`` is callable."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {value!r}")


def check_module(value: object, name: str = "model") -> nn.Module:
    """Check ``value`` is an ``nn.Module`` and return it."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class ConvKind:
    """One operator kind.

    Attributes:
        name: the kind key, e.g. ``"doconv"``.
        description: one line for ``list_convs()``.
        module_cls: the operator's module class.
        skip_reason: ``conv -> None`` if replaceable, else the reason it is skipped.
        from_conv: ``(conv, **options) -> module`` building the operator from ``conv``.
        zoo_default: whether ``create_model(..., conv=name)`` may fall back to converting
            every conv the kind replaces when the model has no placement preset for it.
            False for kinds whose paper places them selectively (e.g. Multiception).
        exact_weight: whether the operator's ``weight`` and ``bias`` (with ``nn.Conv2d``'s geometry
            attributes) are its whole function, so that a parent block that folds its convs itself
            from ``conv.weight`` (timm's RepVGG / MobileOne / LeViT blocks, YOLO's ``fuse()``) folds it
            right (DO-Conv). ``convert()`` skips the other kinds inside such blocks.
    """

    name: str
    description: str
    module_cls: type[nn.Module]
    skip_reason: SkipReason
    from_conv: ConvFactory
    zoo_default: bool = True
    exact_weight: bool = False


_KINDS: dict[str, ConvKind] = {}


def register_conv(
    name: str,
    *,
    description: str,
    skip_reason: SkipReason,
    from_conv: ConvFactory | None = None,
    zoo_default: bool = True,
    exact_weight: bool = False,
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering an operator kind.

    The class gains a ``convzoo_kind`` attribute, which is how ``convert()`` tells
    an already converted layer from a plain one. ``from_conv`` defaults to the
    class's ``from_conv`` classmethod.

    Raises:
        TypeError: ``name`` is not a non-empty str, ``description`` not a str, ``skip_reason`` or
            ``from_conv`` not callable, ``zoo_default`` / ``exact_weight`` not a bool, or the decorated object not an
            ``nn.Module`` subclass.
        ValueError: ``name`` is already registered by another class.
    """
    check_name(name, "conv kind name")
    if not isinstance(description, str):
        raise TypeError(f"description must be a str, got {description!r}")
    check_callable(skip_reason, "skip_reason")
    if from_conv is not None:
        check_callable(from_conv, "from_conv")
    check_bool(zoo_default, "zoo_default")
    check_bool(exact_weight, "exact_weight")

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_conv({name!r}) decorates an nn.Module subclass, got {cls!r}")
        if name in _KINDS and _KINDS[name].module_cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"conv kind {name!r} is already registered by {_KINDS[name].module_cls.__name__}")
        factory = from_conv if from_conv is not None else getattr(cls, "from_conv", None)
        if factory is None:
            raise TypeError(f"{cls.__name__} needs a from_conv classmethod to be registered as {name!r}")
        cls.convzoo_kind = name
        _KINDS[name] = ConvKind(name, description, cls, skip_reason, factory, zoo_default, exact_weight)
        return cls

    return decorator


def get_conv_kind(name: str) -> ConvKind:
    """Look up a kind; an unknown name gets a ValueError listing the known kinds."""
    if not isinstance(name, str):
        raise TypeError(f"kind must be a str, got {type(name).__name__}")
    try:
        return _KINDS[name]
    except KeyError:
        known = ", ".join(sorted(_KINDS))
        raise ValueError(f"unknown conv kind {name!r}; known kinds: {known}") from None


def list_convs(pattern: str = "*") -> dict[str, str]:
    """Registered kinds matching a glob, each with its one-line description."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a glob string, got {pattern!r}")
    return {name: _KINDS[name].description for name in sorted(_KINDS) if fnmatch.fnmatch(name, pattern)}


def operator_kind(module: nn.Module) -> str | None:
    """The kind key of a convzoo operator module, or None for any other module."""
    return getattr(type(module), "convzoo_kind", None)


FOLD_METHODS = ("fuse", "reparameterize", "switch_to_deploy")
"""The deploy-form protocol of ``timm.utils.reparameterize_model`` (and ``convzoo.deploy``), in its order."""


def fold_method(module: nn.Module) -> str | None:
    """The method by which a module that is not a convzoo operator folds its own children (timm's RepVGG
    ``reparameterize()``, LeViT's ``fuse()``, ...), or None. Such a block builds its folded conv from each
    child conv's ``weight``, so it folds only ``exact_weight`` operators right."""
    if operator_kind(module) is not None:
        return None
    return next((method for method in FOLD_METHODS if has_method(module, method)), None)


def has_method(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s class defines a method ``name`` (a child module or a callable attribute of that
    name, such as a segmentation net's ``self.fuse = nn.Conv2d(...)``, is not one)."""
    value = inspect.getattr_static(type(module), name, None)
    if isinstance(value, staticmethod | classmethod):
        value = value.__func__
    return inspect.isfunction(value)


# ---------------------------------------------------------------- predicates
def needs_spatial_kernel(conv: nn.Conv2d) -> str | None:
    """Replace every k x k conv with k > 1 (any groups); skip 1 x 1."""
    if tuple(conv.kernel_size) == (1, 1):
        return "1x1 kernel: no spatial patch"
    return None


def needs_pointwise(conv: nn.Conv2d) -> str | None:
    """Replace unpadded 1 x 1 convs with groups == 1 only."""
    if tuple(conv.kernel_size) != (1, 1):
        return f"kernel {tuple(conv.kernel_size)} is not 1x1"
    if conv.groups != 1:
        return f"grouped pointwise conv (groups={conv.groups})"
    if ConvSpec.from_conv(conv).explicit_padding != (0, 0, 0, 0):  # 'same' on a 1x1 pads nothing
        return f"padded pointwise conv (padding={conv.padding!r})"
    return None


def needs_dense_spatial(conv: nn.Conv2d) -> str | None:
    """Replace k x k convs with k > 1 and groups == 1."""
    reason = needs_spatial_kernel(conv)
    if reason is None and conv.groups != 1:
        reason = f"grouped conv (groups={conv.groups}); this kind replaces dense convs"
    return reason


def needs_depthwise(conv: nn.Conv2d) -> str | None:
    """Replace depthwise k x k convs (groups == in_channels == out_channels, k > 1)."""
    reason = needs_spatial_kernel(conv)
    if reason is None and not (conv.groups == conv.in_channels == conv.out_channels):
        reason = f"not depthwise (groups={conv.groups}, in={conv.in_channels}, out={conv.out_channels})"
    return reason
