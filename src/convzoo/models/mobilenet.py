"""MobileNet family: MobileNetV1, MobileNetV2 (224 and CIFAR) and the DDS paper's ddsnet.

Registered names (``create_model``):

* ``mobilenetv1`` (224): Howard et al., 13 depthwise separable blocks, ``width`` multiplier.
* ``mobilenetv2`` / ``mobilenetv2_x1_2`` (224): the DDS paper's Table 2, with a ``width``
  multiplier (channels rounded to multiples of 8 as torchvision; the 1280 head grows for
  width > 1). Parameter counts equal torchvision's ``mobilenet_v2(width_mult=...)``.
* ``cifar_mobilenetv2`` / ``cifar_mobilenetv2_x1_2`` (32): the same network with a stride-1 stem
  and stride 1 in the first two downsampling settings (24 and 32 channels), so features stay
  at 32x32 until the 64-channel stage. At width 1.0 with 100 classes this is CPWC's Table 1
  baseline: 2.35M parameters, 0.30G MACs.
* ``ddsnet`` (224): the DDS paper's Table 3 (MobileNetV2's 17 blocks and widths, see
  ``DDSNET_SETTINGS``), inverted residual blocks whose depthwise conv is a
  :class:`~convzoo.ops.dilated.PyramidDilatedConv2d` (dilations (1, 2, 3), split by default),
  PReLU after every conv except the last pointwise of each block, He initialization.

Module names follow timm's EfficientNet family: ``conv_stem``, ``blocks.<stage>.<block>.conv_pw`` /
``conv_dw`` / ``conv_pwl`` (expand / depthwise / project), ``conv_head``, ``classifier``. Stage i
of ``blocks`` is row i of the network's settings table. The depthwise convs are exactly the
modules named ``*conv_dw``; the ``dds`` / ``pyramid`` presets place their operator there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from convzoo.convert import convert
from convzoo.models.init import init_weights
from convzoo.models.materialize import place
from convzoo.models.options import check_network_options
from convzoo.models.registry import add_preset, register_model
from convzoo.ops.dilated import PyramidDilatedConv2d

ActLayer = Callable[[int], nn.Module]  # channels -> activation module
DepthwiseFactory = Callable[[int, int], nn.Module]  # (channels, stride) -> module with .out_channels
Setting = tuple[int, int, int, int]  # expansion t, channels c, repeats n, stride s

#: MobileNetV2 (Sandler et al.; the DDS paper's Table 2): 17 inverted residual blocks.
MOBILENETV2_SETTINGS: tuple[Setting, ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
#: CIFAR MobileNetV2: stride 1 in the 24- and 32-channel settings (plus a stride-1 stem).
CIFAR_MOBILENETV2_SETTINGS: tuple[Setting, ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 1),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
#: ddsnet, the DDS paper's Table 3. Table 3 is Table 2 with consecutive layers at one resolution merged
#: into a row that shows the first layer's input and the last layer's output: its layer numbers jump
#: 8 -> 14 and 15 -> 18, so row 8 (x6, 64 -> 96) is Table 2's layers 8-13 (64, 64, 64, 96, 96, 96) and
#: row 15 (x3, 160 -> 320) is layers 15-17 (160, 160, 320). The blocks are therefore MobileNetV2's,
#: which is also what the paper's claim of no extra parameters or computation requires.
DDSNET_SETTINGS: tuple[Setting, ...] = MOBILENETV2_SETTINGS
#: MobileNetV1 (Howard et al.): (out_channels, stride) of its 13 depthwise separable blocks.
MOBILENETV1_SETTINGS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    *((512, 1),) * 5,
    (1024, 2),
    (1024, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never more than 10% down (as torchvision)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def relu6(channels: int) -> nn.Module:
    """MobileNet's activation (``channels`` unused)."""
    return nn.ReLU6(inplace=True)


def relu(channels: int) -> nn.Module:
    """MobileNetV1's activation (``channels`` unused)."""
    return nn.ReLU(inplace=True)


def prelu(channels: int) -> nn.Module:
    """Channel-wise PReLU of He et al. (2015), slopes initialised to 0.25."""
    return nn.PReLU(channels)


def depthwise_conv(channels: int, stride: int) -> nn.Conv2d:
    """MobileNet's 3x3 depthwise conv: (B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s))."""
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


def pyramid_conv(dilations: Sequence[int] = (1, 2, 3), split: bool = True) -> DepthwiseFactory:
    """Factory of ddsnet's pyramid depthwise dilated convs (3x3 branches)."""

    def build(channels: int, stride: int) -> PyramidDilatedConv2d:
        return PyramidDilatedConv2d(channels, 3, stride, dilations=dilations, split=split)

    return build


