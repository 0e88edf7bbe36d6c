"""Multiception: depthwise multiscale convolution (Bao, Graeber & Wang, ICARCV 2020).

The authors' structure (their ``convolution.py``), for C input channels and K kernel sizes::

    x (B, C, H, W)
      -> K depthwise convs, one per kernel size k_j ('same' padding, no bias), each on all C channels
      -> concatenate in branch order: channel j*C + c is branch j on input channel c   (B, K*C, H, W)
      -> BatchNorm(K*C), no activation
      -> 1x1 conv K*C -> C_out, with bias, carrying the stride
      -> BatchNorm(C_out)                                                              (B, C_out, H', W')

:class:`MulticeptionConv2d` computes the same function with the stride taken in the depthwise
step (identical in eval mode; the depthwise work drops by stride**2) and, on CPU, runs the
depthwise step in channels-last layout, where oneDNN's depthwise kernels are several times
faster (above all the weight gradient of 5x5 / 7x7 kernels). In CPU training, layers with a kernel
wider than 3 run the branches, BN(K*C) and the 1x1 as one op with column-block weight gradients
(:mod:`convzoo.ops.multiception_train`, :mod:`convzoo.ops.depthwise`). :class:`MulticeptionOfficial` is
the authors' form, kept as the reference for tests and benchmarks.

``fuse()`` gives :class:`FusedMulticeptionConv2d`: ONE depthwise conv ``C -> K*C`` with
channel multiplier K (each branch's kernel zero-padded, centred, to the largest size) and ONE
1x1 conv with both BatchNorms folded in (BN(K*C) folds forward into the 1x1, exact in eval mode).

Parameters of one layer: ``C * sum(k_j**2)`` (depthwise) + ``2*K*C`` (BN(K*C)) +
``K*C*C_out + C_out`` (1x1 with bias) + ``2*C_out`` (BN(C_out)).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convzoo.native import native_ops, native_ready
from convzoo.ops.autotune import AlgorithmCache
from convzoo.ops.conv_spec import (
    ConvSpec,
    NoTorchScript,
    PaddingArg,
    check_channels,
    check_input,
    is_int,
    is_tracing,
    memory_format_of,
    relayout,
    to_pair,
    transform_active,
)
from convzoo.ops.depthwise import run_depthwise
from convzoo.ops.multiception_train import branches_norm_pointwise, fused_training_applies
from convzoo.ops.registry import ConvNotReplaceableError, needs_dense_spatial, register_conv
from convzoo.ops.weight_cache import WeightCache

# Per-stage kernel schedules for three-stage CIFAR networks. "code" is what the authors'
# ResNets use (stage 3 is two parallel 3x3 branches); "paper" follows the text ("first third:
# all three kernels; last third: 3x3 only"), with the middle third as in the code.
SCHEDULES: dict[str, tuple[tuple[int, ...], ...]] = {
    "code": ((3, 5, 7), (3, 5), (3, 3)),
    "paper": ((3, 5, 7), (3, 5), (3,)),
}

FUSED_ALGORITHMS = ("auto", "canonical", "branch", "accumulate", "dense", "native")
"""How :class:`FusedMulticeptionConv2d` computes its output in eager mode (all exact)."""

NATIVE_KERNEL_SIZES = frozenset({1, 3, 5, 7, 9, 11})
"""Branch kernel sizes the native kernel (``csrc/multiception_fused.cpp``) is compiled for."""

# On CPU, the deploy form runs in batch chunks whose K*C intermediate is about this size, so it
# stays in cache between the depthwise and the 1x1 conv.
_CHUNK_BYTES = 4 << 20


def check_kernels(kernels: object) -> tuple[int, ...]:
    """Validate a non-empty sequence of odd positive kernel sizes (repeats allowed)."""
    if isinstance(kernels, int | str) or not isinstance(kernels, Sequence):
        raise TypeError(f"kernels must be a non-empty sequence of odd ints such as (3, 5, 7), got {kernels!r}")
    values = tuple(int(k) if is_int(k) else k for k in kernels)  # numpy ints as nn.Conv2d takes them
    if not values:
        raise ValueError("kernels must be a non-empty sequence of odd ints such as (3, 5, 7), got an empty one")
    for k in values:
        if not is_int(k):
            raise TypeError(f"kernels must hold ints, got {k!r} in {kernels!r}")
        if k < 1 or k % 2 == 0:
            raise ValueError(
                f"kernels must be odd positive ints (centred 'same' padding needs an odd size), got {k} in {kernels!r}"
            )
    return values


def check_centred_geometry(kernel_size: object, stride: object, padding: object) -> tuple[tuple[int, int], ...]:
    """Validate the geometry of the replaced conv: odd kernel with centred padding (k - 1) / 2.

    Multiception (and DSConv / MixConv) output ``floor((H - 1) / s) + 1`` rows, which is what
    a conv of kernel k, stride s and padding (k - 1) / 2 outputs. Returns (kernel, stride, padding).
    """
    kernel = to_pair(kernel_size, "kernel_size")
    if kernel[0] % 2 == 0 or kernel[1] % 2 == 0:
        raise ValueError(f"kernel_size must be odd (centred geometry), got {kernel_size!r}")
    stride_pair = to_pair(stride, "stride")
    centred = (kernel[0] // 2, kernel[1] // 2)
    if padding is None:
        return kernel, stride_pair, centred
    if padding == "same":
        if stride_pair != (1, 1):
            raise ValueError(f"padding='same' requires stride=1 (as in nn.Conv2d), got stride={stride!r}")
        return kernel, stride_pair, centred
    if isinstance(padding, str):
        raise ValueError(f"unsupported padding {padding!r}: use None, 'same' or {centred} (centred for {kernel})")
    pad = to_pair(padding, "padding", minimum=0)
    if pad != centred:
        raise ValueError(
            f"unsupported padding {padding!r} for kernel_size {kernel}: only the centred padding {centred} "
            "(or None / 'same') keeps the output size of the conv being replaced"
        )
    return kernel, stride_pair, centred


def centred_replaceable(conv: nn.Conv2d) -> str | None:
    """Dense k x k convs with zero, centred padding and no dilation; else why not (a skip reason)."""
    reason = needs_dense_spatial(conv)
    if reason is not None:
        return reason
    if tuple(conv.dilation) != (1, 1):
        return f"dilated conv (dilation={tuple(conv.dilation)})"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is supported)"
    padding = None if conv.padding == "same" else conv.padding
    try:
        check_centred_geometry(tuple(conv.kernel_size), tuple(conv.stride), padding)
    except ValueError as error:
        return str(error)
    return None


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as ``x * scale + shift`` per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


class _MulticeptionBase(NoTorchScript, nn.Module):
    """Shared geometry and attributes: (B, C_in, H, W) -> (B, C_out, floor((H-1)/s)+1, ...).

    Every form also takes an unbatched (C_in, H, W) input, run as a batch of one (as ``nn.Conv2d``).
    """

    def _init_geometry(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int],
        padding: PaddingArg | None,
        kernels: Sequence[int],
    ) -> None:
        self.in_channels = check_channels(in_channels, "in_channels")
        self.out_channels = check_channels(out_channels, "out_channels")
        self.kernels = check_kernels(kernels)
        self.kernel_size, self.stride, self.padding = check_centred_geometry(kernel_size, stride, padding)
        self.dilation = (1, 1)
        self.groups = 1

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernels={self.kernels}"
        return s + (f", stride={self.stride}" if self.stride != (1, 1) else "")


@register_conv(
    "multiception",
    description="Multiception: depthwise convs of several sizes on all channels, concat, BN, 1x1, BN "
    "(paper placement: first conv of each basic block)",
    skip_reason=centred_replaceable,
    zoo_default=False,
)
class MulticeptionConv2d(_MulticeptionBase):
    """Depthwise multiception convolution, fast training form (stride in the depthwise step).

    Args:
        in_channels, out_channels: C_in, C_out.
        kernel_size, stride, padding: geometry of the conv it replaces; ``kernel_size`` must be odd
            and ``padding`` None, 'same' or the centred (k - 1) / 2. The output size is that conv's.
        kernels: keyword-only, the depthwise kernel sizes, odd, repeats allowed ((3, 3) = two
            parallel 3x3 branches).
        device, dtype: factory arguments.

    Submodules (state-dict layout of the authors' code, renamed): ``branches`` (K depthwise
    ``nn.Conv2d(C, C, k, stride, k // 2, groups=C, bias=False)``), ``bn_in`` (BatchNorm over K*C
    channels, branch-major order ``j*C + c``), ``pointwise`` (1x1, bias), ``bn_out``.

    Shapes:
        (B, C_in, H, W) -> (B, C_out, floor((H - 1) / s) + 1, floor((W - 1) / s) + 1)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg | None = None,
        *,
        kernels: Sequence[int] = (3, 5, 7),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, kernels)
        factory = {"device": device, "dtype": dtype}
        c, k_count = self.in_channels, len(self.kernels)
        self.branches = nn.ModuleList(
            nn.Conv2d(c, c, k, self.stride, k // 2, groups=c, bias=False, **factory) for k in self.kernels
        )
        self.bn_in = nn.BatchNorm2d(c * k_count, **factory)
        self.pointwise = nn.Conv2d(c * k_count, self.out_channels, 1, bias=True, **factory)
        self.bn_out = nn.BatchNorm2d(self.out_channels, **factory)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_in, H, W) -> (B, C_out, H', W'); on CPU the depthwise step runs channels-last."""
        if check_input(x, self.in_channels, "MulticeptionConv2d"):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if is_tracing() or transform_active() or x.device.type != "cpu":
            return self.bn_out(self.pointwise(self.bn_in(torch.cat([branch(x) for branch in self.branches], dim=1))))
        fmt = memory_format_of(x)
        x = relayout(x, torch.channels_last)
        if fused_training_applies(x, self.branches, self.bn_in, self.pointwise):
            y = branches_norm_pointwise(x, self.branches, self.bn_in, self.pointwise)
        else:
            y = self.pointwise(self.bn_in(torch.cat([run_depthwise(branch, x) for branch in self.branches], dim=1)))
        # back to the caller's layout before bn_out: BN's backward is slow when its gradient and input differ
        return self.bn_out(y.contiguous(memory_format=fmt))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, kernels: Sequence[int] = (3, 5, 7)) -> MulticeptionConv2d:
        """A freshly initialised Multiception with ``conv``'s geometry, device and dtype."""
        reason = centred_replaceable(conv)
        if reason is not None:
            raise ConvNotReplaceableError(
                f"cannot replace {ConvSpec.from_conv(conv).describe()} by a Multiception: {reason}"
            )
        return cls(
            conv.in_channels,
            conv.out_channels,
            tuple(conv.kernel_size),
            tuple(conv.stride),
            None,
            kernels=kernels,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )

    @torch.no_grad()
    def fuse(self) -> FusedMulticeptionConv2d:
        """The inference form: one depthwise conv (multiplier K) + one 1x1 conv, both BNs folded (exact in eval).

        Its parameters come frozen (``requires_grad=False``), as an inference form's are.
        """
        c, k_count, k_max = self.in_channels, len(self.kernels), max(self.kernels)
        like = {"device": self.pointwise.weight.device, "dtype": self.pointwise.weight.dtype}
        fused = FusedMulticeptionConv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, kernels=self.kernels, **like
        )
        depthwise = torch.zeros(c, k_count, k_max, k_max, **like)
        for j, (k, branch) in enumerate(zip(self.kernels, self.branches)):
            offset = (k_max - k) // 2
            depthwise[:, j, offset : offset + k, offset : offset + k] = branch.weight[:, 0]
        fused.depthwise.weight.copy_(depthwise.reshape(c * k_count, 1, k_max, k_max))
        in_scale, in_shift = _bn_scale_shift(self.bn_in)
        out_scale, out_shift = _bn_scale_shift(self.bn_out)
        # in the wider of the two dtypes (a float32 BN in a float16 model); copy_ casts to the fused form's
        dtype = torch.promote_types(like["dtype"], in_shift.dtype)
        weight = self.pointwise.weight.flatten(1).to(dtype)  # (C_out, K*C), branch-major columns
        bias = weight @ in_shift.to(dtype) + self.pointwise.bias
        weight = out_scale[:, None] * weight * in_scale[None, :]
        # branch-major (j*C + c) -> channel-major (c*K + j), the multiplier conv's output order
        weight = weight.reshape(self.out_channels, k_count, c).transpose(1, 2).reshape(self.out_channels, -1)
        fused.pointwise.weight.copy_(weight[:, :, None, None])
        fused.pointwise.bias.copy_(out_scale * bias + out_shift)
        fused.train(self.training)
        # an inference form, frozen like CACSparseConv2d: its fast window forms need no autograd graph
        # (call requires_grad_(True) to fine-tune it; the exact canonical form then runs)
        return fused.requires_grad_(False)


