"""Validated nn.Conv2d geometry shared by every convzoo operator.

`ConvSpec` holds the arguments of an ``nn.Conv2d`` (channels, kernel, stride,
padding, dilation, groups, bias, padding mode), checks them with errors that
name the argument, the value and what is allowed, and applies the padding the
way ``nn.Conv2d`` does, so operators never re-derive it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.autograd import forward_ad
from torch.fx import _symbolic_trace

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
PaddingArg = int | tuple[int, int] | str


def is_int(value: object) -> bool:
    """An integer that is not a bool: Python ints and ``numbers.Integral`` types such as ``numpy.int64``."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def to_pair(value: object, name: str, *, minimum: int = 1) -> tuple[int, int]:
    """Normalize an int or a pair of ints to a pair, checking each is >= ``minimum``.

    Raises:
        TypeError: ``value`` is neither an int nor a sequence of two ints.
        ValueError: an element is below ``minimum``.
    """
    if is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        if not all(is_int(v) for v in value):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def check_channels(value: object, name: str) -> int:
    """Check a channel count is a positive int and return it."""
    if not is_int(value):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_bool(value: object, name: str) -> bool:
    """Check a flag is a bool (not merely truthy) and return it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_input(x: object, in_channels: int, layer_name: str) -> bool:
    """Check a layer's input: a (B, C, H, W) tensor, or an unbatched (C, H, W) one as ``nn.Conv2d`` takes.

    Shape checks only (no device sync). Under ``torch.fx`` symbolic tracing the input is a Proxy
    without a shape: nothing is checked and it counts as batched. Under ``torch.jit.trace`` sizes are
    traced tensors, so the channel count is left unchecked (comparing it would warn).

    Returns:
        True for an unbatched (C, H, W) input, which the caller runs as a batch of one
        (``forward(x.unsqueeze(0)).squeeze(0)``, as ``nn.Conv2d`` does).

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``x`` is not 3-D or 4-D, or its channel count C is not ``in_channels``.
    """
    if isinstance(x, fx.Proxy):
        return False
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer_name} expects a tensor input, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(
            f"{layer_name} expects a 4-D input (B, C, H, W) or an unbatched 3-D input (C, H, W), "
            f"got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{layer_name} expects a floating-point input, got dtype {x.dtype}")
    if not torch.jit.is_tracing() and x.shape[-3] != in_channels:
        raise ValueError(
            f"{layer_name} has in_channels={in_channels}, got an input with {x.shape[-3]} channels "
            f"(shape {tuple(x.shape)})"
        )
    return x.dim() == 3


# is_fx_tracing() also fires (with a warning) under torch.export; that case is is_compiling()
_fx_symbolic_tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing", _symbolic_trace.is_fx_tracing)


def is_tracing() -> bool:
    """True under fx symbolic tracing, TorchScript tracing or scripting, torch.compile or torch.export.

    Modules with data-dependent or CPU-specific fast paths check it and record their plain form instead.
    (Called once per layer per step: the helpers are looked up at import, not on each call.)
    """
    return _fx_symbolic_tracing() or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def tracing_a_graph() -> bool:
    """True under torch.export or fx symbolic tracing, whose tensors (fake tensors, proxies) must not be kept in
    module state (torch.compile, in contrast, replays a module's attribute assignments with real tensors)."""
    return _fx_symbolic_tracing() or torch.compiler.is_exporting()


def transform_active() -> bool:
    """True inside a ``torch.func`` transform (grad, vmap, jvp, ...) or a forward-mode AD dual level.

    Custom autograd Functions without ``setup_context`` / ``jvp``, memory-format queries under vmap and
    native kernels do not work there: modules check this and run their plain torch form, which every
    transform differentiates and batches.
    """
    return forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def autocast_enabled(device: torch.device) -> bool:
    """Whether ``torch.autocast`` is on for ``device``'s type (False for types autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # "unknown device type for autocast"
        return False


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a channels-last 4-D tensor, else ``torch.contiguous_format``."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _Relayout(torch.autograd.Function):
    """x in another memory format; its gradient goes back in x's own format."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:  # type: ignore[override]
        ctx.source_format = memory_format_of(x)
        return x.contiguous(memory_format=memory_format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad.contiguous(memory_format=ctx.source_format), None


def relayout(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``x.contiguous(memory_format=...)`` whose gradient comes back in x's layout.

    ``Tensor.contiguous`` passes the gradient through unchanged, so a channels-last island inside an
    NCHW model hands channels-last gradients to the NCHW layers before it. Their backward then mixes
    layouts, which oneDNN and BatchNorm run on slower paths.
    """
    if transform_active():  # a layout is only a speed matter, and vmap cannot query it
        return x
    if memory_format_of(x) == memory_format or not (torch.is_grad_enabled() and x.requires_grad):
        return x.contiguous(memory_format=memory_format)
    return _Relayout.apply(x, memory_format)


@dataclass(frozen=True)
class ConvSpec:
    """The full geometry of a 2-D convolution, validated.

    Attributes mirror ``nn.Conv2d``. ``padding`` is a pair of ints or ``"same"``. The constructor
    validates and normalizes its arguments exactly as :meth:`create` does (``"valid"`` becomes (0, 0)).
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:
        """Validate the fields and normalize them (ints to pairs, ``"valid"`` to (0, 0)), as :meth:`create` does."""
        in_channels = check_channels(self.in_channels, "in_channels")
        out_channels = check_channels(self.out_channels, "out_channels")
        kernel = to_pair(self.kernel_size, "kernel_size")
        stride_pair = to_pair(self.stride, "stride")
        dilation_pair = to_pair(self.dilation, "dilation")
        groups = check_channels(self.groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide both in_channels={in_channels} and out_channels={out_channels}"
            )
        padding = self.padding
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
            if padding == "same" and stride_pair != (1, 1):
                raise ValueError(f"padding='same' requires stride=1 (as in nn.Conv2d), got stride={self.stride!r}")
            padding_value: tuple[int, int] | str = (0, 0) if padding == "valid" else "same"
        else:
            padding_value = to_pair(padding, "padding", minimum=0)
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")
        check_bool(self.bias, "bias")
        normalized = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "kernel_size": kernel,
            "stride": stride_pair,
            "padding": padding_value,
            "dilation": dilation_pair,
            "groups": groups,
        }
        for name, value in normalized.items():
            object.__setattr__(self, name, value)  # frozen dataclass: the documented way to set fields here

    @classmethod
    def create(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
    ) -> ConvSpec:
        """Validate nn.Conv2d-style arguments (ints or pairs) and return a ConvSpec.

        The same as calling ``ConvSpec(...)``, whose ``__post_init__`` does the checks; kept as the
        spelled-out, nn.Conv2d-typed entry point.
        """
        return cls(
            in_channels,
            out_channels,
            kernel_size,  # type: ignore[arg-type]
            stride,  # type: ignore[arg-type]
            padding,  # type: ignore[arg-type]
            dilation,  # type: ignore[arg-type]
            groups,
            bias,
            padding_mode,
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ConvSpec:
        """Read the geometry of an existing ``nn.Conv2d``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        return cls.create(
            conv.in_channels,
            conv.out_channels,
            tuple(conv.kernel_size),
            tuple(conv.stride),
            padding,
            tuple(conv.dilation),
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
        )

    # ------------------------------------------------------------------ geometry
    @property
    def is_pointwise(self) -> bool:
        return self.kernel_size == (1, 1)

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels and self.groups > 1

    @property
    def explicit_padding(self) -> tuple[int, int, int, int]:
        """Padding as (left, right, top, bottom), resolving ``"same"`` as nn.Conv2d does."""
        if self.padding == "same":
            pads = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                left = total // 2
                pads += [left, total - left]
            return tuple(pads)  # type: ignore[return-value]
        ph, pw = self.padding  # type: ignore[misc]
        return (pw, pw, ph, ph)

    @property
    def is_symmetric_padding(self) -> bool:
        left, right, top, bottom = self.explicit_padding
        return left == right and top == bottom

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial output size for an input of ``height`` x ``width``."""
        left, right, top, bottom = self.explicit_padding
        sizes = []
        for n, lo, hi, k, s, d in zip(
            (height, width), (top, left), (bottom, right), self.kernel_size, self.stride, self.dilation
        ):
            # integer floor division (as math.floor of the true quotient, negative spans included): a symbolic
            # size under torch.export's dynamic shapes stays an integer expression it can reason about
            sizes.append((n + lo + hi - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]

    def pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pad ``x`` as nn.Conv2d would; return the padded input and what padding is left for conv2d.

        For ``padding_mode="zeros"`` with symmetric padding the padding is left to the
        convolution itself (fast path); otherwise ``x`` is padded explicitly.
        """
        if self.padding_mode == "zeros":
            if self.is_symmetric_padding:
                left, _, top, _ = self.explicit_padding
                return x, (top, left)
            return F.pad(x, self.explicit_padding), (0, 0)
        return F.pad(x, self.explicit_padding, mode=self.padding_mode), (0, 0)

    def conv2d(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Run ``F.conv2d`` with this geometry: x (N, C_in, H, W) -> (N, C_out, H', W')."""
        x, conv_padding = self.pad(x)
        return F.conv2d(x, weight, bias, self.stride, conv_padding, self.dilation, self.groups)

    def conv_kwargs(self) -> dict[str, object]:
        """Keyword arguments that rebuild an equivalent ``nn.Conv2d``."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
            "bias": self.bias,
            "padding_mode": self.padding_mode,
        }

    def macs(self, out_height: int, out_width: int) -> int:
        """Multiply-accumulates of the plain conv for one image at the given output size."""
        kh, kw = self.kernel_size
        return self.out_channels * (self.in_channels // self.groups) * kh * kw * out_height * out_width

    def describe(self) -> str:
        """Short human-readable form, e.g. ``64->128 k3x3 s2 g1``."""
        kh, kw = self.kernel_size
        sh, sw = self.stride
        return (
            f"{self.in_channels}->{self.out_channels} k{kh}x{kw} s{sh}"
            + ("" if sh == sw else f"x{sw}")
            + f" g{self.groups}"
        )


class NoTorchScript:
    """Mixin: ``torch.jit.script`` refuses the module with a clear ``TypeError`` naming it, rather than failing
    deep inside the TorchScript compiler on its Python-only code (TorchScript is in maintenance in PyTorch).
    ``torch.export``, ``torch.jit.trace``, fx and ``torch.compile`` take it; ``deploy()`` gives plain modules."""

    def __prepare_scriptable__(self) -> nn.Module:
        raise TypeError(
            f"torch.jit.script cannot compile {type(self).__name__}: export it with torch.export.export or "
            "torch.jit.trace instead (convzoo.deploy() first for the inference form; most deployed forms are "
            "plain torch modules, which script)"
        )


class ConvAttributes:
    """``nn.Conv2d``'s read-only geometry attributes for a module that holds ``self.spec: ConvSpec``.

    Tools that read ``in_channels``, ``kernel_size``, ``stride`` ... from a conv keep working on
    convzoo operators that mix this in.
    """

    spec: ConvSpec
    in_channels = property(lambda self: self.spec.in_channels)
    out_channels = property(lambda self: self.spec.out_channels)
    kernel_size = property(lambda self: self.spec.kernel_size)
    stride = property(lambda self: self.spec.stride)
    padding = property(lambda self: self.spec.padding)
    dilation = property(lambda self: self.spec.dilation)
    groups = property(lambda self: self.spec.groups)
    padding_mode = property(lambda self: self.spec.padding_mode)


def inherit_requires_grad(
    conv: nn.Conv2d,
    *,
    weights: Iterable[nn.Parameter | None] = (),
    biases: Iterable[nn.Parameter | None] = (),
) -> None:
    """Give the parameters that hold ``conv``'s kernel (``weights``) and its bias (``biases``) ``conv``'s
    ``requires_grad`` flags, so that a frozen conv converts to a frozen layer (``convert`` on a backbone
    whose stem the user froze). Parameters that are new (CAC's γ and β, CPWC's context unit) stay trainable.
    """
    for targets, source in ((weights, conv.weight), (biases, conv.bias)):
        if source is None:
            continue
        for parameter in targets:
            if parameter is not None:
                parameter.requires_grad_(source.requires_grad)


def conv_signature(conv: nn.Conv2d) -> str:
    """A short description of any nn.Conv2d, used in conversion reports."""
    return ConvSpec.from_conv(conv).describe()
