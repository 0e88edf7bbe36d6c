"""Placement presets of the Multiception paper for ``multiception``, ``dsconv`` and ``mixconv``.

As in the authors' code, only the first conv of each basic block is replaced, together with the
BatchNorm after it (the operator ends in its own BN, like the authors' ``conv_bn``):
``layer{s}.{i}.conv1`` (+ ``bn1``) in ResNet-style stages, ``layer{s}.{i}.branch{b}.conv1``
(+ ``bn1``) in shake-shake branches. The second conv stays a standard 3x3; shortcuts are untouched.

Kernels per stage come from a schedule: ``"code"`` (default; the authors' code: (3, 5, 7),
(3, 5), (3, 3)), ``"paper"`` (the text: (3, 5, 7), (3, 5), (3,)) or an explicit tuple of
per-stage kernel tuples, exactly one per stage of the model; or ``kernels=`` puts the same kernels
in every stage (a schedule and ``kernels`` together are refused). MixConv uses (3, 5, 7) in every
stage, as the authors' code does, unless a schedule or ``kernels`` is given; DSConv takes no kernels.

MobileNetV2 (``cifar_mobilenetv2*``, the paper's STL-10 network at 96x96): in every block of the
first two inverted-residual settings (``blocks.0``: t=1, 16 channels, 1 block; ``blocks.1``: t=6,
24 channels, 2 blocks) the depthwise conv + BN + ReLU6 + projection 1x1 + BN (``conv_dw``, ``bn2``,
``act2``, ``conv_pwl``, ``bn3``) become ONE operator from the block's expanded channels to its
output channels, with the depthwise conv's stride, in ``conv_dw``; the other four become
``nn.Identity``. The expansion 1x1 (+ BN + ReLU6) and the residual are kept; the operator has no
activation inside, so the block stays a linear bottleneck. Kernels: (3, 5, 7) in every replaced
block (``kernels=`` overrides): the paper gives no MobileNetV2 schedule, but its rule "the first 1/3
layers harness all three kernel sizes" covers these 3 of 17 blocks, and its STL-10 ablation (Table 4)
finds (3, 5, 7) best. DSConv is the depthwise 3x3 -> 1x1 (bias) -> BN of the authors' code (no BN or
activation between). The paper reports no MixConv MobileNetV2 ("not compatible"); here it gets the
same placement with (3, 5, 7) splits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from convzoo.convert import convert
from convzoo.models.mobilenet import InvertedResidual
from convzoo.models.registry import add_preset, list_models
from convzoo.ops.multiception import SCHEDULES, MulticeptionConv2d, check_centred_geometry, check_kernels
from convzoo.ops.separable import DSConv2d, MixConv2d

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
        ValueError: the model has no ``layer{s}.{i}.conv1`` convs, both ``schedule`` and ``kernels`` are
            given, or the schedule's number of stages is not the model's.
    """
    names = first_convs(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no 'layer{{s}}.{{i}}.conv1' convs for the {kind!r} preset")
    if schedule is not None and kernels is not None:
        raise ValueError(
            f"give either schedule or kernels, not both: got schedule={schedule!r} and kernels={kernels!r}"
        )
    per_stage = resolve_schedule(schedule) if schedule is not None else None
    stages = max(names.values())
    if per_stage is not None and len(per_stage) != stages:
        raise ValueError(
            f"schedule {per_stage} covers {len(per_stage)} stages, {type(model).__name__} has {stages}: "
            "give one kernel tuple per stage"
        )
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


def multiception_preset(model: nn.Module, *, schedule: Schedule | None = None, **options: Any) -> nn.Module:
    """Multiception in the first conv of each block, kernels per stage from ``schedule`` (default ``"code"``).

    ``kernels=`` instead puts the same kernels in every stage; giving both is an error.
    """
    if schedule is None and options.get("kernels") is None:
        schedule = "code"
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


# ---------------------------------------------------------------------------- MobileNetV2
#: Inverted-residual settings (stages ``blocks.<s>``) replaced in MobileNetV2: the first two.
MOBILENET_STAGES: tuple[int, ...] = (0, 1)
#: Kernels of every replaced MobileNetV2 block (multiception, mixconv).
MOBILENET_KERNELS: tuple[int, ...] = (3, 5, 7)
OPERATORS: dict[str, type[nn.Module]] = {"multiception": MulticeptionConv2d, "dsconv": DSConv2d, "mixconv": MixConv2d}
_BLOCK_LINEAR = ("bn2", "act2", "conv_pwl", "bn3")  # what follows conv_dw and is absorbed by the operator


def inverted_residuals(model: nn.Module, stages: Sequence[int] = MOBILENET_STAGES) -> dict[str, InvertedResidual]:
    """The blocks ``blocks.<s>.<i>`` of the given settings, by name, each with a plain depthwise + projection.

    Raises:
        ValueError: ``model`` has no ``blocks`` stages ``stages``, or a block there is not a plain
            :class:`~convzoo.models.mobilenet.InvertedResidual` (e.g. already converted).
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) <= max(stages):
        raise ValueError(f"{type(model).__name__} has no inverted-residual stages blocks.{tuple(stages)}")
    found = {}
    for s in stages:
        for i, block in enumerate(blocks[s]):
            name = f"blocks.{s}.{i}"
            if not isinstance(block, InvertedResidual) or not all(
                type(getattr(block, attr)) is nn.Conv2d for attr in ("conv_dw", "conv_pwl")
            ):
                raise ValueError(f"{name} is not an inverted residual block with plain conv_dw and conv_pwl convs")
            dw = block.conv_dw
            if not dw.groups == dw.in_channels == dw.out_channels or tuple(dw.dilation) != (1, 1):
                raise ValueError(f"{name}.conv_dw is not an undilated depthwise conv: {dw}")
            check_centred_geometry(tuple(dw.kernel_size), tuple(dw.stride), tuple(dw.padding))
            found[name] = block
    return found


def place_in_inverted_residuals(
    model: nn.Module, kind: str, *, kernels: Sequence[int] | None = None, **options: Any
) -> nn.Module:
    """Replace depthwise + projection of each block of the first two settings by ``kind``; in place, returns ``model``.

    Each replaced block's ``conv_dw`` (C_hidden -> C_hidden, stride s) becomes
    ``OPERATORS[kind](C_hidden, C_out, k_dw, s)``: (B, C_hidden, H, W) -> (B, C_out, H', W'), and
    ``bn2``, ``act2``, ``conv_pwl``, ``bn3`` become ``nn.Identity``.

    Raises:
        ValueError: an unknown kind or option, ``kernels`` for ``dsconv``, or a model without such blocks.
    """
    if kind not in OPERATORS:
        raise ValueError(f"kind must be one of {sorted(OPERATORS)}, got {kind!r}")
    if options:
        raise ValueError(f"the {kind!r} MobileNetV2 preset takes only 'kernels', got {sorted(options)}")
    if kind == "dsconv" and kernels is not None:
        raise ValueError(f"dsconv takes no kernels (its depthwise kernel is the replaced conv's), got {kernels!r}")
    extra = {} if kind == "dsconv" else {"kernels": check_kernels(MOBILENET_KERNELS if kernels is None else kernels)}
    for block in inverted_residuals(model).values():
        dw, pwl = block.conv_dw, block.conv_pwl
        like = {"device": dw.weight.device, "dtype": dw.weight.dtype}
        operator = OPERATORS[kind](
            dw.in_channels, pwl.out_channels, tuple(dw.kernel_size), tuple(dw.stride), **extra, **like
        )
        block.conv_dw = operator.train(block.training)
        for attr in _BLOCK_LINEAR:
            setattr(block, attr, nn.Identity())
    return model


def mobilenet_preset(kind: str) -> Callable[..., nn.Module]:
    """The MobileNetV2 preset of ``kind`` (see :func:`place_in_inverted_residuals`)."""

    def preset(model: nn.Module, **options: Any) -> nn.Module:
        return place_in_inverted_residuals(model, kind, **options)

    preset.__doc__ = f"{kind} in place of depthwise + projection in MobileNetV2's first two settings."
    return preset


MOBILENET_PATTERNS = ("cifar_mobilenetv2*",)
for _pattern in MOBILENET_PATTERNS:
    if list_models(_pattern):
        for _kind in OPERATORS:
            add_preset(_pattern, _kind, mobilenet_preset(_kind))