class FusedMulticeptionConv2d(_MulticeptionBase):
    """Deploy form: ``depthwise`` (C -> K*C, k_max x k_max, groups=C, no bias) then ``pointwise`` (1x1, bias).

    Output channel ``c*K + j`` of ``depthwise`` is branch j on input channel c; taps outside each
    branch's centred k_j x k_j window are zero. The module is exactly ``pointwise(depthwise(x))``,
    which is what fx / torch.jit.trace / torch.export see, so exported graphs hold one depthwise and
    one 1x1 conv. In eager mode it runs the fastest of these exact forms (``algorithm``):

    * ``"canonical"``: ``pointwise(depthwise(x))`` as written;
    * ``"branch"`` (CPU): only the non-zero centred window of each branch is convolved (the zero
      taps are checked, once per weight version), in channels-last layout and in batch chunks
      small enough for the K*C intermediate to stay in cache;
    * ``"accumulate"`` (CPU): the same branch windows, each followed by its share of the 1x1 as a
      1x1 conv added in place into the output (no K*C concatenation);
    * ``"dense"``: the two convs multiplied out into one dense k_max x k_max conv C_in -> C_out,
      ``W[o, c] = sum_j P[o, c*K + j] * D[c*K + j]`` (cached per weight version). It has more MACs,
      but for few channels oneDNN runs it about as fast as the 3x3 conv that Multiception replaced;
    * ``"native"`` (CPU, float32, C_in and C_out multiples of 16, stride 1 or 2, branch kernels of at
      most 11): convzoo's C++ kernel (``convzoo.native``, built on first use), which computes the branch
      windows of a few pixels into a small buffer and feeds them straight to the 1x1: the K*C
      intermediate never goes to memory. Where it does not apply, or cannot be built, it runs
      "canonical";
    * ``"auto"`` (default): time the candidates of the device (CPU: branch, accumulate, dense, and
      native where it applies; otherwise: canonical, dense) on the first input of each shape / layout /
      dtype, like ``torch.backends.cudnn.benchmark``, and keep the winner (``last_algorithm`` tells
      which ran).

    When autograd records a graph (an input or a parameter requires grad, grad mode on), every
    algorithm but "dense" (multiplied out with autograd) runs "canonical": the window forms skip
    the zero taps, which are parameters of this module too, so only these two give all gradients.

    Shapes:
        (B, C_in, H, W) -> (B, C_out, floor((H - 1) / s) + 1, floor((W - 1) / s) + 1)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg | None = None,
        *,
        kernels: Sequence[int] = (3, 5, 7),
        algorithm: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, kernels)
        if algorithm not in FUSED_ALGORITHMS:
            raise ValueError(f"algorithm must be one of {FUSED_ALGORITHMS}, got {algorithm!r}")
        self.algorithm = algorithm
        factory = {"device": device, "dtype": dtype}
        c, k_count, k_max = self.in_channels, len(self.kernels), max(self.kernels)
        self.depthwise = nn.Conv2d(c, c * k_count, k_max, self.stride, k_max // 2, groups=c, bias=False, **factory)
        self.pointwise = nn.Conv2d(c * k_count, self.out_channels, 1, bias=True, **factory)
        self._window_check: WeightCache[bool] = WeightCache()
        self._dense_cache: WeightCache[Tensor] = WeightCache()
        self._native_cache: WeightCache[tuple[Tensor, Tensor, Tensor]] = WeightCache()
        self._algorithms = AlgorithmCache()
        self.last_algorithm: str | None = None

    def _windows_hold_all_taps(self) -> bool:
        """Whether every tap outside each branch's centred window is zero (cached per weight version)."""
        weight = self.depthwise.weight

        def check() -> bool:
            k_max = max(self.kernels)
            grid = weight.detach().reshape(self.in_channels, len(self.kernels), k_max, k_max)
            outside = torch.ones_like(grid, dtype=torch.bool)
            for j, k in enumerate(self.kernels):
                o = (k_max - k) // 2
                outside[:, j, o : o + k, o : o + k] = False
            return not bool(grid[outside].any())

        return self._window_check.get((weight,), check)

    def _branch_forward(self, x: Tensor) -> Tensor:
        """Branch-by-branch depthwise convs on the centred windows, then the 1x1 (channel-major order)."""
        c, k_count, k_max = self.in_channels, len(self.kernels), max(self.kernels)
        grid = self.depthwise.weight.reshape(c, k_count, k_max, k_max)
        windows = []
        for j, k in enumerate(self.kernels):
            o = (k_max - k) // 2
            windows.append(grid[:, j : j + 1, o : o + k, o : o + k])
        # branch-major concatenation needs the 1x1 weight's columns in branch-major order
        weight = self.pointwise.weight.reshape(self.out_channels, c, k_count).transpose(1, 2)
        weight = weight.reshape(self.out_channels, k_count * c, 1, 1)
        out_h, out_w = (x.shape[2] - 1) // self.stride[0] + 1, (x.shape[3] - 1) // self.stride[1] + 1
        per_image = k_count * c * out_h * out_w * x.element_size()
        rows = max(1, _CHUNK_BYTES // max(per_image, 1))
        outputs = []
        for part in x.split(rows):
            z = torch.cat([F.conv2d(part, w, None, self.stride, w.shape[-1] // 2, 1, c) for w in windows], dim=1)
            outputs.append(F.conv2d(z, weight, self.pointwise.bias))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def convzoo_macs(self, input: Tensor, output: Tensor) -> int:
        """MACs of the batch by the deploy form's formula, whichever algorithm ran (``convzoo.profile``).

        Per output position: each branch's non-zero k_j x k_j window on C_in channels, then the
        1x1 over K*C_in channels: ``C_in * sum(k_j**2) + K * C_in * C_out``.
        """
        per_position = self.in_channels * sum(k * k for k in self.kernels)
        per_position += len(self.kernels) * self.in_channels * self.out_channels
        return per_position * output.shape[0] * output.shape[-2] * output.shape[-1]

    def _multiplied_out(self, depthwise: Tensor, pointwise: Tensor) -> Tensor:
        """W[o, c] = sum_j P[o, c*K + j] * D[c*K + j]: (C_out, C_in, k_max, k_max)."""
        c, k_count, k_max = self.in_channels, len(self.kernels), max(self.kernels)
        return torch.einsum(
            "ocj,cjhw->ochw",
            pointwise.reshape(self.out_channels, c, k_count),
            depthwise.reshape(c, k_count, k_max, k_max),
        ).contiguous()

    def dense_weight(self) -> Tensor:
        """The two convs multiplied out: (C_out, C_in, k_max, k_max), detached, cached per weight version."""
        dw, pw = self.depthwise.weight, self.pointwise.weight
        return self._dense_cache.get((dw, pw), lambda: self._multiplied_out(dw.detach(), pw.detach()))

    def _needs_grad(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _dense_forward(self, x: Tensor) -> Tensor:
        if self._needs_grad(x):  # multiply out with autograd (the cached weight is detached)
            weight = self._multiplied_out(self.depthwise.weight, self.pointwise.weight)
        else:
            weight = self.dense_weight()
        return F.conv2d(x, weight, self.pointwise.bias, self.stride, max(self.kernels) // 2)

    def _branch_layout_forward(self, x: Tensor) -> Tensor:
        fmt = memory_format_of(x)
        y = self._branch_forward(x.contiguous(memory_format=torch.channels_last))
        return y.contiguous(memory_format=fmt)

    def _accumulate_forward(self, x: Tensor) -> Tensor:
        """Branch windows (channels-last), each followed by its share of the 1x1 as a 1x1 conv added into
        the output: no K*C concatenation."""
        c, k_count, k_max = self.in_channels, len(self.kernels), max(self.kernels)
        grid = self.depthwise.weight.reshape(c, k_count, k_max, k_max)
        # the 1x1 weight's columns are channel-major (c*K + j): branch j's share is P[:, j::K]
        pointwise = self.pointwise.weight.reshape(self.out_channels, c, k_count)
        fmt = memory_format_of(x)
        x = x.contiguous(memory_format=torch.channels_last)
        out = None
        for j, k in enumerate(self.kernels):
            o = (k_max - k) // 2
            z = F.conv2d(x, grid[:, j : j + 1, o : o + k, o : o + k], None, self.stride, k // 2, 1, c)
            share = pointwise[:, :, j, None, None].contiguous()  # (C_out, C, 1, 1)
            out = F.conv2d(z, share, self.pointwise.bias) if out is None else out.add_(F.conv2d(z, share))
        return out.contiguous(memory_format=fmt)

    def _native_applies(self, x: Tensor) -> bool:
        """Whether the native kernel can compute this call (the cheap checks first; the last one builds it)."""
        return (
            self.in_channels % 16 == 0
            and self.out_channels % 16 == 0
            and self.stride[0] == self.stride[1] in (1, 2)
            and set(self.kernels) <= NATIVE_KERNEL_SIZES
            and self._windows_hold_all_taps()
            and native_ready(x, self.depthwise.weight, self.pointwise.weight, self.pointwise.bias)
        )

    def native_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The native kernel's operands, cached per weight version, detached.

        Returns depthwise (K, k_max, k_max, C_in), pointwise (K*C_in, C_out) with row ``j*C_in + c``
        for branch j on channel c, and the bias (C_out,).
        """
        dw, pw, bias = self.depthwise.weight, self.pointwise.weight, self.pointwise.bias

        def pack() -> tuple[Tensor, Tensor, Tensor]:
            c, k_count, k_max = self.in_channels, len(self.kernels), max(self.kernels)
            depthwise = dw.detach().reshape(c, k_count, k_max, k_max).permute(1, 2, 3, 0).contiguous()
            pointwise = pw.detach().reshape(self.out_channels, c, k_count).permute(2, 1, 0)
            pointwise = pointwise.reshape(k_count * c, self.out_channels).contiguous()
            return depthwise, pointwise, bias.detach().contiguous()

        return self._native_cache.get((dw, pw, bias), pack)

    def _native_forward(self, x: Tensor) -> Tensor:
        depthwise, pointwise, bias = self.native_weights()
        ops = native_ops()
        return ops.multiception_fused(x, depthwise, list(self.kernels), pointwise, bias, self.stride[0])

    def _run(self, algorithm: str, x: Tensor, native_applies: bool | None = None) -> Tensor:
        """Run ``algorithm`` where it applies, "canonical" where it does not; ``last_algorithm`` says which ran.

        ``native_applies``: ``_native_applies(x)`` if the caller already knows it.
        """
        if algorithm == "native" and not (self._native_applies(x) if native_applies is None else native_applies):
            algorithm = "canonical"
        if algorithm in ("branch", "accumulate") and not self._windows_hold_all_taps():
            algorithm = "canonical"
        self.last_algorithm = algorithm
        if algorithm == "native":
            return self._native_forward(x)
        if algorithm == "branch":
            return self._branch_layout_forward(x)
        if algorithm == "accumulate":
            return self._accumulate_forward(x)
        if algorithm == "dense":
            return self._dense_forward(x)
        return self.pointwise(self.depthwise(x))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_in, H, W) -> (B, C_out, H', W')."""
        if check_input(x, self.in_channels, "FusedMulticeptionConv2d"):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if is_tracing():
            return self.pointwise(self.depthwise(x))
        if transform_active():  # torch.func / forward AD: the torch ops, which every transform handles
            self.last_algorithm = "canonical"
            return self.pointwise(self.depthwise(x))
        algorithm = self.algorithm
        if algorithm != "dense" and self._needs_grad(x):
            # the window forms skip the zero taps, which are parameters too: only these two give their gradients
            self.last_algorithm = "canonical"
            return self.pointwise(self.depthwise(x))
        native_applies = None
        if algorithm == "auto":
            names = ("branch", "accumulate", "dense") if x.device.type == "cpu" else ("canonical", "dense")
            if "branch" in names and not self._windows_hold_all_taps():
                names = ("canonical", "dense")
            elif "branch" in names:
                native_applies = self._native_applies(x)
                names = (*names, "native") if native_applies else names
            algorithm = self._algorithms.choose(x, {name: partial(self._run, name, x) for name in names})
        return self._run(algorithm, x, native_applies)


class MulticeptionOfficial(_MulticeptionBase):
    """The authors' form, the reference for tests and benchmarks: stride in the 1x1 step.

    Same submodules and state-dict keys as :class:`MulticeptionConv2d`, but the depthwise convs run
    at full resolution (stride 1) and ``pointwise`` carries the stride, as in the authors' code.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg | None = None,
        *,
        kernels: Sequence[int] = (3, 5, 7),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, kernels)
        factory = {"device": device, "dtype": dtype}
        c, k_count = self.in_channels, len(self.kernels)
        self.branches = nn.ModuleList(
            nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=False, **factory) for k in self.kernels
        )
        self.bn_in = nn.BatchNorm2d(c * k_count, **factory)
        self.pointwise = nn.Conv2d(c * k_count, self.out_channels, 1, self.stride, bias=True, **factory)
        self.bn_out = nn.BatchNorm2d(self.out_channels, **factory)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_in, H, W) -> (B, C_out, H', W')."""
        if check_input(x, self.in_channels, "MulticeptionOfficial"):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        z = torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.bn_out(self.pointwise(self.bn_in(z)))

    @classmethod
    def from_multiception(cls, module: MulticeptionConv2d) -> MulticeptionOfficial:
        """The official form holding a copy of ``module``'s parameters and BN statistics."""
        weight = module.pointwise.weight
        official = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            kernels=module.kernels,
            device=weight.device,
            dtype=weight.dtype,
        )
        official.load_state_dict(module.state_dict())
        official.train(module.training)
        return official

    @torch.no_grad()
    def fuse(self) -> FusedMulticeptionConv2d:
        """Same deploy form as :meth:`MulticeptionConv2d.fuse` (the stride moves to the depthwise step)."""
        fast = MulticeptionConv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            kernels=self.kernels,
            device=self.pointwise.weight.device,
            dtype=self.pointwise.weight.dtype,
        )
        fast.load_state_dict(self.state_dict())
        fast.train(self.training)
        return fast.fuse()


def multiception_parameter_count(in_channels: int, out_channels: int, kernels: Sequence[int]) -> int:
    """Parameters of one layer: C*sum(k^2) + 2*K*C + K*C*C_out + C_out + 2*C_out."""
    kernels = check_kernels(kernels)
    c, k_count = in_channels, len(kernels)
    return c * sum(k * k for k in kernels) + 2 * k_count * c + k_count * c * out_channels + 3 * out_channels
