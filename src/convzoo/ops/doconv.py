"""DO-Conv: depthwise over-parameterized convolution (Cao et al., 2020).

One module covers the paper's three forms: ``groups == 1`` is DO-Conv,
``groups == in_channels`` is DO-DConv and any other ``groups`` is DO-GConv.

Parameters (M x N kernel, C_in input channels, g groups, D_mul = ``d_mul``):

* ``W``: (C_out, C_in / g, D_mul), the conventional kernel;
* ``D = D' + I``: (C_in, M*N, D_mul), one M*N x D_mul matrix per *input channel*;
  ``D'`` (``d_delta``) is the trained parameter, initialised to zero, and ``I``
  tiles identity matrices along D_mul as the paper describes (remaining columns 0).

Kernel composition (paper §3), used for training and by ``fuse()``::

    W'[o, j, s] = sum_d D[c(o, j), s, d] * W[o, j, d],   c(o, j) = group(o) * C_in/g + j

i.e. each slice of ``W`` is multiplied by the ``D`` of the input channel it actually
reads. (The authors' code indexes ``D`` by position within the group instead, which
mixes channels when groups > 1 and C_out / g > 1.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from convzoo.ops.conv_spec import ConvAttributes, ConvSpec, PaddingArg
from convzoo.ops.registry import needs_spatial_kernel, register_conv


def identity_init(kernel_area: int, d_mul: int, *, device=None, dtype=None) -> torch.Tensor:
    """The (kernel_area, d_mul) matrix of identities tiled along d_mul, zeros for the remainder."""
    eye = torch.eye(kernel_area, device=device, dtype=dtype)
    tiles = [eye] * (d_mul // kernel_area)
    if d_mul % kernel_area:
        tiles.append(torch.zeros(kernel_area, d_mul % kernel_area, device=device, dtype=dtype))
    return torch.cat(tiles, dim=1)


@register_conv(
    "doconv",
    description="DO-Conv / DO-DConv / DO-GConv: depthwise over-parameterized k x k conv, folds into nn.Conv2d",
    skip_reason=needs_spatial_kernel,
)
class DOConv2d(ConvAttributes, nn.Module):
    """Depthwise over-parameterized convolution with ``nn.Conv2d``'s interface.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode: as ``nn.Conv2d`` (padding may be an int, a pair, 'same' or 'valid').
        d_mul: keyword-only depth multiplier D_mul of ``D``; defaults to M*N and must be >= M*N.

    Shapes:
        input (B, C_in, H, W) -> output (B, C_out, H', W') exactly as ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        d_mul: int | None = None,
    ) -> None:
        super().__init__()
        spec = ConvSpec.create(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode
        )
        area = spec.kernel_size[0] * spec.kernel_size[1]
        if spec.is_pointwise:
            raise ValueError(
                f"kernel_size must be larger than 1x1 for DO-Conv, got {kernel_size!r} "
                "(a 1x1 conv has no spatial patch to over-parameterize)"
            )
        if d_mul is None:
            d_mul = area
        if not isinstance(d_mul, int) or isinstance(d_mul, bool):
            raise TypeError(f"d_mul must be an int, got {d_mul!r}")
        if d_mul < area:
            raise ValueError(
                f"d_mul must be >= kernel area M*N = {area} (d_mul < M*N is a depthwise separable conv, "
                f"not an over-parameterization), got d_mul={d_mul}"
            )
        self.spec = spec
        self.d_mul = d_mul
        factory = {"device": device, "dtype": dtype}
        self.W = nn.Parameter(torch.empty(out_channels, in_channels // groups, d_mul, **factory))
        self.d_delta = nn.Parameter(torch.zeros(in_channels, area, d_mul, **factory))
        self.register_buffer("d_identity", identity_init(area, d_mul, **factory), persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W as nn.Conv2d initialises its kernel (same fan-in when d_mul = M*N); D' = 0."""
        nn.init.kaiming_uniform_(self.W, a=math.sqrt(5))
        nn.init.zeros_(self.d_delta)
        if self.bias is not None:
            fan_in = self.W.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def D(self) -> torch.Tensor:  # noqa: N802  (the paper's name)
        """The over-parameterization kernel D = D' + I, shape (C_in, M*N, D_mul)."""
        return self.d_delta + self.d_identity

    @property
    def weight(self) -> torch.Tensor:
        """The composed kernel W' (C_out, C_in/groups, M, N), what an equivalent nn.Conv2d holds."""
        g = self.groups
        c_out, c_in_g, d_mul = self.W.shape
        w = self.W.reshape(g, c_out // g, c_in_g, d_mul)
        d = self.D.reshape(g, c_in_g, -1, d_mul)
        composed = torch.einsum("gojd,gjsd->gojs", w, d)
        return composed.reshape(c_out, c_in_g, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W) -> (B, C_out, H', W') via kernel composition."""
        return self.spec.conv2d(x, self.weight, self.bias)

    # conversion ----------------------------------------------------------------------
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, d_mul: int | None = None) -> DOConv2d:
        """A DOConv2d computing exactly what ``conv`` computes: W holds its kernel, D = I."""
        spec = ConvSpec.from_conv(conv)
        module = cls(**spec.conv_kwargs(), device=conv.weight.device, dtype=conv.weight.dtype, d_mul=d_mul)
        area = spec.kernel_size[0] * spec.kernel_size[1]
        with torch.no_grad():
            module.W.zero_()
            module.W[..., :area].copy_(conv.weight.reshape(conv.out_channels, -1, area))
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
        module.W.requires_grad_(conv.weight.requires_grad)
        return module

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d`` holding the composed kernel (the inference form)."""
        conv = nn.Conv2d(**self.spec.conv_kwargs(), device=self.W.device, dtype=self.W.dtype)
        conv.weight.copy_(self.weight)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        s = f"{self.spec.describe()}, d_mul={self.d_mul}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", bias={self.bias is not None}"