def _validate_width(width: object) -> float:
    if isinstance(width, bool) or not isinstance(width, int | float) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    return float(width)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand-BN-act] -> depthwise-BN-act -> 1x1 project-BN (+ input).

    Args:
        in_channels, out_channels: block input / output channels.
        stride: of the depthwise step.
        expand_ratio: t; hidden channels round(t * in_channels); t = 1 has no expansion conv.
        act_layer: ``channels -> activation`` (ReLU6 in MobileNetV2, PReLU in ddsnet); none after
            the projection (linear bottleneck).
        depthwise: ``(channels, stride) -> module``; its ``out_channels`` feed the projection.

    Shapes:
        (B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s)); residual when s = 1 and C_in = C_out.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expand_ratio: int,
        *,
        act_layer: ActLayer = relu6,
        depthwise: DepthwiseFactory = depthwise_conv,
    ) -> None:
        super().__init__()
        hidden = round(in_channels * expand_ratio)
        self.conv_pw: nn.Conv2d | None = None
        if expand_ratio != 1:
            self.conv_pw = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
            self.act1 = act_layer(hidden)
        self.conv_dw = depthwise(hidden, stride)
        dw_out = self.conv_dw.out_channels
        self.bn2 = nn.BatchNorm2d(dw_out)
        self.act2 = act_layer(dw_out)
        self.conv_pwl = nn.Conv2d(dw_out, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self.conv_pw is not None:
            out = self.act1(self.bn1(self.conv_pw(out)))
        out = self.act2(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(out))
        return x + out if self.has_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2-style network: stem, stages of inverted residual blocks, 1x1 head, classifier.

    Args:
        settings: rows (t, c, n, s); each row is one stage ``blocks.<i>`` of n blocks.
        num_classes: classifier size.
        width: width multiplier (channels rounded to multiples of 8).
        stem_stride: 2 for 224 inputs, 1 for CIFAR.
        act_layer: activation after every conv but each block's projection.
        depthwise: builds each block's depthwise conv.
        last_channel: head width before the multiplier (grows with width > 1 only).
        dropout: before the classifier.

    Shapes:
        (B, 3, H, W) -> (B, num_classes).
    """

    def __init__(
        self,
        settings: Sequence[Setting] = MOBILENETV2_SETTINGS,
        num_classes: int = 1000,
        *,
        width: float = 1.0,
        stem_stride: int = 2,
        act_layer: ActLayer = relu6,
        depthwise: DepthwiseFactory = depthwise_conv,
        last_channel: int = 1280,
        dropout: float = 0.2,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        width = _validate_width(width)
        in_channels, _ = check_network_options(in_channels)
        channels = make_divisible(32 * width)
        self.conv_stem = nn.Conv2d(in_channels, channels, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = act_layer(channels)
        stages = []
        for t, c, n, s in settings:
            out_channels = make_divisible(c * width)
            blocks = []
            for index in range(n):
                stride = s if index == 0 else 1
                blocks.append(
                    InvertedResidual(channels, out_channels, stride, t, act_layer=act_layer, depthwise=depthwise)
                )
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.num_features = make_divisible(last_channel * max(1.0, width))
        self.conv_head = nn.Conv2d(channels, self.num_features, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(self.num_features)
        self.act2 = act_layer(self.num_features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.num_features, num_classes)
        init_weights(self)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, num_features, H/32, W/32) for 224-style strides."""
        x = self.act1(self.bn1(self.conv_stem(x)))
        return self.act2(self.bn2(self.conv_head(self.blocks(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.pool(self.forward_features(x)).flatten(1)))


def init_he_prelu(model: nn.Module, slope: float = 0.25) -> None:
    """He et al. (2015) init for PReLU nets: N(0, 2 / ((1 + a²) fan_in)) for every conv, a = 0.25.

    fan_in is k²·C_in/groups, the paper's forward-pass n (for a depthwise conv n = k²).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, a=slope, mode="fan_in", nonlinearity="leaky_relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: depthwise 3x3-BN-act then pointwise 1x1-BN-act.

    Shapes:
        (B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, act_layer: ActLayer = relu) -> None:
        super().__init__()
        self.conv_dw = depthwise_conv(in_channels, stride)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = act_layer(in_channels)
        self.conv_pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = act_layer(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv_dw(x)))
        return self.act2(self.bn2(self.conv_pw(x)))


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al., 2017): 3x3 stem, 13 depthwise separable blocks, pool, classifier.

    Args:
        num_classes: classifier size.
        width: width multiplier alpha (channels rounded to multiples of 8).
        stem_stride: 2 for 224 inputs.
        dropout: before the classifier.

    Shapes:
        (B, 3, H, W) -> (B, num_classes).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        width: float = 1.0,
        stem_stride: int = 2,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        width = _validate_width(width)
        in_channels, _ = check_network_options(in_channels)
        channels = make_divisible(32 * width)
        self.conv_stem = nn.Conv2d(in_channels, channels, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = relu(channels)
        blocks = []
        for c, s in MOBILENETV1_SETTINGS:
            blocks.append(DepthwiseSeparable(channels, make_divisible(c * width), s))
            channels = make_divisible(c * width)
        self.blocks = nn.Sequential(*blocks)
        self.num_features = channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        return self.classifier(self.dropout(self.pool(x).flatten(1)))


# ---------------------------------------------------------------------------- builders
def mobilenetv2(num_classes: int = 1000, *, width: float = 1.0, **kwargs: object) -> MobileNetV2:
    """MobileNetV2 for 224x224 input (Table 2 of the DDS paper), width multiplier ``width``."""
    return MobileNetV2(MOBILENETV2_SETTINGS, num_classes, width=width, stem_stride=2, **kwargs)


def cifar_mobilenetv2(num_classes: int = 10, *, width: float = 1.0, **kwargs: object) -> MobileNetV2:
    """MobileNetV2 for 32x32 input: stride-1 stem, stride 1 in the 24/32-channel settings."""
    return MobileNetV2(CIFAR_MOBILENETV2_SETTINGS, num_classes, width=width, stem_stride=1, **kwargs)


def ddsnet(
    num_classes: int = 1000,
    *,
    dilations: Sequence[int] = (1, 2, 3),
    split: bool = True,
    width: float = 1.0,
    **kwargs: object,
) -> MobileNetV2:
    """The DDS paper's network (Table 3) for 224x224 input.

    Pyramid depthwise dilated blocks (``dilations``, ``split`` as :class:`PyramidDilatedConv2d`),
    channel-wise PReLU after every conv except each block's last pointwise, He initialization
    for PReLU (:func:`init_he_prelu`). The paper does not list the dilation rates; (1, 2, 3) are
    those of its Fig. 2.
    """
    model = MobileNetV2(
        DDSNET_SETTINGS,
        num_classes,
        width=width,
        stem_stride=2,
        act_layer=prelu,
        depthwise=pyramid_conv(tuple(dilations), split),
        **kwargs,
    )
    init_he_prelu(model)
    return model


def mobilenetv1(num_classes: int = 1000, *, width: float = 1.0, **kwargs: object) -> MobileNetV1:
    """MobileNetV1 for 224x224 input, width multiplier ``width``."""
    return MobileNetV1(num_classes, width=width, **kwargs)


def _fixed_width(builder: Callable[..., nn.Module], width: float, num_classes: int) -> Callable[..., nn.Module]:
    def build(num_classes: int = num_classes, **kwargs: object) -> nn.Module:
        return builder(num_classes, width=width, **kwargs)

    build.__doc__ = f"{builder.__name__} at width {width}."
    return build


def _placed(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """``builder`` taking ``device=`` and ``dtype=`` as every zoo builder does (built, then moved)."""

    @functools.wraps(builder)
    def build(
        *args: object, device: torch.device | str | None = None, dtype: torch.dtype | None = None, **kwargs: object
    ) -> nn.Module:
        return place(builder(*args, **kwargs), device=device, dtype=dtype)

    return build


_IMAGENET = (3, 224, 224)
register_model("mobilenetv1", input_size=_IMAGENET)(_placed(mobilenetv1))
register_model("mobilenetv2", input_size=_IMAGENET)(_placed(mobilenetv2))
register_model("mobilenetv2_x1_2", input_size=_IMAGENET)(_placed(_fixed_width(mobilenetv2, 1.2, 1000)))
register_model("ddsnet", input_size=_IMAGENET)(_placed(ddsnet))
register_model("cifar_mobilenetv2")(_placed(cifar_mobilenetv2))
register_model("cifar_mobilenetv2_x1_2")(_placed(_fixed_width(cifar_mobilenetv2, 1.2, 10)))


def _depthwise_preset(kind: str) -> Callable[..., nn.Module]:
    """Preset placing ``kind`` on the depthwise convs (``*conv_dw``) only, as the DDS paper does."""

    def preset(model: nn.Module, **options: object) -> nn.Module:
        return convert(model, kind, include="*conv_dw", inplace=True, strict=True, **options)

    return preset


# The dds kind also replaces dense k x k convs (the stem); in MobileNets the paper puts it on the
# depthwise convs only. The pyramid kind only ever replaces depthwise convs, so its default rule
# already places it right; the preset just makes the placement explicit.
for _kind in ("dds", "pyramid"):
    add_preset(["mobilenetv1", "mobilenetv2*", "cifar_mobilenetv2*"], _kind, _depthwise_preset(_kind))
