"""Build zoo models without paying for weight initialization twice.

``nn.Conv2d`` and ``nn.Linear`` initialize their weights when constructed, and the zoo then
re-initializes every conv (He init, see :mod:`convzoo.models.init`). For the big CIFAR models
(ResNeXt-29 16x64d has 68M parameters) the first pass alone costs about a second, so zoo
builders construct the model on the ``meta`` device, allocate it where it is wanted with
``to_empty`` and initialize each tensor exactly once with the model's ``reset_parameters()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import nn

from convzoo.models.init import init_weights
from convzoo.ops.conv_spec import check_bool

M = TypeVar("M", bound=nn.Module)


def reset_zoo_parameters_(
    model: nn.Module, *, zero_init_last_bn: bool = False, last_bn_names: Iterable[str] = ("bn2",)
) -> None:
    """Initialize every parameter and buffer of a zoo model made of convs, norms and linears.

    BatchNorm running statistics are reset, linears get torch's default init, and convs / norm
    affines get :func:`convzoo.models.init.init_weights` (He fan-out init; with
    ``zero_init_last_bn`` the BNs named in ``last_bn_names`` start with gamma 0).

    Raises:
        TypeError: a module holds its own parameters or buffers but is none of the known kinds
            and has no ``reset_parameters()`` (it would keep uninitialized memory).

    On the meta device there is nothing to initialize, and this returns at once.
    """
    if any(p.is_meta for p in model.parameters()):
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
        elif isinstance(module, nn.Linear):
            module.reset_parameters()
        elif module is not model and not isinstance(module, nn.Conv2d | nn.GroupNorm):
            owns_tensors = any(True for _ in module.parameters(recurse=False)) or any(
                True for _ in module.buffers(recurse=False)
            )
            if owns_tensors:
                reset = getattr(module, "reset_parameters", None)
                if not callable(reset):
                    raise TypeError(
                        f"{type(module).__name__} holds tensors but has no reset_parameters(); "
                        "reset_zoo_parameters_ cannot initialize it"
                    )
                reset()
    init_weights(model, zero_init_last_bn=zero_init_last_bn, last_bn_names=last_bn_names)


def materialize(
    factory: Callable[[], M], *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> M:
    """Construct ``factory()`` on the meta device, then allocate and initialize it once.

    Args:
        factory: builds the model; the model must define ``reset_parameters()`` initializing
            every parameter and buffer it owns (see :func:`reset_zoo_parameters_`).
        device: where to allocate (default: torch's default device).
        dtype: floating dtype of parameters and buffers (default: torch's default dtype).

    Returns:
        The model in training mode on ``device`` with freshly initialized weights.
    """
    with torch.device("meta"):
        model = factory()
    reset = getattr(model, "reset_parameters", None)
    if not callable(reset):
        raise TypeError(f"{type(model).__name__} must define reset_parameters() to be materialized")
    model.to_empty(device=torch.get_default_device() if device is None else device)
    if dtype is not None:
        model.to(_floating(dtype))
    reset()
    return model


def _floating(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    return dtype


def place(model: M, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> M:
    """Move a model built (and initialized) on the default device to ``device`` / ``dtype``.

    For the small zoo models that initialize in their constructor (CIFAR ResNets, MobileNets), where
    building twice costs little; the big ones use :func:`materialize`.
    """
    if dtype is not None:
        model.to(_floating(dtype))
    if device is not None:
        model.to(device)
    return model


def reject_zero_init_residual(zero_init_residual: bool, model: str) -> None:
    """Raise for ``zero_init_residual=True`` on a model whose blocks have no residual sum.

    Zeroing a block's last BN makes a residual block start as the identity; in a block that
    concatenates (DenseNet, ShuffleNetV2) it would only silence features, so it is an error.

    Raises:
        TypeError: ``zero_init_residual`` is not a bool.
        ValueError: it is True.
    """
    if check_bool(zero_init_residual, "zero_init_residual"):
        raise ValueError(
            f"zero_init_residual=True does not apply to {model}: its blocks concatenate instead of adding "
            "a residual, so zeroing a BN would only silence features"
        )
