"""DO-Conv: depthwise over-parameterized convolution (Cao et al., 2020).

One module covers the paper's three forms: ``groups == 1`` is DO-Conv,
``groups == in_channels`` is DO-DConv and any other ``groups`` is DO-GConv.

Parameters (M x N kernel, C_in input channels, g groups, D_mul = ``d_mul``):

* ``W``: the conventional kernel, (C_out, C_in / g, D_mul) in the paper (``W_paper``), stored
  input-major as (C_in, D_mul, C_out / g) so that composing it is one dense batched matmul;
* ``D = D' + I``: (C_in, M*N, D_mul), one M*N x D_mul matrix per *input channel*;
  ``D'`` (``d_delta``) is the trained parameter, initialised to zero, and ``I``
  tiles identity matrices along D_mul as the paper describes (remaining columns 0).

Kernel composition (paper §3), used for training and by ``fuse()``::

    W'[o, j, s] = sum_d D[c(o, j), s, d] * W_paper[o, j, d],   c(o, j) = group(o) * C_in/g + j

i.e. each slice of ``W`` is multiplied by the ``D`` of the input channel it actually
reads. (The authors' code indexes ``D`` by position within the group instead, which
mixes channels when groups > 1 and C_out / g > 1.)
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from convzoo.native import native_operands_ready, native_ops
from convzoo.ops.conv_spec import (
    ConvAttributes,
    ConvSpec,
    NoTorchScript,
    PaddingArg,
    autocast_enabled,
    inherit_requires_grad,
    is_int,
    is_tracing,
    transform_active,
)
from convzoo.ops.registry import needs_spatial_kernel, register_conv


def identity_init(kernel_area: int, d_mul: int, *, device=None, dtype=None) -> torch.Tensor:
    """The (kernel_area, d_mul) matrix of identities tiled along d_mul, zeros for the remainder."""
    eye = torch.eye(kernel_area, device=device, dtype=dtype)
    if d_mul == kernel_area:
        return eye
    tiles = [eye] * (d_mul // kernel_area)
    if d_mul % kernel_area:
        tiles.append(torch.zeros(kernel_area, d_mul % kernel_area, device=device, dtype=dtype))
    return torch.cat(tiles, dim=1)


def d_from_delta(d_delta: torch.Tensor) -> torch.Tensor:
    """D = D' + I from D' (C_in, M*N, D_mul): the identity is built where it is needed, never held (a buffer
    is left uninitialized by ``to_empty()`` + ``load_state_dict()``, since it is in no state_dict)."""
    return d_delta + identity_init(d_delta.shape[1], d_delta.shape[2], device=d_delta.device, dtype=d_delta.dtype)


def _to_input_major(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(C_out, C_in/g, X) -> (C_in, X, C_out/g): per input channel, an X x (C_out/g) matrix (a view when g = 1)."""
    c_out, c_in_g, x = t.shape
    return t.reshape(groups, c_out // groups, c_in_g, x).permute(0, 2, 3, 1).reshape(groups * c_in_g, x, -1)


def _from_input_major(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of ``_to_input_major``: (C_in, X, C_out/g) -> (C_out, C_in/g, X) (a view when g = 1)."""
    c_in, x, c_out_g = t.shape
    return t.reshape(groups, c_in // groups, x, c_out_g).permute(0, 3, 1, 2).reshape(groups * c_out_g, -1, x)


NATIVE_AREA = 9  # the native composition kernel's M*N = D_mul (3x3 kernels with the default d_mul)


def native_compose_applies(W: torch.Tensor, D: torch.Tensor, groups: int, *others: torch.Tensor) -> bool:  # noqa: N803
    """Whether ``convzoo.native``'s composition kernels compute this composition (and its backward).

    They cover groups = 1 with M*N = D_mul = 9 (3x3 kernels, the default d_mul), C_in and C_out multiples
    of 16, float32 CPU operands outside autograd, tracing and autocast (``native_operands_ready``). They
    compute the same sums as the ``bmm`` path, in another order (float32 rounding differs).
    """
    return (
        groups == 1
        and W.shape[1] == NATIVE_AREA
        and D.shape[1] == NATIVE_AREA
        and W.shape[0] % 16 == 0
        and W.shape[2] % 16 == 0
        and not is_tracing()
        and native_operands_ready(W, D, *others)
    )


class _ComposeKernel(torch.autograd.Function):
    """W'[o, j, s] = sum_d D[c, s, d] W[c, d, o'] (c = input channel of (o, j)) as one ``bmm``.

    ``W`` is stored input-major, (C_in, D_mul, C_out/g), so per input channel the product is
    D[c] (M*N x D_mul) @ W[c] (D_mul x C_out/g): the long dimension is the matmul's N, which CPU
    GEMMs run ~4x faster than the transposed orientation (writing the output-major result
    directly through strided ``bmm(out=)`` operands measured 2-3x slower). W's gradient comes out
    of its ``bmm`` already in W's layout. The one layout change each way, (C_in*M*N, C_out) <->
    (C_out, C_in*M*N), is done as a 2-D transpose, which torch copies in cache blocks.

    Where ``native_compose_applies``, both directions run ``convzoo.native``'s kernels instead: one
    pass each, with the layout change done in registers (forward + backward through autograd 3.5-4.5x
    faster than ``bmm`` + transpose for 256-512 channel layers, ``benchmarks/results/doconv.md``).

    Both directions run with autocast off, in the parameters' precision: a ``backward()`` called
    inside an autocast region would otherwise run the backward ``bmm`` in float16 / bfloat16.
    """

    @staticmethod
    def forward(ctx, W: torch.Tensor, D: torch.Tensor, groups: int) -> torch.Tensor:  # noqa: N803
        ctx.save_for_backward(W, D)
        ctx.groups = groups
        if native_compose_applies(W, D, groups):
            return native_ops().doconv_compose(W, D)  # (C_out, C_in, M*N)
        return _torch_compose(W, D, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        if autocast_enabled(grad.device):
            with torch.autocast(grad.device.type, enabled=False):
                return _ComposeKernel._backward(ctx, grad)
        return _ComposeKernel._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        W, D = ctx.saved_tensors
        need_w, need_d = ctx.needs_input_grad[:2]
        if native_compose_applies(W, D, ctx.groups, grad):  # not under create_graph: W and D require grad
            grad_w, grad_d = native_ops().doconv_compose_backward(grad, W, D, need_w, need_d)
            return (grad_w if need_w else None), (grad_d if need_d else None), None
        return (*_torch_compose_backward(grad, W, D, ctx.groups, need_w, need_d), None)


def _torch_compose(W: torch.Tensor, D: torch.Tensor, groups: int) -> torch.Tensor:  # noqa: N803
    """W' (C_out, C_in/g, M*N) from W (C_in, D_mul, C_out/g) and D (C_in, M*N, D_mul) with torch ops."""
    composed = torch.bmm(D, W)  # (C_in, M*N, C_out/g)
    if groups == 1:
        # (C_in*M*N, C_out) -> (C_out, C_in*M*N) as a 2-D transpose, which torch copies in cache
        # blocks (~2.5x faster than the equivalent 3-D permute for the large layers)
        c_in, area, c_out = composed.shape
        return composed.reshape(c_in * area, c_out).t().contiguous().view(c_out, c_in, area)
    # one copy here rather than one in each of conv2d's forward and backward (oneDNN wants it dense)
    return _from_input_major(composed, groups).contiguous()  # (C_out, C_in/g, M*N)


def _torch_compose_backward(
    grad: torch.Tensor,
    W: torch.Tensor,  # noqa: N803
    D: torch.Tensor,  # noqa: N803
    groups: int,
    need_w: bool,
    need_d: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dL/dW, dL/dD) from grad = dL/dW' (C_out, C_in/g, M*N) with torch ops (differentiable, any dtype / device).

    W (C_in, D_mul, C_out/g) and D (C_in, M*N, D_mul) as in ``compose_kernel``; a gradient not needed is None.
    """
    if groups == 1:  # blocked 2-D transpose to a dense (C_in, M*N, C_out): both bmms then stream
        c_out, c_in, area = grad.shape
        grad = grad.reshape(c_out, c_in * area).t().contiguous().view(c_in, area, c_out)
    else:
        grad = _to_input_major(grad, groups)  # (C_in, M*N, C_out/g)
    grad_w = torch.bmm(D.transpose(1, 2), grad) if need_w else None
    # (W grad^T)^T rather than grad W^T: the same product, ~1.5x faster for the strided grad view
    grad_d = torch.bmm(W, grad.transpose(1, 2)).transpose(1, 2) if need_d else None
    return grad_w, grad_d


_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)  # nn.Parameter(subclass data) keeps the subclass's type


def native_weight_ready(W: torch.Tensor, d_delta: torch.Tensor) -> bool:  # noqa: N803
    """Whether ``DOConv2d.weight`` may compose with the native ``doconv_weight`` op (the shapes are the module's).

    The operands must be plain float32 CPU tensors (no Python tensor subclass), with no forward-mode AD level,
    torch.func transform, torch dispatch mode (fake tensors, FLOP counting, convzoo's profiler) or tracing
    active: all of these see the torch composition instead. Autocast needs no check: the composition runs in
    float32 either way. Cheaper than ``native_compose_applies`` (plain type checks rather than dispatch keys;
    no per-tensor autograd checks, which the op's C++ autograd handles itself): it runs once per layer per step.
    """
    return (
        type(W) in _PLAIN_TENSOR_TYPES
        and type(d_delta) in _PLAIN_TENSOR_TYPES
        and W.dtype == torch.float32
        and d_delta.dtype == torch.float32
        and W.is_cpu
        and d_delta.is_cpu
        and not transform_active()
        and not is_in_torch_dispatch_mode()
        and not is_tracing()
        and native_ops() is not None
    )


def native_weight_shape(W: torch.Tensor, d_delta: torch.Tensor, groups: int) -> bool:  # noqa: N803
    """The shapes the native ``doconv_weight`` op composes: groups = 1, M*N = D_mul = 9 (3x3, 1x9, 9x1), C_in and C_out
    multiples of 16 (read from the parameters on every call, so a module edited after construction is judged
    by what it holds)."""
    c_in, d_mul, c_out = W.shape
    return (
        groups == 1
        and d_mul == NATIVE_AREA
        and d_delta.shape[1] == NATIVE_AREA
        and d_delta.shape[2] == NATIVE_AREA
        and c_in % 16 == 0
        and c_out % 16 == 0
    )


def composed_weight(
    W: torch.Tensor,  # noqa: N803
    d_delta: torch.Tensor,
    groups: int,
    kernel_size: tuple[int, int],
) -> torch.Tensor:
    """``DOConv2d.weight``: W' = (D' + I) W as the conv's kernel, (C_out, C_in/groups, M, N).

    Args:
        W: (C_in, D_mul, C_out/groups), input-major; d_delta: D' (C_in, M*N, D_mul); groups, kernel_size: the conv's.

    The native kernels where they apply (``native_weight_shape`` and ``native_weight_ready``), else the torch
    composition. Wrapped for fx (``torch.fx.wrap``): an fx symbolic trace (torchvision's
    ``create_feature_extractor``, FX quantization) records this call rather than tracing into its checks,
    and the traced graph picks the path when it runs, as the layer does.
    """
    if native_weight_shape(W, d_delta, groups) and native_weight_ready(W, d_delta):
        # one op with its autograd in C++ (csrc/doconv_compose.cpp, ComposedWeight): W' straight from the
        # parameters, D = D' + I added as the kernels read D' (never formed; dL/dD' = dL/dD), allocated 4-D by the
        # kernel (no view op). Its backward runs the native kernel too, except under create_graph (double
        # backward), for an unusual incoming gradient (not a plain float32 CPU tensor) or under a dispatch mode,
        # where it takes the differentiable torch form. The same bits as compose_kernel(W, D' + I, 1) natively.
        return native_ops().doconv_weight(W, d_delta, kernel_size)
    return compose_kernel(W, d_from_delta(d_delta), groups).reshape(W.shape[2] * groups, -1, *kernel_size)


fx.wrap("composed_weight")


def compose_kernel(W: torch.Tensor, D: torch.Tensor, groups: int) -> torch.Tensor:  # noqa: N803
    """Kernel composition (paper §3) with D tied to the input channel each slice of W reads.

    Args:
        W: (C_in, D_mul, C_out/groups), input-major (see ``DOConv2d.W``).
        D: (C_in, M*N, D_mul).
        groups: the conv's groups.

    Returns:
        W' of shape (C_out, C_in/groups, M*N), possibly a strided view, in W's dtype.

    Under autocast the composition runs with autocast off, in the parameters' precision (the conv
    casts W' itself): autocast would run the ``bmm`` in float16 / bfloat16, and the custom backward
    would then get a reduced-precision gradient next to its float32 saved W and D.
    """
    if autocast_enabled(W.device):
        with torch.autocast(W.device.type, enabled=False):
            return compose_kernel(W, D, groups)
    if transform_active():
        # forward-mode AD and torch.func (grad, vmap, jvp, ...) differentiate the torch ops themselves; the
        # custom backward has neither a jvp nor functorch's setup_context form
        return _torch_compose(W, D, groups)
    return _ComposeKernel.apply(W, D, groups)


@register_conv(
    "doconv",
    description="DO-Conv / DO-DConv / DO-GConv: depthwise over-parameterized k x k conv, folds into nn.Conv2d",
    skip_reason=needs_spatial_kernel,
    exact_weight=True,  # weight is the composed kernel: a parent block that folds from conv.weight folds it right
)
class DOConv2d(NoTorchScript, ConvAttributes, nn.Module):
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
        if not is_int(d_mul):
            raise TypeError(f"d_mul must be an int, got {d_mul!r}")
        d_mul = int(d_mul)
        if d_mul < area:
            raise ValueError(
                f"d_mul must be >= kernel area M*N = {area} (d_mul < M*N is a depthwise separable conv, "
                f"not an over-parameterization), got d_mul={d_mul}"
            )
        self.spec = spec
        self.d_mul = d_mul
        factory = {"device": device, "dtype": dtype}
        self.W = nn.Parameter(torch.empty(in_channels, d_mul, out_channels // groups, **factory))
        self.d_delta = nn.Parameter(torch.zeros(in_channels, area, d_mul, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W as nn.Conv2d initialises its kernel (same fan-in when d_mul = M*N); D' = 0."""
        paper_w = torch.empty(self.out_channels, self.in_channels // self.groups, self.d_mul)
        nn.init.kaiming_uniform_(paper_w, a=math.sqrt(5))
        with torch.no_grad():
            self.W.copy_(_to_input_major(paper_w, self.groups))
        nn.init.zeros_(self.d_delta)
        if self.bias is not None:
            fan_in = (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def D(self) -> torch.Tensor:  # noqa: N802  (the paper's name)
        """The over-parameterization kernel D = D' + I, shape (C_in, M*N, D_mul) (see ``d_from_delta``)."""
        return d_from_delta(self.d_delta)

    @property
    def W_paper(self) -> torch.Tensor:  # noqa: N802
        """W in the paper's layout, (C_out, C_in/groups, D_mul) (a view of the input-major parameter)."""
        return _from_input_major(self.W, self.groups)

    @property
    def weight(self) -> torch.Tensor:
        """The composed kernel W' (C_out, C_in/groups, M, N), what an equivalent nn.Conv2d holds."""
        return composed_weight(self.W, self.d_delta, self.groups, self.kernel_size)

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
            paper_w = conv.weight.new_zeros(conv.out_channels, conv.in_channels // conv.groups, module.d_mul)
            paper_w[..., :area] = conv.weight.reshape(conv.out_channels, -1, area)
            module.W.copy_(_to_input_major(paper_w, spec.groups))
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
        # D' factors the kernel with W: a frozen kernel freezes both
        inherit_requires_grad(conv, weights=(module.W, module.d_delta), biases=(module.bias,))
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
