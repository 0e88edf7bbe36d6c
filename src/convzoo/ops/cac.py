"""CAC: content-aware convolution (Guo et al.), the training form and its score map.

A CAC layer convolves each *sharp* window with its k×k kernel ``W`` and each *smooth*
window with the 1×1 kernel ``Σw`` (eq. 6, the kernel summed over its taps) applied to the
window's centre pixel. Windows are told apart by a score map with one score per output
position:

1. ``X̄`` = the channel mean of the input (eq. 9), padded with the conv's padding and mode;
2. ``G`` = the Sobel gradient magnitude of ``X̄`` (eq. 10), evaluated at each window's centre
   tap with the conv's stride and dilation (so the 3×3 Sobel taps are the window's own centre
   tap and its neighbouring taps: for a 3×3 kernel exactly the window);
3. ``M = sigmoid(γ·G + β)`` (eq. 11) with learnable scalars γ, β; a window is sharp iff
   ``M > 0.5`` (eq. 12), evaluated as ``γ·G + β > 0`` (the same set, without sigmoid rounding), by its exact
   sign (:func:`sharp_test`).

**Window centre.** The centre of a kernel dimension of size ``k`` is tap ``c = (k - 1) // 2``,
which is at input offset ``dilation · c`` from the window's first tap. For odd ``k`` this is the
geometric centre; for even ``k`` the geometric centre falls between two taps and we take the
earlier one (for dilation 1 that is the pixel ``padding='same'`` aligns the output with). Every
output position therefore reads a real pixel of its own window (the authors' code crops the
1×1 output from the top-left, reading a corner pixel and zeroing the top and left borders).
Where a kernel dimension is shorter than 3 a Sobel tap falls one step outside the window; the
(padded) mean map is extended there by replicate padding. Grouped convs are supported: Σw is taken
per group and the channel mean spans all input channels.

**Training.** The forward pass uses the hard mask ``m = [γG + β > 0]``. Its gradient is the
straight-through estimator: backward treats ``∂m/∂M = 1``, so ``∂L/∂M = Σ_c ∂L/∂y · (y_kxk - y_1x1)``
and γ, β receive ``M(1 - M)·G`` and ``M(1 - M)`` times that. The output value is exactly
``where(m, y_kxk, y_1x1)``; one autograd op (``_PickStraightThrough``) makes the pick and gives the
estimator's gradient, as adding ``(M - M.detach()) · (y_kxk - y_1x1).detach()`` (0.0 in the forward pass)
would. γ starts at 0 and β at 1, so ``γG + β = 1 > 0`` for every window
(ρ = 1) and a converted model computes exactly what it did before.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from convzoo.native import native_ops, native_ready
from convzoo.ops.conv_spec import (
    ConvAttributes,
    ConvSpec,
    NoTorchScript,
    PaddingArg,
    check_input,
    inherit_requires_grad,
    is_tracing,
    tracing_a_graph,
    transform_active,
)
from convzoo.ops.registry import check_module, needs_spatial_kernel, register_conv

SCORE_MACS_PER_POSITION = 13
"""Score-map MACs per output position (eq. 16): four 3-tap 1-d convolutions plus the affine map."""


def centre_offset(spec: ConvSpec) -> tuple[int, int]:
    """Offset (rows, cols) of the window centre tap from the window's first tap, in padded input pixels."""
    return tuple(d * ((k - 1) // 2) for k, d in zip(spec.kernel_size, spec.dilation))  # type: ignore[return-value]


def window_taps(t: Tensor, dim: int, offset: int, extent: int, stride: int, lead: int = 0, trail: int = 0) -> Tensor:
    """Tap ``offset`` of every window along ``dim``, a strided view with one entry per output position.

    The windows span ``extent`` = d·(k−1)+1 entries and start at ``lead``, ``lead`` + stride, ... as long as
    they end before the last ``trail`` entries (margins outside the conv's padded input). The slice's end is
    the size minus a constant, so it holds exactly floor((size − lead − trail − extent) / stride) + 1 entries,
    the conv's output size, with no truncating slice: torch.export's dynamic shapes could not prove that
    truncation in bounds (a CAC model exported for one image size only).
    """
    start = lead + offset
    end = t.shape[dim] - (trail + extent - 1 - offset)
    taps = slice(start, end, stride)
    # no t.dim() (a proxy under fx symbolic tracing): count from the front or, for a negative dim, the back
    index = (*[slice(None)] * dim, taps) if dim >= 0 else (..., taps, *[slice(None)] * (-dim - 1))
    return t[index]


def pad_input(spec: ConvSpec, x: Tensor) -> Tensor:
    """x (B, C, H, W) padded explicitly as ``nn.Conv2d`` pads it (any padding mode): (B, C, H+pt+pb, W+pl+pr)."""
    pads = spec.explicit_padding
    if not any(pads):
        return x
    if spec.padding_mode == "zeros":
        return F.pad(x, pads)
    return F.pad(x, pads, mode=spec.padding_mode)


def _native_gradient_applies(spec: ConvSpec, x: Tensor, *scalars: Tensor) -> bool:
    """Whether the score map runs convzoo's native kernel (CPU float32, zero padding, kernels of at least 3×3).

    ``scalars``: γ and β, where the native kernel also makes eq. (12)'s test (detached, as the test passes no
    gradient). ``x`` is read detached: G passes no gradient back, so autograd on the input does not matter.
    Outside tracing (exporters record the torch form), torch.func and forward AD (they see the torch form too).
    """
    return (
        min(spec.kernel_size) >= 3
        and (spec.padding_mode == "zeros" or not any(spec.explicit_padding))
        and not is_tracing()
        and not transform_active()  # a detached dual tensor carries no tangent: check the transform itself
        and native_ready(x.detach(), *scalars)
    )


def gradient_map(spec: ConvSpec, x: Tensor, out_size: tuple[int, int]) -> Tensor:
    """Sobel gradient magnitude G (eq. 9-10) of the channel mean, one value per output position.

    Args:
        spec: the conv's geometry.
        x: input (B, C, H, W).
        out_size: (H', W'), the conv's output size for this input.

    Returns:
        G of shape (B, H', W'), >= 0, in x's dtype or float32 if that is wider.

        On CPU, for float32 inputs of layers with zero padding and kernels of at least 3×3 (outside
        autocast and tracing), G comes from convzoo's native kernel (``csrc/cac_gradient.cpp``: the same
        taps and order of operations, the input read once, equal to the torch form up to float32 rounding
        of the channel sum, whose order follows the layout). The training and the inference forms both
        call this function, so on the same input their masks agree exactly.

        G is computed from ``x.detach()``: the score map passes no gradient back into the features (only
        γ and β learn through the straight-through estimator), which also keeps backward finite where
        G = 0 (``hypot``'s gradient is undefined there; flat image regions such as the digits' background
        hit it on the first step).
    """
    if _native_gradient_applies(spec, x):
        return native_ops().cac_gradient(x.detach(), *_native_geometry(spec, out_size))
    # the channel sum divided on the 1-channel map (~2x faster than mean() over the channels of a
    # channels-last input on CPU), and G in at least float32: a float16 sum or Sobel response overflows
    # (to inf, then NaN) where the float32 one does not, which would turn sharp windows smooth
    precision = torch.promote_types(x.dtype, torch.float32)
    mean = x.detach().sum(dim=1, keepdim=True, dtype=precision) / x.shape[1]
    mean = pad_input(spec, mean)  # padding commutes with the channel mean
    margins = []
    for k, d in zip(spec.kernel_size, spec.dilation):
        centre = (k - 1) // 2
        margins.append((d * max(0, 1 - centre), d * max(0, centre + 2 - k)))  # Sobel taps outside the window
    (top, bottom), (left, right) = margins
    if top or bottom or left or right:
        mean = F.pad(mean, (left, right, top, bottom), mode="replicate")
    ch, cw = centre_offset(spec)
    (dh, dw), (sh, sw) = spec.dilation, spec.stride
    extent_h, extent_w = (d * (k - 1) + 1 for k, d in zip(spec.kernel_size, spec.dilation))
    mean = mean[:, 0]
    # Separable Sobel on strided views (no copies; a 1-channel conv2d is very slow on CPU): first along x
    # on every row, at the output columns: col[c] is tap column c of every window, (B, Hp, W').
    col = [window_taps(mean, 2, cw + (c - 1) * dw, extent_w, sw, left, right) for c in range(3)]
    diff_x = col[2] - col[0]  # [-1 0 1] along x
    smooth_x = torch.add(col[0] + col[2], col[1], alpha=2)  # [1 2 1] along x

    # then along y at the output rows: row(t, r) is tap row r of every window, (B, H', W')
    def row(t: Tensor, r: int) -> Tensor:
        return window_taps(t, 1, ch + (r - 1) * dh, extent_h, sh, top, bottom)

    grad_x = torch.add(row(diff_x, 0) + row(diff_x, 2), row(diff_x, 1), alpha=2)  # [1 2 1]^T ⊗ [-1 0 1]
    grad_y = row(smooth_x, 2) - row(smooth_x, 0)  # [-1 0 1]^T ⊗ [1 2 1]
    if is_tracing():  # exporters lack hypot (ONNX has no such op); same value up to the last bit
        return torch.sqrt(grad_x * grad_x + grad_y * grad_y)
    return torch.hypot(grad_x, grad_y)


def _layout_moves(spec: ConvSpec, x: Tensor) -> bool:
    """Whether :func:`score_windows` moves ``x`` to channels-last memory in the native score map's read.

    For a contiguous NCHW input with a multiple of 16 channels that needs no gradient, to a dense or depthwise
    conv: oneDNN's other grouped convs gain little or lose channels-last (64 channels in 4 groups at 32×32,
    batch 64: 6.31 against 6.80 ms NCHW in the committed run of ``benchmarks/results/cac.md``, "An NCHW
    input", 6.17–6.42 against 6.07–6.16 in the two before), where a depthwise one took 1.30 against 3.16 ms
    and a dense one 11.71 against 13.64. The channel sum, which reads all of ``x``, writes
    the copy as it goes (``csrc/cac_gradient.cpp``), at a fraction of what the layout change costs on its own
    (``Tensor.contiguous(memory_format=torch.channels_last)``, or the conv's internal one), and G stays bit for
    bit :func:`gradient_map`'s on the NCHW ``x`` (each pixel's channels are added in the same order).
    """
    return not (
        x.shape[1] % 16
        or spec.groups not in (1, spec.in_channels)  # oneDNN's grouped convs can be slower channels-last
        or (x.requires_grad and torch.is_grad_enabled())  # the copy would carry no gradient back to x
        or not x.is_contiguous()
        or x.is_contiguous(memory_format=torch.channels_last)  # already laid out so (1×1 maps, one channel)
    )


def _native_geometry(spec: ConvSpec, out_size: tuple[int, int]) -> list[list[int]]:
    """The native score-map kernels' geometry arguments: kernel size, stride, dilation, (top, left) padding, H' x W'."""
    left, _, top, _ = spec.explicit_padding
    return [list(spec.kernel_size), list(spec.stride), list(spec.dilation), [top, left], list(out_size)]


def score_logits(spec: ConvSpec, x: Tensor, gamma: Tensor, beta: Tensor, out_size: tuple[int, int]) -> Tensor:
    """γ·G + β for every output position, (B, H', W'), in float32: a window is sharp iff its exact value is > 0
    (i.e. M > 0.5), which :func:`sharp_test` decides; ``score_logits(...) > 0`` can differ from it where the float32
    rounding of γ·G + β reaches 0."""
    return torch.addcmul(beta, gamma, gradient_map(spec, x, out_size))


def sharp_test(gradient: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """Eq. (12)'s test on the score map: γ·G + β > 0 (i.e. M > 0.5), (B, H', W') bool; no gradient.

    Decided in float64: γ·G of float32 operands is exact there and the one rounding of the sum keeps its sign
    (an FMA gives the same), so this is the exact sign of γ·G + β. The native score map
    (``csrc/cac_gradient.cpp``) decides the same way as it writes G, so the two agree on every machine, also
    where a float32 ``addcmul`` without an FMA would round γ·G + β to the other side of 0. Exported graphs
    (torch.export, fx symbolic tracing, TorchScript) and MPS, which has no float64, get that float32 expression;
    ``torch.compile`` keeps the float64 test.
    """
    gamma, beta, gradient = gamma.detach(), beta.detach(), gradient.detach()
    exporting = tracing_a_graph() or torch.jit.is_tracing() or torch.jit.is_scripting()  # not torch.compile
    if exporting or gradient.device.type == "mps":
        return torch.addcmul(beta, gamma, gradient) > 0
    wide = torch.float64
    return torch.addcmul(beta.to(wide), gamma.to(wide), gradient.to(wide)) > 0


class WindowScores(NamedTuple):
    """What :func:`score_windows` returns."""

    gradient: Tensor  # G (B, H', W')
    mask: Tensor  # (B, H', W') bool: the sharp windows
    counts: Tensor | None  # (B,) int64: sharp windows per image (None when not counted)
    x: Tensor  # the input, moved to channels-last memory where that was asked for and done
    total: int | None  # the sharp windows of the batch, where the native score map counted them as it went

    def sharp_total(self) -> int:
        """The batch's sharp windows, as a Python int (a device sync where ``total`` is None)."""
        if self.total is not None:
            return self.total
        return int(self.counts.sum()) if self.counts is not None else int(self.mask.sum())


def score_windows(
    spec: ConvSpec,
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    out_size: tuple[int, int],
    *,
    count: bool = True,
    to_channels_last: bool = False,
) -> WindowScores:
    """G, the sharp-window mask and its count per image; optionally ``x`` moved to channels-last memory.

    Args:
        spec, x, out_size: as :func:`gradient_map`; gamma, beta: the layer's scalars.
        count: whether to count the sharp windows (exporters skip it: nothing uses it there).
        to_channels_last: move an NCHW ``x`` to channels-last memory in the native score map's read, where
            :func:`_layout_moves` says that pays (else ``x`` comes back as it is).

    Where :func:`gradient_map` runs its native kernel and γ, β are float32 CPU tensors, one native call
    computes all of it as it reads ``x`` once (the test as :func:`sharp_test` decides it, on each row of G as
    it is written, and the layout change in the same read); else G from :func:`gradient_map`, then
    :func:`sharp_test`, and ``x`` is not moved. Either way G is :func:`gradient_map`'s and the mask
    :func:`sharp_test`'s of it.
    """
    plain_x, gamma, beta = x.detach(), gamma.detach(), beta.detach()
    if _native_gradient_applies(spec, plain_x, gamma, beta):
        move = to_channels_last and _layout_moves(spec, x)
        gradient, mask, counts, moved, total = native_ops().cac_sharp_windows(
            plain_x, *_native_geometry(spec, out_size), gamma, beta, move
        )
        return WindowScores(gradient, mask, counts if count else None, moved if move else x, total)
    gradient = gradient_map(spec, x, out_size)
    mask = sharp_test(gradient, gamma, beta)
    return WindowScores(gradient, mask, mask.flatten(1).sum(1) if count else None, x, None)


def sharp_windows(
    spec: ConvSpec,
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    out_size: tuple[int, int],
    gradient: Tensor | None = None,
    *,
    count: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The sharp-window mask of eq. (12), γ·G + β > 0, and its count per image; no gradient.

    Args:
        spec, x, out_size: as :func:`gradient_map`.
        gamma, beta: the layer's scalars.
        gradient: G if the caller already computed it with :func:`gradient_map` on this ``x``.
        count: whether to count the sharp windows (exporters skip it: nothing uses it there).

    Returns:
        mask (B, H', W') bool and counts (B,) int64 (None without ``count``).

    Every CAC form takes its mask from :func:`sharp_test` (or the native score map, which decides the
    same way), so on the same input all of them agree exactly.
    """
    if gradient is None:
        scores = score_windows(spec, x, gamma, beta, out_size, count=count)
        return scores.mask, scores.counts
    mask = sharp_test(gradient, gamma, beta)
    return mask, (mask.flatten(1).sum(1) if count else None)


def centre_pixels(spec: ConvSpec, padded: Tensor) -> Tensor:
    """The window centre pixel of every output position: padded (B, C, Hp, Wp) -> (B, C, H', W') view."""
    (ch, cw), (sh, sw) = centre_offset(spec), spec.stride
    extent_h, extent_w = (d * (k - 1) + 1 for k, d in zip(spec.kernel_size, spec.dilation))
    return window_taps(window_taps(padded, -2, ch, extent_h, sh), -1, cw, extent_w, sw)


def first_centre_inside(spec: ConvSpec, x: Tensor, out_size: tuple[int, int]) -> tuple[int, int] | None:
    """The pixel (row, col) of x under the first window's centre, if every window's centre lies inside x.

    When the part of the window after its centre reaches at least as far as the padding after x, the last
    centre lies inside x for every input size. Otherwise it depends on the size, which is only checked for
    concrete sizes: under torch.export's dynamic shapes the answer is None (the padded path, same values),
    as a guard on the symbolic size would pin the export to some image sizes.
    """
    (ch, cw), (sh, sw) = centre_offset(spec), spec.stride
    left, right, top, bottom = spec.explicit_padding
    first_h, first_w = ch - top, cw - left
    if first_h < 0 or first_w < 0:
        return None
    extent_h, extent_w = (d * (k - 1) + 1 for k, d in zip(spec.kernel_size, spec.dilation))
    if extent_h - 1 - ch >= bottom and extent_w - 1 - cw >= right:
        return first_h, first_w
    sizes = (x.shape[2], x.shape[3], *out_size)
    if not all(isinstance(size, int) for size in sizes):
        return None
    inside = first_h + (out_size[0] - 1) * sh < x.shape[2] and first_w + (out_size[1] - 1) * sw < x.shape[3]
    return (first_h, first_w) if inside else None


def centre_conv(
    spec: ConvSpec,
    x: Tensor,
    kernel: Tensor,
    bias: Tensor | None,
    out_size: tuple[int, int],
    padded: Tensor | None = None,
) -> Tensor:
    """A 1×1 conv at every window centre (eq. 6 with ``kernel`` = Σw): x (B, C_in, H, W) -> (B, C_out, H', W').

    Args:
        spec: the k×k conv's geometry (stride, padding, dilation, groups, padding mode).
        x: the input.
        kernel: (C_out, C_in/g, 1, 1); bias: (C_out,) or None.
        out_size: (H', W').
        padded: x padded as the conv pads it, (B, C_in, Hp, Wp), possibly a channels-last view;
            None: padded here if it is needed.

    When the first window's centre is x's first pixel (any 'same'-like padding of an odd kernel), or every
    centre lies inside a channels-last ``x``, the 1×1 runs on ``x`` itself with the conv's stride: no copy.
    Otherwise the centre pixels of the padded input are taken (copied densely first when channels-last:
    oneDNN's 1×1 conv runs ~5x faster on them than on the strided view).
    """
    first = first_centre_inside(spec, x, out_size)
    symbolic = isinstance(x, fx.Proxy)  # fx symbolic tracing: no layout query (control flow on a proxy)
    if first == (0, 0) or (first is not None and not symbolic and x.is_contiguous(memory_format=torch.channels_last)):
        source = x if first == (0, 0) else x[..., first[0] :, first[1] :]
        out = F.conv2d(source, kernel, bias, spec.stride, 0, 1, spec.groups)
        return out[..., : out_size[0], : out_size[1]]
    if padded is None:
        padded = pad_input(spec, x)
    centres = centre_pixels(spec, padded)
    if not symbolic and padded.stride(1) == 1:
        centres = centres.contiguous(memory_format=torch.channels_last)
    return F.conv2d(centres, kernel, bias, 1, 0, 1, spec.groups)


class _PickStraightThrough(torch.autograd.Function):
    """``where(mask, sharp, smooth)`` whose gradient also reaches the soft score M (straight-through, eq. 12).

    Forward: the hard pick, as sharp·m + smooth·(1 - m) with m in {0, 1} (x·1 = x and y·0 = 0, so the
    values equal ``torch.where``'s for finite branches; two vectorized passes beat its scalar CPU loop).
    Backward: d/d(sharp) = g·m, d/d(smooth) = g·(1 - m) and d/dM = Σ_c g·(sharp - smooth), the hard mask's
    gradient taken as the soft score's: what adding ``(M - M.detach())·(sharp - smooth).detach()`` to the
    output did, without its three full-size passes. Like that sum, a branch that is inf or NaN where it is
    not picked makes the output NaN. Supports ``torch.func`` transforms and forward-mode AD (the tangent
    gets the same straight-through term).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(mask: Tensor, sharp: Tensor, smooth: Tensor, soft: Tensor) -> Tensor:
        keep = mask.to(sharp.dtype)
        return torch.addcmul(sharp * keep, smooth, 1 - keep)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor, Tensor, Tensor], output: Tensor) -> None:
        mask, sharp, smooth, soft = inputs
        keep, difference = mask.to(sharp.dtype), sharp - smooth  # one saved full-size tensor, not both branches
        ctx.save_for_backward(keep, difference)
        ctx.save_for_forward(keep, difference)
        ctx.soft_dtype = soft.dtype

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None, Tensor | None]:
        keep, difference = ctx.saved_tensors
        grad_sharp = grad * keep if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] else None
        grad_smooth = grad - grad_sharp if ctx.needs_input_grad[2] else None
        grad_soft = None
        if ctx.needs_input_grad[3]:
            grad_soft = (grad * difference).sum(dim=1, keepdim=True).to(ctx.soft_dtype)
        return None, grad_sharp if ctx.needs_input_grad[1] else None, grad_smooth, grad_soft

    @staticmethod
    def jvp(ctx, mask_t: None, sharp_t: Tensor | None, smooth_t: Tensor | None, soft_t: Tensor | None) -> Tensor:
        keep, difference = ctx.saved_tensors
        tangent = torch.zeros_like(difference)
        if sharp_t is not None:
            tangent = tangent + sharp_t * keep
        if smooth_t is not None:
            tangent = tangent + smooth_t * (1 - keep)
        if soft_t is not None:
            tangent = tangent + (soft_t * difference).to(difference.dtype)
        return tangent


def summed_kernel(weight: Tensor) -> Tensor:
    """The 1×1 kernel Σw of eq. (6): (C_out, C_in/g, kh, kw) -> (C_out, C_in/g, 1, 1)."""
    return weight.sum(dim=(2, 3), keepdim=True)


class CACStatsMixin:
    """What CAC layers (training and inference forms) record about their last call.

    ``last_sharp_count`` (B,) int64: sharp windows per image; ``last_output_size`` (H', W').
    """

    spec: ConvSpec
    last_sharp_count: Tensor | None
    last_output_size: tuple[int, int] | None

    def macs_per_position(self) -> tuple[int, int]:
        """MACs of one output position through the k×k kernel and through the 1×1 kernel."""
        k_area = self.spec.kernel_size[0] * self.spec.kernel_size[1]
        pointwise = self.spec.out_channels * (self.spec.in_channels // self.spec.groups)
        return pointwise * k_area, pointwise

    def last_rho(self) -> Tensor:
        """Fraction of sharp windows per image in the last call, (B,) float."""
        if self.last_sharp_count is None or self.last_output_size is None:
            raise RuntimeError(f"{type(self).__name__} has not been run yet: call the model on an input first")
        return self.last_sharp_count.double() / (self.last_output_size[0] * self.last_output_size[1])

    def effective_macs_per_image(self) -> Tensor:
        """Effective MACs of each image of the last call (eq. 17 in absolute terms), (B,) float64."""
        rho = self.last_rho()
        positions = self.last_output_size[0] * self.last_output_size[1]  # type: ignore[index]
        sharp, smooth = self.macs_per_position()
        return positions * (rho * sharp + (1 - rho) * smooth + SCORE_MACS_PER_POSITION)

    def convzoo_macs(self, input: Tensor, output: Tensor) -> int:
        """Effective MACs of the call that produced ``output`` (whole batch), for ``convzoo.profiling``."""
        return round(float(self.effective_macs_per_image().sum()))


def pick_windows(
    mask: Tensor, sharp: Tensor, smooth: Tensor, gamma: Tensor, beta: Tensor, gradient: Tensor
) -> tuple[Tensor, Tensor | None]:
    """CAC's output: each window's sharp or smooth value, and ρ per image with the straight-through gradient.

    Args:
        mask: (B, H', W') bool, the sharp windows; sharp, smooth: (B, C_out, H', W') the two convs' outputs;
        gamma, beta: the layer's scalars; gradient: G (B, H', W') the mask came from.

    Returns:
        (output (B, C_out, H', W'), ρ (B,) whose gradient reaches γ and β, or None without the estimator).

    The estimator runs wherever γ or β may be differentiated: reverse mode, or any torch.func transform or
    forward-mode AD (their dual / wrapped γ, β do not report requires_grad). It is decided here, when the
    layer runs, also in an fx graph (``torch.fx.wrap``: fx records this call and does not trace into it, so a
    ``create_feature_extractor`` model trains γ and β like the layer).
    """
    if not (transform_active() or (torch.is_grad_enabled() and (gamma.requires_grad or beta.requires_grad))):
        # no estimator: torch.where keeps a finite picked value wherever the other branch overflows
        return torch.where(mask.unsqueeze(1), sharp, smooth), None
    soft = torch.sigmoid(torch.addcmul(beta, gamma, gradient))
    # the hard pick, with the straight-through gradient Σ_c g·(sharp - smooth) to M (in the convs' dtype:
    # under autocast the float32 score must not promote the output)
    out = _PickStraightThrough.apply(mask.unsqueeze(1), sharp, smooth, soft.unsqueeze(1))
    straight = soft - soft.detach()  # 0.0 in value; d/dM = 1
    return out, mask.flatten(1).to(soft.dtype).mean(1) + straight.flatten(1).mean(1)


fx.wrap("pick_windows")


class _Transient:
    """Holds a per-call tensor that may carry an autograd graph; copies and pickles as empty.

    (``copy.deepcopy`` of a module refuses non-leaf tensors, and ``deploy()`` deep-copies.)
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def __deepcopy__(self, memo: dict) -> _Transient:
        return _Transient()

    def __reduce__(self) -> tuple[type, tuple]:
        return _Transient, ()


def _check_real(value: object, name: str) -> float:
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


@register_conv(
    "cac",
    description="CAC: content-aware k x k conv, 1x1 summed kernel on smooth windows; deploys to a sparse path",
    skip_reason=needs_spatial_kernel,
)
class CAConv2d(NoTorchScript, CACStatsMixin, ConvAttributes, nn.Module):
    """Content-aware convolution with ``nn.Conv2d``'s interface (any groups, padding mode, stride, dilation).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as ``nn.Conv2d``; the kernel must be larger than 1×1.
        gamma_init: keyword-only initial γ (default 0).
        beta_init: keyword-only initial β (default 1). With γ >= 0 and β > 0 every window
            starts sharp (ρ = 1) and the layer computes exactly ``nn.Conv2d``.
        sparse_threshold: keyword-only; the inference form (``fuse()``) runs the sparse path when the
            fraction of sharp windows is at most this, else the dense one. None or "auto": measured
            per input signature on first use (see :mod:`convzoo.ops.cac_sparse`). Unused when the layer
            is always sharp at ``fuse()`` time (it then deploys to its plain conv).

    Shapes:
        input (B, C_in, H, W) -> output (B, C_out, H', W') exactly as ``nn.Conv2d``.

    After each forward pass the layer holds ``last_mask`` (B, H', W') bool, ``last_sharp_count``
    (B,) and, in training, ``last_rho_ste`` (B,): ρ per image whose gradient is the
    straight-through one (``CACLoss`` reads it).
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
        gamma_init: float = 0.0,
        beta_init: float = 1.0,
        sparse_threshold: float | str | None = None,
    ) -> None:
        super().__init__()
        spec = ConvSpec.create(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode
        )
        if spec.is_pointwise:
            raise ValueError(
                f"kernel_size must be larger than 1x1 for CAC, got {kernel_size!r} "
                "(a 1x1 conv has no window to tell smooth from sharp)"
            )
        from convzoo.ops.cac_sparse import check_threshold

        self.spec = spec
        self.gamma_init = _check_real(gamma_init, "gamma_init")
        self.beta_init = _check_real(beta_init, "beta_init")
        self.sparse_threshold = None if sparse_threshold is None else check_threshold(sparse_threshold)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *spec.kernel_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.gamma = nn.Parameter(torch.empty((), **factory))
        self.beta = nn.Parameter(torch.empty((), **factory))
        self.last_mask: Tensor | None = None
        self.last_sharp_count: Tensor | None = None
        self.last_output_size: tuple[int, int] | None = None
        self._ste = _Transient()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W and bias as ``nn.Conv2d`` initialises them; γ, β from ``gamma_init`` / ``beta_init``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():
            self.gamma.fill_(self.gamma_init)
            self.beta.fill_(self.beta_init)

    # score map -------------------------------------------------------------------------
    def score_logits(self, x: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        """γ·G + β per output position, (B, H', W') (:func:`score_logits`; :meth:`sharp_mask` is eq. 12's test)."""
        if out_size is None:
            out_size = self.spec.output_size(x.shape[-2], x.shape[-1])
        return score_logits(self.spec, x, self.gamma, self.beta, out_size)

    def score_map(self, x: Tensor) -> Tensor:
        """The score map M = sigmoid(γG + β) of eq. (11), (B, H', W')."""
        return torch.sigmoid(self.score_logits(x))

    def sharp_mask(self, x: Tensor) -> Tensor:
        """The sharp-window mask of eq. (12), (B, H', W') bool (:func:`sharp_windows`)."""
        out_size = self.spec.output_size(x.shape[-2], x.shape[-1])
        return sharp_windows(self.spec, x, self.gamma, self.beta, out_size)[0]

    # forward -----------------------------------------------------------------------------
    def _record(self, mask: Tensor, counts: Tensor, out_size: tuple[int, int]) -> None:
        # functorch wrappers must not outlive their transform (deepcopy refuses them), nor torch.export's fake
        # tensors or fx's proxies their trace (torch.compile replays the assignment with real tensors: kept)
        if transform_active() or tracing_a_graph():
            mask = counts = None
            out_size = None if tracing_a_graph() else out_size  # symbolic under dynamic shapes
        self.last_mask = mask
        self.last_sharp_count = counts
        self.last_output_size = out_size

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_in, H, W) -> (B, C_out, H', W'): k×k conv on sharp windows, Σw on smooth centres."""
        if check_input(x, self.in_channels, "CAConv2d"):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        out_size = self.spec.output_size(x.shape[-2], x.shape[-1])
        # G is detached: only γ and β learn from the score
        gradient, mask, counts = score_windows(self.spec, x, self.gamma, self.beta, out_size)[:3]
        self._record(mask, counts, out_size)
        sharp = self.spec.conv2d(x, self.weight, self.bias)
        smooth = centre_conv(self.spec, x, summed_kernel(self.weight), self.bias, out_size)
        picked = pick_windows(mask, sharp, smooth, self.gamma, self.beta, gradient)
        out, rho_ste = picked[0], picked[1]  # indexed, not unpacked: a proxy under fx symbolic tracing
        self._ste.value = None if tracing_a_graph() else rho_ste
        return out

    @property
    def last_rho_ste(self) -> Tensor | None:
        """ρ per image of the last training call, (B,): the hard value with the straight-through gradient."""
        return self._ste.value

    # conversion ----------------------------------------------------------------------
    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        gamma_init: float = 0.0,
        beta_init: float = 1.0,
        sparse_threshold: float | str | None = None,
    ) -> CAConv2d:
        """A CAConv2d holding ``conv``'s weights; with the default init it computes exactly ``conv``."""
        spec = ConvSpec.from_conv(conv)
        module = cls(
            **spec.conv_kwargs(),
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            gamma_init=gamma_init,
            beta_init=beta_init,
            sparse_threshold=sparse_threshold,
        )
        with torch.no_grad():
            module.weight.copy_(conv.weight)
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
        inherit_requires_grad(conv, weights=(module.weight,), biases=(module.bias,))
        return module

    def always_sharp(self) -> bool:
        """Whether every window is sharp for every finite input: γ >= 0 and β > 0.

        G >= 0 everywhere, so γG + β >= β > 0. This is the state a converted layer starts in
        (γ = 0, β = 1), and one that training under a loose budget can end in.
        """
        if self.gamma.is_meta or self.beta.is_meta:  # no values to decide on: the general (sparse) form
            return False
        return bool(self.gamma.detach() >= 0) and bool(self.beta.detach() > 0)

    def fuse(self, *, fold_always_sharp: bool = True) -> nn.Module:
        """The inference form with these weights (in this layer's training mode).

        Args:
            fold_always_sharp: when the layer is ``always_sharp()``, return a
                :class:`~convzoo.ops.cac_sharp.CACSharpConv2d`: the ``nn.Conv2d`` it then equals for every
                finite input, with no score map, which still records ρ = 1 for the statistics. False:
                always the sparse form.

        Returns:
            ``CACSharpConv2d`` (always-sharp layers) or :class:`~convzoo.ops.cac_sparse.CACSparseConv2d`.
        """
        if not isinstance(fold_always_sharp, bool):
            raise TypeError(f"fold_always_sharp must be a bool, got {fold_always_sharp!r}")
        from convzoo.ops.cac_sharp import CACSharpConv2d
        from convzoo.ops.cac_sparse import CACSparseConv2d

        if fold_always_sharp and self.always_sharp():
            fused: nn.Module = CACSharpConv2d(self.spec, self.weight, self.bias, self.gamma, self.beta)
        else:
            fused = CACSparseConv2d.from_cac(self)
        return fused.train(self.training)

    def extra_repr(self) -> str:
        s = self.spec.describe()
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", bias={self.bias is not None}"


def cac_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every CAC layer (training or inference form) in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, CACStatsMixin)]


def has_cac_layers(model: nn.Module) -> bool:
    """Whether ``model`` contains a CAC layer (training or inference form)."""
    return any(isinstance(m, CACStatsMixin) for m in check_module(model).modules())


_COST_NAMES = ("CACLoss", "CACStatistics", "cac_statistics", "calibrate_sharp_ratio_")


def __getattr__(name: str) -> object:
    """``convzoo.ops.cac.CACLoss`` etc. (the agreed interface), defined in ``cac_cost`` to keep this module small."""
    if name in _COST_NAMES:
        from convzoo.ops import cac_cost

        return getattr(cac_cost, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
