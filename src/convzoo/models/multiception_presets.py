"""Placement presets of the Multiception paper for ``multiception``, ``dsconv`` and ``mixconv``.

As in the authors' code, only the first conv of each basic block is replaced, together with the
BatchNorm after it (the operator ends in its own BN, like the authors' ``conv_bn``):
``layer{s}.{i}.conv1`` (+ ``bn1``) in ResNet-style stages, ``layer{s}.{i}.branch{b}.conv1``
(+ ``bn1``) in shake-shake branches. The second conv stays a standard 3x3; shortcuts are untouched.

Kernels per stage come from a schedule: ``"code"`` (default; the authors' code: (3, 5, 7),
(3, 5), (3, 3)), ``"paper"`` (the text: (3, 5, 7), (3, 5), (3,)) or an explicit tuple of
per-stage kernel tuples. MixConv uses (3, 5, 7) in every stage, as the authors' code does,
unless a schedule or ``kernels`` is given; DSConv takes no kernels.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from convzoo.convert import convert
from convzoo.models.registry import add_preset, list_models
from convzoo.ops.multiception import SCHEDULES, check_kernels

_FIRST_CONV = re.compile(r"^layer(?P<stage>\d+)\.\d+\.(?:branch\d+\.)?conv1$")
Schedule = str | Sequence[Sequence[int]]


def resolve_schedule(schedule: Schedule) -> tuple[tuple[int, ...], ...]:
    """A schedule name (``"code"`` / ``"paper"``) or explicit per-stage kernels -> tuple of kernel tuples."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)} or per-stage kernels, got {schedule!r}")
        return SCHEDULES[schedule]
    if not isinstance(schedule, Sequence) or not schedule:
        raise TypeError(f"schedule must be a name or a non-empty sequence of per-stage kernels, got {schedule!r}")
    return tuple(check_kernels(kernels) for kernels in schedule)


def first_convs(model: nn.Module) -> dict[str, int]:
    """Names of the first conv of every basic block / shake branch, each with its 1-based stage."""
    return {
        name: int(match["stage"])
        for name, module in model.named_modules()
        if type(module) is nn.Conv2d and (match := _FIRST_CONV.match(name))
    }


def place(
    model: nn.Module,
    kind: str,
    *,
    schedule: Schedule | None = None,
    kernels: Sequence[int] | None = None,
    **options: Any,
) -> nn.Module:
    """Replace the first conv (+ its BN) of each block by ``kind``, kernels per stage; in place, returns ``model``.

    Raises:
        ValueError: the model has no ``layer{s}.{i}.conv1`` convs, or more stages than the schedule.
    """
    names = first_convs(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no 'layer{{s}}.{{i}}.conv1' convs for the {kind!r} preset")
    if schedule is not None and kernels is not None:
        raise ValueError("give either schedule or kernels, not both")
    per_stage = resolve_schedule(schedule) if schedule is not None else None
    if per_stage is not None and max(names.values()) > len(per_stage):
        raise ValueError(f"schedule {per_stage} covers {len(per_stage)} stages, the model has {max(names.values())}")
    fixed = check_kernels(kernels) if kernels is not None else None

    def layer_options(name: str, conv: nn.Conv2d) -> dict[str, Any]:
        if per_stage is not None:
            return {"kernels": per_stage[names[name] - 1]}
        return {"kernels": fixed} if fixed is not None else {}

    convert(model, kind, include=list(names), inplace=True, strict=True, layer_options=layer_options, **options)
    for name in names:
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(getattr(parent, "bn1", None), nn.BatchNorm2d):
            parent.bn1 = nn.Identity()
    return model


def multiception_preset(model: nn.Module, *, schedule: Schedule = "code", **options: Any) -> nn.Module:
    """Multiception in the first conv of each block, kernels per stage from ``schedule``."""
    if "kernels" in options:
        return place(model, "multiception", **options)
    return place(model, "multiception", schedule=schedule, **options)


def mixconv_preset(model: nn.Module, **options: Any) -> nn.Module:
    """MixConv in the first conv of each block; (3, 5, 7) everywhere unless ``schedule`` / ``kernels`` say otherwise."""
    if "schedule" not in options and "kernels" not in options:
        options["kernels"] = (3, 5, 7)
    return place(model, "mixconv", **options)


def dsconv_preset(model: nn.Module, **options: Any) -> nn.Module:
    """DSConv (depthwise 3x3 -> 1x1 -> BN) in the first conv of each block."""
    return place(model, "dsconv", **options)


PRESETS = {"multiception": multiception_preset, "dsconv": dsconv_preset, "mixconv": mixconv_preset}
# Models whose stages are named layer{s}.{i}.conv1 (or layer{s}.{i}.branch{b}.conv1).
MODEL_PATTERNS = ("cifar_resnet*", "cifar_se_resnet*", "cifar_shakeshake*")

for _pattern in MODEL_PATTERNS:
    if list_models(_pattern):
        for _kind, _preset in PRESETS.items():
            add_preset(_pattern, _kind, _preset)
