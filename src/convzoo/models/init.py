"""Weight initialization shared by the zoo, following the papers' reference code."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def init_weights(model: nn.Module, *, zero_init_last_bn: bool = False, last_bn_names: Iterable[str] = ("bn2",)) -> None:
    """He (fan-out, ReLU) init for convs, BN gamma 1 / beta 0, default Linear init.

    With ``zero_init_last_bn`` every BN whose attribute name is in ``last_bn_names``
    (the last BN of each residual block) starts with gamma 0, so blocks start as identities.
    """
    names = set(last_bn_names)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            if zero_init_last_bn and name.rpartition(".")[2] in names:
                nn.init.zeros_(module.weight)
