"""ImageNet-size networks the papers train, registered under plain names and built by torchvision.

Nothing is re-implemented: each entry calls ``torchvision.models.get_model(name, weights=None)``
(random weights, nothing downloaded) with torchvision's own initialization. ``mobilenet_v2_x1_2``
is MobileNetV2 at width 1.2, CPWC's wider baseline. ``zero_init_residual=True`` zeroes the last
BN gamma of every residual block (torchvision's option for ResNets; done here for MobileNetV2's
inverted residuals) and is rejected for DenseNet and ShuffleNetV2, which have no residual sums.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from convzoo.models.materialize import reject_zero_init_residual
from convzoo.models.registry import register_model
from convzoo.ops.conv_spec import check_bool

IMAGENET_INPUT = (3, 224, 224)


def _zero_init_inverted_residuals_(model: nn.Module) -> None:
    from torchvision.models.mobilenetv2 import InvertedResidual

    for module in model.modules():
        if isinstance(module, InvertedResidual) and module.use_res_connect:
            last_bn = module.conv[-1]
            if not isinstance(last_bn, nn.BatchNorm2d):
                raise TypeError(f"expected the inverted residual to end in BatchNorm2d, got {type(last_bn).__name__}")
            nn.init.zeros_(last_bn.weight)


def _torchvision(
    tv_name: str,
    num_classes: int,
    *,
    zero_init_residual: bool,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    **kwargs: Any,
) -> nn.Module:
    import torchvision

    check_bool(zero_init_residual, "zero_init_residual")
    if tv_name.startswith("resnet"):
        kwargs["zero_init_residual"] = zero_init_residual
    elif not tv_name.startswith("mobilenet_v2"):
        reject_zero_init_residual(zero_init_residual, tv_name)
    model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
    if tv_name.startswith("mobilenet_v2") and zero_init_residual:
        _zero_init_inverted_residuals_(model)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _register(name: str, tv_name: str, description: str, **defaults: Any) -> None:
    def builder(
        num_classes: int = 1000,
        *,
        zero_init_residual: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        return _torchvision(
            tv_name,
            num_classes,
            zero_init_residual=zero_init_residual,
            device=device,
            dtype=dtype,
            **{**defaults, **kwargs},
        )

    builder.__doc__ = f"{description} (torchvision ``{tv_name}``, random weights)."
    register_model(name, input_size=IMAGENET_INPUT)(builder)


_register("resnet18", "resnet18", "ResNet-18")
_register("resnet50", "resnet50", "ResNet-50")
_register("resnet101", "resnet101", "ResNet-101")
_register("mobilenet_v2", "mobilenet_v2", "MobileNetV2 at width 1.0")
_register("mobilenet_v2_x1_2", "mobilenet_v2", "MobileNetV2 at width 1.2", width_mult=1.2)
_register("densenet121", "densenet121", "DenseNet-121")
_register("shufflenet_v2_x1_0", "shufflenet_v2_x1_0", "ShuffleNetV2 at width 1.0")
