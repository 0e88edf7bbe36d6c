"""The inference form of CAC whose wall-clock time falls with the fraction of sharp windows.

The dense masked form computes the k×k conv *and* the 1×1 conv at every position, so it saves
nothing (that is what the authors' code does). :class:`CACSparseConv2d` computes the k×k conv only
where it is needed. Both sparse algorithms start the same way:

1. the score map (channel mean, Sobel, γG + β > 0) is computed exactly as the training form does;
2. the 1×1 conv Σw runs on every window centre (1/k² of the k×k cost), straight on a channels-last
   input when the centres lie inside it ('same'-like padding), into a channels-last output buffer;
3. the input is made channels-last, so that a pixel is a row of C contiguous values; a padded copy
   (B, Hp, Wp, C) is made only for the block algorithm and for padding modes other than zeros (the
   pixel algorithm otherwise gathers straight from the input and zeroes the taps that fall outside).

``algorithm="pixel"`` (default): the k×k windows of the sharp positions only are gathered with one
row ``index_select`` (im2col of the sharp windows, (n, k·k·C)), multiplied by the kernel in one
GEMM (a channels-last 1×1 conv, which oneDNN runs ~2x faster than ``torch.mm`` here) and written
over the 1×1 results with ``index_copy_``. Cost: ρ·(gather + GEMM) + fixed costs, so the time falls
with ρ itself. The columns are gathered at most ``_COLUMN_CHUNK_BYTES`` at a time.

``algorithm="block"``: the output is cut into ``tile × tile`` blocks; the blocks holding a sharp
window are gathered *with their halo* and convolved densely, and their sharp windows scattered back.
Its time follows the fraction of *active blocks*, which is far above ρ when sharp windows are spread
out (25 % sharp windows activate ~69 % of 4×4 blocks on image-like inputs), so it only wins when
the sharp windows cluster.

Above a fraction of active units (``threshold``: sharp windows for "pixel", blocks for "block") the
dense conv is faster and the module runs it instead, then writes the 1×1 over the smooth windows
only (gathered centres) or, when most windows are smooth (small layers, where the sparse path cannot
win), runs the 1×1 everywhere too and picks with the mask; nothing more when every window is sharp.
Where the two cross depends on the layer's size and the machine (64 channels at 32×32: ρ ≈ 0.5;
16 channels: ≈ 0.2), so by default (``threshold="auto"``) the pixel algorithm measures it once per input signature, like
``torch.backends.cudnn.benchmark``: on the first input of a new shape / layout / dtype / device it
times both paths on that input with random masks at ρ = 0.2 and 0.6 and takes the crossing of
the two lines as the threshold for that signature.
Every path equals the dense masked form of the training layer.

On CPU, for float32 inputs of layers with ``groups=1``, zero padding and a multiple of 16 output
channels, the pixel algorithm runs convzoo's native kernel instead (``csrc/cac_sparse.cpp``, built on
first use by :mod:`convzoo.native`; ``last_native`` tells): it takes each output row's sharp and
smooth windows six at a time and reads their taps straight from the channels-last input into one
register-blocked microkernel (k×k products with W at the sharp windows, the centre times Σw at the
others; groups filled across rows), so nothing is gathered or scattered and the 1×1 runs only where the
mask is clear. (Running oneDNN's 1×1 over every centre first and the kernel on the
sharp windows only was measured slower: 7.1 against 6.6 ms at ρ = 0.25.) Where it does not apply or
cannot be built, the torch pixel path above runs.

Layouts. A contiguous NCHW float32 CPU input with a multiple of 16 channels, to a dense or depthwise layer,
outside autograd, is moved to channels-last memory by the score map's native kernel as it sums the channels
(:func:`~convzoo.ops.cac.score_windows`: one pass over the input, and bit for bit the same G),
which costs a quarter of ``x.contiguous(memory_format=torch.channels_last)`` and less than oneDNN's own layout
change inside an NCHW conv; every path then runs channels-last. Other NCHW inputs go to the native kernel as
they are (it reads them through a small ring of channels-last copies of their rows) and to the all-sharp conv
as they are; the torch paths move them with ``contiguous``. So the output has channels-last strides, except
that the native sparse path and the all-sharp conv keep the layout of an NCHW input that was not moved. An
unbatched (C, H, W) input gives a contiguous output, as ``nn.Conv2d`` does.
"""

from __future__ import annotations

import functools
import math
from functools import partial
from numbers import Real
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from convzoo.native import native_ops, native_ready
from convzoo.ops.autotune import Signature, best_time, input_signature
from convzoo.ops.cac import (
    CAConv2d,
    CACStatsMixin,
    centre_conv,
    centre_offset,
    first_centre_inside,
    pad_input,
    score_windows,
    summed_kernel,
)
from convzoo.ops.conv_spec import (
    ConvAttributes,
    ConvSpec,
    NoTorchScript,
    check_input,
    is_int,
    is_tracing,
    transform_active,
)
from convzoo.ops.weight_cache import WeightCache

SPARSE_ALGORITHMS = ("pixel", "block")

DEFAULT_SPARSE_THRESHOLD = 0.45
"""Fraction of sharp windows above which the dense conv beats the pixel algorithm, where nothing is timed.

Measured by ``benchmarks/bench_cac.py`` (3×3, 64->64, 32×32, batch 64, CPU, ``results/cac.md``); used
under a torch dispatch mode (profilers, fake tensors), where ``threshold="auto"`` cannot time anything.
"""

_TUNING_RHOS = (0.2, 0.6)
"""The two fractions of sharp windows at which ``threshold="auto"`` times both paths."""

DEFAULT_BLOCK_THRESHOLD = 0.7
"""Fraction of active blocks above which the dense conv beats the block algorithm (same benchmark)."""

DENSE_WHERE_BELOW = 0.5
"""Below this fraction of sharp windows the dense path picks with the mask instead of gathering smooth centres.

Design measurements (in-process A/B runs): over cifar_resnet20's layer shapes, both layouts, ρ = 0.1 to
0.9, picking cost 0.75-0.9x the gathering at ρ <= 0.25 on the 16-64-channel layers and gathering won at
ρ = 0.9; on the deployed CAC cifar_resnet20 (batch 64, ρ ramped 0.2 -> 0.8 by depth) the step went from
1.69-1.74x to 1.61x the standard model, and picking in the caller's (NCHW) layout made it slower (1.91x).
Picking by writing the sharp windows' rows over the 1×1 output (``index_copy_``) instead of ``torch.where``
(a scalar loop on CPU, 0.55 ms per 16-channel 32×32 batch of 64) took that model from 1.63x to 1.56x.
"""

_COLUMN_CHUNK_BYTES = 24 << 20
"""The pixel path gathers the columns of at most this many bytes at a time (bounded memory).

Below glibc's 32 MiB ceiling on ``M_MMAP_THRESHOLD``: with ``convzoo.tune_cpu_allocator()`` a chunk is then
reused from the heap, where a larger one is ``mmap``-ed and page-faulted afresh on every call (a 64 MiB
chunk, i.e. one 38 MB buffer for the benchmark layer at ρ = 0.25, swung between 8.5 and 12 ms per call;
24 MiB chunks held 8.7-9.5 ms).
"""

DEFAULT_TILE = 4
"""Output block size of the sparse path (blocks of 4×4 outputs, 6×6 inputs for a 3×3 kernel)."""


def check_threshold(value: object) -> float | str:
    """Validate a sparse/dense switch-over fraction: a real number in [0, 1], or "auto" (measured)."""
    if value == "auto":
        return "auto"
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"sparse_threshold must be a real number in [0, 1] or 'auto', got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"sparse_threshold must be in [0, 1], got {value!r}")
    return float(value)


def check_algorithm(value: object) -> str:
    """Validate the sparse algorithm's name."""
    if value not in SPARSE_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {SPARSE_ALGORITHMS}, got {value!r}")
    return str(value)


def check_tile(value: object) -> int:
    """Validate the block size of the sparse path: a positive int."""
    if not is_int(value) or value < 1:
        raise ValueError(f"tile must be a positive int, got {value!r}")
    return int(value)


def crossover(pixel: tuple[float, float], dense: tuple[float, float], rhos: tuple[float, float]) -> float:
    """Where the pixel path's cost line meets the dense path's, as a fraction of sharp windows in [0, 1].

    Args:
        pixel, dense: each path's time at the two fractions ``rhos`` (low, high).

    The pixel path's cost grows with ρ and the dense path's falls, so the pixel path is the faster
    one below the crossing. If the pixel path does not lose ground as ρ grows, the faster path at
    the higher ρ decides for all ρ (1: always pixel, 0: always dense).
    """
    (low, high), (pixel_low, pixel_high), (dense_low, dense_high) = rhos, pixel, dense
    lead = dense_low - pixel_low  # > 0: the pixel path is faster at `low`
    loss = (pixel_high - pixel_low) - (dense_high - dense_low)  # how much of that lead goes by `high`
    if loss <= 0:
        return 1.0 if pixel_high < dense_high else 0.0
    return min(1.0, max(0.0, low + lead / loss * (high - low)))


def rows_times_kernel(rows: Tensor, kernel: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """rows (n, K) times a 1x1 conv kernel (C_out, K/groups, 1, 1) -> (n, C_out), plus bias.

    Run as a channels-last 1x1 conv over an (n x 1) image: oneDNN does this GEMM ~2x faster than
    ``torch.mm`` for the narrow (C_out = 64) outputs of CAC layers.
    """
    n = rows.shape[0]
    out = F.conv2d(rows.reshape(1, n, 1, -1).permute(0, 3, 1, 2), kernel, bias, 1, 0, 1, groups)  # (1, C_out, n, 1)
    return out.permute(0, 2, 3, 1).reshape(n, -1)


@functools.lru_cache(maxsize=256)
def axis_taps(
    size: int, out_size: int, kernel: int, stride: int, dilation: int, pad: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Where the taps of each window fall along one axis of the image the pixel path gathers from.

    Args:
        size: the image's length along the axis (H or W).
        out_size: the number of windows along it (H' or W').
        kernel, stride, dilation: the conv's along the axis.
        pad: the padding before the image (0 when the image is already padded).
        device: where the tables live.

    Returns:
        at: (out_size, kernel) int64, the coordinate of each tap, clamped into the image;
        outside: (out_size, kernel) bool, the taps that fall in the padding instead (they must read zero);
        reaches_out: (out_size,) bool, the windows with at least one such tap.

    A window's pixel is ``row * W + col`` from the two axes' tables. Cached: a few kilobytes per input size
    (the windows' index arithmetic, rebuilt on every call, was a tenth of the pixel path's time).
    The returned tensors are shared between calls: read them, never write into them.
    """
    coordinate = (torch.arange(out_size, device=device) * stride - pad)[:, None] + torch.arange(
        kernel, device=device
    ) * dilation
    outside = (coordinate < 0) | (coordinate >= size)
    return coordinate.clamp(0, size - 1), outside, outside.any(dim=1)


@torch.no_grad()
def batchnorm_folded(
    spec: ConvSpec, weight: Tensor, bias: Tensor | None, bn: nn.Module
) -> tuple[ConvSpec, Tensor, Tensor]:
    """A conv's (spec, weight, bias) with eval-mode ``bn`` after it folded in: W·s, b·s + t (exact).

    Args:
        spec: the conv's geometry; the returned one has a bias.
        weight: (C_out, C_in/g, kh, kw); bias: (C_out,) or None.
        bn: an ``nn.BatchNorm2d`` (or ``SyncBatchNorm``) over C_out channels, with running statistics.

    torch's ``fuse_conv_bn_weights`` does the arithmetic; the results keep the weight's dtype (a float32
    BN after a float16 layer).
    """
    if not isinstance(bn, nn.BatchNorm2d | nn.SyncBatchNorm) or bn.running_mean is None or bn.running_var is None:
        raise TypeError(f"bn must be an nn.BatchNorm2d with running statistics, got {type(bn).__name__}")
    if bn.num_features != spec.out_channels:
        raise ValueError(f"bn has {bn.num_features} features, the layer {spec.out_channels} output channels")
    folded_weight, folded_bias = fuse_conv_bn_weights(
        weight, bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    folded_spec = ConvSpec.create(**{**spec.conv_kwargs(), "bias": True})
    return folded_spec, folded_weight.detach(), folded_bias.detach().to(weight.dtype)


_TAP_TABLE_MAX_ENTRIES = 1 << 18
"""Per-window pixel tables (``window_pixels``) are kept for maps of at most this many windows × taps (2.3 MB).

Larger maps (a 7×7 stem on a large image, say) compute each chunk's pixels from the per-axis tables instead,
which costs about 0.3 ms more per 16k windows but keeps the cache a few kilobytes.
"""


class WindowGeometry(NamedTuple):
    """Where a conv's windows lie on the image the pixel path gathers from, per axis (rows, cols)."""

    image_size: tuple[int, int]
    """(H, W) of the image (channels-last rows, one per pixel)."""
    out_size: tuple[int, int]
    """(H', W'): one window per output position."""
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    top_left: tuple[int, int]
    """The padding above and left of the image (0 when the image is already padded)."""

    def axis(self, dim: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`axis_taps` along rows (0) or columns (1)."""
        return axis_taps(
            self.image_size[dim],
            self.out_size[dim],
            self.kernel_size[dim],
            self.stride[dim],
            self.dilation[dim],
            self.top_left[dim],
            device,
        )


@functools.lru_cache(maxsize=32)
def window_pixels(geometry: WindowGeometry, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per window of one image: the pixel under each tap and whether any tap falls in the padding.

    Returns:
        pixels: (H'·W', taps) int64, ``row * W + col`` of each tap (clamped into the image), (i, j)-major;
        reaches_out: (H'·W',) bool.

    Built from :func:`axis_taps`; cached like it (at most ``_TAP_TABLE_MAX_ENTRIES`` entries per table,
    which the caller checks). Shared between calls: never write into the returned tensors.
    """
    (out_h, out_w), (kh, kw), width = geometry.out_size, geometry.kernel_size, geometry.image_size[1]
    row_at, _, row_reaches = geometry.axis(0, device)
    col_at, _, col_reaches = geometry.axis(1, device)
    pixels = (row_at[:, None, :, None] * width + col_at[None, :, None, :]).reshape(out_h * out_w, kh * kw)
    return pixels, (row_reaches[:, None] | col_reaches[None, :]).flatten()


def sharp_window_taps(positions: Tensor, geometry: WindowGeometry) -> tuple[Tensor, Tensor, Tensor]:
    """The pixels the taps of some windows read, and which of those taps fall in the padding.

    Args:
        positions: (n,) flat output positions ``(image * H' + row) * W' + col``.
        geometry: where the windows lie.

    Returns:
        pixels: (n, taps) int64 flat pixel ``(image * H + r) * W + c`` under each tap (clamped into the image);
        border: (m,) int64, which of the n windows have a tap in the padding;
        outside: (m, taps) bool, those windows' taps in the padding (their pixels must read as zero).
    """
    (height, width), (out_h, out_w), (kh, kw) = geometry.image_size, geometry.out_size, geometry.kernel_size
    device = positions.device
    row_at, row_outside, row_reaches = geometry.axis(0, device)
    col_at, col_outside, col_reaches = geometry.axis(1, device)
    if out_h * out_w * kh * kw <= _TAP_TABLE_MAX_ENTRIES:
        table, reaches_out = window_pixels(geometry, device)
        image, within = positions // (out_h * out_w), positions % (out_h * out_w)
        pixels = table.index_select(0, within).add_((image * (height * width))[:, None])
        border = reaches_out.index_select(0, within).nonzero().squeeze(1)
        within = within.index_select(0, border)
        row, col = within // out_w, within % out_w  # of the border windows only
    else:
        image_row, col = positions // out_w, positions % out_w  # image_row = image * H' + row
        image, row = image_row // out_h, image_row % out_h
        pixels = (row_at.index_select(0, row) + (image * height)[:, None]) * width
        pixels = (pixels[:, :, None] + col_at.index_select(0, col)[:, None, :]).flatten(1)
        border = (row_reaches.index_select(0, row) | col_reaches.index_select(0, col)).nonzero().squeeze(1)
        row, col = row.index_select(0, border), col.index_select(0, border)
    outside = row_outside.index_select(0, row)[:, :, None] | col_outside.index_select(0, col)[:, None, :]
    return pixels, border, outside.flatten(1)


class CACSparseConv2d(NoTorchScript, CACStatsMixin, ConvAttributes, nn.Module):
    """Inference form of :class:`~convzoo.ops.cac.CAConv2d`: sparse below ``threshold`` sharp windows.

    Built by ``CAConv2d.fuse()`` (so ``convzoo.deploy`` selects it) for layers that are not always sharp
    (those get :class:`~convzoo.ops.cac_sharp.CACSharpConv2d`). It is the deployed form of
    kind ``"cac"`` (``convzoo_kind``), which keeps it a leaf for tracers and for ``convert()``.

    Args:
        spec: the conv geometry.
        weight, bias, gamma, beta: the trained tensors (copied).
        threshold: run the dense path when the fraction of active units in the batch exceeds this:
            sharp windows for ``algorithm="pixel"``, blocks holding a sharp window for "block".
            "auto" (pixel only): measured once per input signature (see the module docstring).
            None: "auto" for "pixel", ``DEFAULT_BLOCK_THRESHOLD`` for "block".
        tile: output block size of the block algorithm.
        algorithm: "pixel" (gather the sharp windows, one GEMM) or "block" (see the module docstring).

    Shapes:
        input (B, C_in, H, W) -> output (B, C_out, H', W'), with channels-last strides, or in the input's
        layout from the native sparse path and the all-sharp conv when an NCHW input is not moved to
        channels-last first (see "Layouts" in the module docstring); (C_in, H, W) -> (C_out, H', W'), contiguous.

    After each call ``last_path`` is ``"sparse"`` or ``"dense"``, ``last_active`` the fraction of
    active units (sharp windows or blocks) and ``last_threshold`` the threshold that was applied.

    Under ``torch.export``, ONNX export, FX / TorchScript tracing and ``torch.compile`` the module
    records the dense masked form instead (both convs everywhere, the mask picks), because the sparse
    path's shapes and branches depend on the data: the exported graph computes the same values, at the
    training form's cost, and records no statistics.
    """

    convzoo_kind = "cac"

    def __init__(
        self,
        spec: ConvSpec,
        weight: Tensor,
        bias: Tensor | None,
        gamma: Tensor,
        beta: Tensor,
        *,
        threshold: float | str | None = None,
        tile: int = DEFAULT_TILE,
        algorithm: str = "pixel",
    ) -> None:
        super().__init__()
        if not isinstance(spec, ConvSpec):
            raise TypeError(f"spec must be a ConvSpec, got {type(spec).__name__}")
        expected = (spec.out_channels, spec.in_channels // spec.groups, *spec.kernel_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight must have shape {expected} for {spec.describe()}, got {tuple(weight.shape)}")
        self.spec = spec
        self.algorithm = check_algorithm(algorithm)
        if threshold is None:
            threshold = "auto" if self.algorithm == "pixel" else DEFAULT_BLOCK_THRESHOLD
        self.threshold = check_threshold(threshold)
        if self.threshold == "auto" and self.algorithm != "pixel":
            raise ValueError(f"threshold='auto' needs algorithm='pixel', got algorithm={self.algorithm!r}")
        self._tuned_thresholds: dict[Signature, float] = {}
        self.last_threshold: float | None = None
        self.tile = check_tile(tile)
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.gamma = nn.Parameter(gamma.detach().clone().reshape(()), requires_grad=False)
        self.beta = nn.Parameter(beta.detach().clone().reshape(()), requires_grad=False)
        self.last_mask: Tensor | None = None
        self.last_sharp_count: Tensor | None = None
        self.last_output_size: tuple[int, int] | None = None
        self.last_path: str | None = None
        self.last_active: float | None = None
        self.last_native: bool | None = None
        self._native_cache: WeightCache[tuple[Tensor, Tensor]] = WeightCache()

    @classmethod
    def from_cac(
        cls,
        layer: CAConv2d,
        *,
        threshold: float | str | None = None,
        tile: int = DEFAULT_TILE,
        algorithm: str = "pixel",
    ) -> CACSparseConv2d:
        """The inference form of a trained ``CAConv2d`` (weights copied); ``threshold`` None: the layer's."""
        if not isinstance(layer, CAConv2d):
            raise TypeError(f"layer must be a CAConv2d, got {type(layer).__name__}")
        return cls(
            layer.spec,
            layer.weight,
            layer.bias,
            layer.gamma,
            layer.beta,
            threshold=layer.sparse_threshold if threshold is None else threshold,
            tile=tile,
            algorithm=algorithm,
        )

    @torch.no_grad()
    def fuse_batchnorm(self, bn: nn.BatchNorm2d) -> CACSparseConv2d:
        """This layer followed by eval-mode ``bn``, as one CACSparseConv2d (exact).

        Both branches are linear in (W, b) and Σ(s·W) = s·Σw, so BN's per-channel scale s and shift
        t fold into the kernel and bias; the score map reads only the input and is unchanged.
        (``convzoo.deploy`` folds BN only into ``nn.Conv2d``; this is the hook to fold it here.)
        """
        spec, weight, bias = batchnorm_folded(self.spec, self.weight, self.bias, bn)
        options = {"threshold": self.threshold, "tile": self.tile, "algorithm": self.algorithm}
        return CACSparseConv2d(spec, weight, bias, self.gamma, self.beta, **options)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_in, H, W) -> (B, C_out, H', W'), equal to the CAConv2d it came from."""
        if check_input(x, self.in_channels, "CACSparseConv2d"):  # contiguous, as nn.Conv2d gives it
            return self.forward(x.unsqueeze(0)).squeeze(0).contiguous()
        out_size = self.spec.output_size(x.shape[-2], x.shape[-1])
        tracing = is_tracing()
        # an NCHW input moves to channels-last memory in the score map's read where that pays: every path below
        # runs channels-last (as they do for a channels-last input, only faster than converting inside the conv)
        plain = tracing or transform_active()
        scores = score_windows(
            self.spec, x, self.gamma, self.beta, out_size, count=not plain, to_channels_last=not plain
        )
        mask, counts, x = scores.mask, scores.counts, scores.x
        if tracing or transform_active():
            # torch.export / ONNX / FX / TorchScript record one static graph: the dense masked form
            # (the sparse path's shapes and branches depend on the data); it computes the same values.
            # torch.func transforms and forward-mode AD differentiate and batch that form too (no .item(),
            # no native kernel), and nothing is recorded: wrapped tensors must not outlive the transform.
            return self._masked(x, mask, out_size)
        self.last_mask, self.last_sharp_count, self.last_output_size = mask, counts, out_size
        sharp_total = scores.sharp_total()  # one device sync (none where the native score map counted)
        threshold = self.last_threshold = self._threshold_for(x, out_size)
        self.last_native = False  # set by the sparse pixel path when the native kernel runs
        if mask.numel() == 0:  # an empty batch or map: nothing to compute, whatever the threshold
            self.last_active, self.last_path = 0.0, "dense"
            return self.spec.conv2d(x, self.weight, self.bias)
        if sharp_total == mask.numel() and (threshold < 1.0 or self.threshold == "auto"):
            # every window sharp: the dense path's plain conv, nothing to gather or overwrite
            self.last_active, self.last_path = 1.0, "dense"
            return self.spec.conv2d(x, self.weight, self.bias)
        if self.algorithm == "pixel":
            self.last_active = sharp_total / mask.numel()
        else:
            grid = self._block_mask(mask)
            active = grid.any(dim=(3, 4))  # (B, blocks_h, blocks_w)
            self.last_active = int(active.sum()) / active.numel()
        if self.last_active > threshold:
            self.last_path = "dense"
            return self._dense(x, mask, out_size, sharp_total / mask.numel())
        self.last_path = "sparse"
        if self.algorithm == "pixel":
            return self._pixel_sparse(x, mask, out_size)
        return self._block_sparse(x, grid, active, out_size)

    def _threshold_for(self, x: Tensor, out_size: tuple[int, int]) -> float:
        """The threshold for this input: the fixed one, or the one measured for its signature ("auto")."""
        if self.threshold != "auto":
            return self.threshold
        if is_in_torch_dispatch_mode():
            return self._tuned_thresholds.get(input_signature(x), DEFAULT_SPARSE_THRESHOLD)
        key = input_signature(x)
        if key not in self._tuned_thresholds:
            last_native = self.last_native  # the timing runs the paths; the statistics stay the caller's
            self._tuned_thresholds[key] = self._measure_crossover(x, out_size)
            self.last_native = last_native
        return self._tuned_thresholds[key]

    def _measure_crossover(self, x: Tensor, out_size: tuple[int, int]) -> float:
        """ρ at which the pixel and the dense path take equal time on ``x``, in [0, 1].

        Both paths are timed at the two ρ of ``_TUNING_RHOS`` with random masks (their cost follows
        the number of sharp windows, not where they are); each cost is taken as linear in ρ between
        and beyond those points.
        """
        generator = torch.Generator(device=x.device).manual_seed(0)
        uniform = torch.rand((x.shape[0], *out_size), generator=generator, device=x.device)
        rhos, pixel, dense = [], [], []
        for target in _TUNING_RHOS:
            mask = uniform < target
            rhos.append(float(mask.float().mean()))  # the fraction this random mask actually has
            pixel.append(best_time(partial(self._pixel_sparse, x, mask, out_size), x.device, repeats=2))
            dense.append(best_time(partial(self._dense, x, mask, out_size, rhos[-1]), x.device, repeats=2))
        if not rhos[0] < rhos[1]:  # an empty batch, or a map too small to hold two different fractions
            return DEFAULT_SPARSE_THRESHOLD
        return crossover((pixel[0], pixel[1]), (dense[0], dense[1]), (rhos[0], rhos[1]))

    def _block_mask(self, mask: Tensor) -> Tensor:
        """mask (B, H', W') -> (B, blocks_h, blocks_w, tile, tile), padded with False to whole blocks."""
        batch, out_h, out_w = mask.shape
        tile = self.tile
        blocks_h, blocks_w = math.ceil(out_h / tile), math.ceil(out_w / tile)
        if (blocks_h * tile, blocks_w * tile) != (out_h, out_w):
            grid = mask.new_zeros(batch, blocks_h * tile, blocks_w * tile)
            grid[:, :out_h, :out_w] = mask
            mask = grid
        return mask.view(batch, blocks_h, tile, blocks_w, tile).permute(0, 1, 3, 2, 4)

    def _smooth(self, x: Tensor, padded: Tensor | None, out_size: tuple[int, int]) -> Tensor:
        """The 1×1 conv Σw at every window centre -> (B, C_out, H', W') (see :func:`~convzoo.ops.cac.centre_conv`)."""
        return centre_conv(self.spec, x, summed_kernel(self.weight), self.bias, out_size, padded)

    def _masked(self, x: Tensor, mask: Tensor, out_size: tuple[int, int]) -> Tensor:
        """Both convs everywhere, then the mask picks: the dense masked form (static shapes)."""
        sharp = self.spec.conv2d(x, self.weight, self.bias)
        return torch.where(mask.unsqueeze(1), sharp, self._smooth(x, None, out_size))

    def _dense(self, x: Tensor, mask: Tensor, out_size: tuple[int, int], sharp_fraction: float) -> Tensor:
        """The k×k conv everywhere; the 1×1 over the smooth windows.

        With few smooth windows (``sharp_fraction >= DENSE_WHERE_BELOW``) the 1×1 runs on their gathered
        centres and is written over the conv's output; with many, both convs run everywhere and the sharp
        windows' rows are written over the 1×1 output (the dense masked form's values, without
        ``torch.where``'s slow CPU loop), which costs less than gathering most of the map. Both run
        channels-last, as every path of this module does.
        """
        if sharp_fraction < DENSE_WHERE_BELOW:
            x = x.contiguous(memory_format=torch.channels_last)
            sharp, smooth = self.spec.conv2d(x, self.weight, self.bias), self._smooth(x, None, out_size)
            sharp, smooth = sharp.permute(0, 2, 3, 1), smooth.permute(0, 2, 3, 1)  # (B, H', W', C_out)
            if not (sharp.is_contiguous() and smooth.is_contiguous()):
                return torch.where(mask.unsqueeze(1), sharp.permute(0, 3, 1, 2), smooth.permute(0, 3, 1, 2))
            # the sharp windows' rows written over the 1×1 output: the same values as torch.where, whose
            # CPU kernel is a scalar loop (0.55 ms for a 16-channel 32×32 batch of 64, ~3x the index ops)
            positions = mask.flatten().nonzero().squeeze(1)
            rows = smooth.view(-1, smooth.shape[-1])
            rows.index_copy_(0, positions, sharp.reshape(-1, sharp.shape[-1]).index_select(0, positions))
            return smooth.permute(0, 3, 1, 2)
        x = x.contiguous(memory_format=torch.channels_last)
        out = self.spec.conv2d(x, self.weight, self.bias).permute(0, 2, 3, 1)  # (B, H', W', C_out)
        if not out.is_contiguous():
            out = out.contiguous()
        smooth = (~mask).flatten().nonzero().squeeze(1)  # flat output positions of the smooth windows
        if smooth.numel():
            (out_h, out_w), (sh, sw) = out_size, self.stride
            image, rest = smooth // (out_h * out_w), smooth % (out_h * out_w)
            first = first_centre_inside(self.spec, x, out_size)
            if first is not None:  # the centres are pixels of x itself
                rows, (height, width) = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), x.shape[2:]
            else:  # some centre lies in the padding
                left, right, top, bottom = self.spec.explicit_padding
                height, width = x.shape[2] + top + bottom, x.shape[3] + left + right
                rows = self._channels_last_buffer(x, height, width).view(-1, x.shape[1])
                first = centre_offset(self.spec)
            centre = (image * height + first[0] + (rest // out_w) * sh) * width + first[1] + (rest % out_w) * sw
            values = rows_times_kernel(rows.index_select(0, centre), summed_kernel(self.weight), self.bias, self.groups)
            out.view(-1, out.shape[-1]).index_copy_(0, smooth, values)
        return out.permute(0, 3, 1, 2)

    def _channels_last_buffer(self, x: Tensor, full_h: int, full_w: int) -> Tensor:
        """The padded input as (B, full_h, full_w, C_in), zero beyond the padded size, in one copy for 'zeros'."""
        left, right, top, bottom = self.spec.explicit_padding
        pad_h, pad_w = x.shape[2] + top + bottom, x.shape[3] + left + right
        buffer = x.new_empty(x.shape[0], full_h, full_w, x.shape[1])
        if self.padding_mode == "zeros":  # one copy: x into the interior, zeros around it
            buffer[:, top : top + x.shape[2], left : left + x.shape[3]] = x.permute(0, 2, 3, 1)
            buffer[:, :top] = 0
            buffer[:, top + x.shape[2] :] = 0
            buffer[:, top : top + x.shape[2], :left] = 0
            buffer[:, top : top + x.shape[2], left + x.shape[3] :] = 0
        else:
            buffer[:, :pad_h, :pad_w] = pad_input(self.spec, x).permute(0, 2, 3, 1)
            buffer[:, pad_h:] = 0
            buffer[:, :pad_h, pad_w:] = 0
        return buffer

    def _native_applies(self, x: Tensor) -> bool:
        """Whether the native kernel can run this call (the cheap checks first; the last one builds it)."""
        return (
            self.groups == 1
            and self.padding_mode == "zeros"
            and self.out_channels % 16 == 0
            and native_ready(x, self.weight, self.bias)
        )

    def native_weights(self) -> tuple[Tensor, Tensor]:
        """The native kernel's operands, cached per weight version: W as (kh*kw, C_in, C_out), Σw as (C_in, C_out)."""
        weight = self.weight

        def pack() -> tuple[Tensor, Tensor]:
            w = weight.detach()
            taps = w.permute(2, 3, 1, 0).reshape(-1, w.shape[1], w.shape[0]).contiguous()
            return taps, summed_kernel(w)[:, :, 0, 0].t().contiguous()

        return self._native_cache.get((weight,), pack)

    def _native_sparse(self, x: Tensor, mask: Tensor) -> Tensor:
        """The pixel path in convzoo's native kernel: (B, C_in, H, W) -> (B, C_out, H', W') in x's layout."""
        taps, summed = self.native_weights()
        left, _, top, _ = self.spec.explicit_padding
        bias = None if self.bias is None else self.bias.detach()
        geometry = [list(self.kernel_size), list(self.stride), list(self.dilation), [top, left]]
        return native_ops().cac_sparse(x, mask.contiguous(), taps, summed, bias, *geometry)

    def _pixel_sparse(self, x: Tensor, mask: Tensor, out_size: tuple[int, int]) -> Tensor:
        """The k×k conv at the sharp windows only (gathered columns, one GEMM), the 1×1 everywhere else."""
        self.last_native = self._native_applies(x)
        if self.last_native:
            return self._native_sparse(x, mask)
        c_in = x.shape[1]
        # channels-last first: the 1x1 then reads x itself, and a pixel is a row of C_in values
        x = x.contiguous(memory_format=torch.channels_last)
        c_out, groups = self.spec.out_channels, self.groups
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        left, right, top, bottom = self.spec.explicit_padding
        if self.padding_mode == "zeros" and first_centre_inside(self.spec, x, out_size) is not None:
            # gather straight from x: the taps of border windows that fall in the zero padding are
            # clamped into x and zeroed after the gather (no padded copy of the input)
            source = x.permute(0, 2, 3, 1)  # (B, H, W, C_in), a view
            out = self._smooth(x, x, out_size)
        else:
            source = self._channels_last_buffer(x, x.shape[2] + top + bottom, x.shape[3] + left + right)
            out = self._smooth(x, source.permute(0, 3, 1, 2), out_size)
            top = left = 0  # the buffer's coordinates already include the padding
        out = out.permute(0, 2, 3, 1)  # (B, H', W', C_out)
        if not out.is_contiguous():
            out = out.contiguous()
        sharp = mask.flatten().nonzero().squeeze(1)  # flat output positions of the sharp windows, (n,)
        if not sharp.numel():
            return out.permute(0, 3, 1, 2)
        height, width = source.shape[1:3]
        rows, out_rows = source.reshape(-1, c_in), out.view(-1, c_out)
        # the weight as one (C_out, taps * C_in/g) matrix per group, taps (i, j)-major like the columns
        taps = kh * kw
        weight = self.weight.permute(0, 2, 3, 1).reshape(c_out, taps * (c_in // groups), 1, 1)
        geometry = WindowGeometry((height, width), out_size, (kh, kw), (sh, sw), (dh, dw), (top, left))
        chunk = max(1, _COLUMN_CHUNK_BYTES // (taps * max(c_in * x.element_size(), 8)))  # columns or indices
        for start in range(0, sharp.numel(), chunk):
            positions = sharp[start : start + chunk]
            n = positions.numel()
            pixels, border, outside = sharp_window_taps(positions, geometry)
            # im2col of the sharp windows: whole pixels (C_in contiguous values) with one index_select; the
            # taps that fall in the zero padding read a clamped pixel and are zeroed after (index_fill_
            # writes only those rows: cheaper than masking every border window's columns)
            columns = rows.index_select(0, pixels.flatten())  # (n * taps, C_in)
            if border.numel():
                window, tap = outside.nonzero().unbind(1)
                columns.index_fill_(0, border.index_select(0, window) * taps + tap, 0)
            columns = columns.view(n, taps, c_in)
            if groups > 1:  # (n, taps, g, C/g) -> (n, g, taps, C/g): each group's columns contiguous
                columns = columns.view(n, taps, groups, -1).transpose(1, 2)
            out_rows.index_copy_(0, positions, rows_times_kernel(columns.reshape(n, -1), weight, self.bias, groups))
        return out.permute(0, 3, 1, 2)

    def _block_sparse(self, x: Tensor, grid: Tensor, active: Tensor, out_size: tuple[int, int]) -> Tensor:
        """The k×k conv on the blocks holding a sharp window (with their halo), the 1×1 everywhere else."""
        batch, c_in = x.shape[:2]
        c_out, tile = self.spec.out_channels, self.tile
        (out_h, out_w), (kh, kw), (sh, sw), (dh, dw) = out_size, self.kernel_size, self.stride, self.dilation
        tiles_h, tiles_w = math.ceil(out_h / tile), math.ceil(out_w / tile)
        in_h, in_w = (tile - 1) * sh + (kh - 1) * dh + 1, (tile - 1) * sw + (kw - 1) * dw + 1

        # Padded input, channels last, with zero rows/cols so that every block's input fits (they
        # only feed outputs beyond H' x W', which are cropped).
        left, right, top, bottom = self.spec.explicit_padding
        pad_h, pad_w = x.shape[2] + top + bottom, x.shape[3] + left + right
        full_h, full_w = max(pad_h, (tiles_h - 1) * tile * sh + in_h), max(pad_w, (tiles_w - 1) * tile * sw + in_w)
        buffer = self._channels_last_buffer(x, full_h, full_w)

        # 1x1 conv on every window centre -> output buffer (B, tiles_h*tile, tiles_w*tile, C_out).
        smooth = self._smooth(x, buffer[:, :pad_h, :pad_w].permute(0, 3, 1, 2), out_size).permute(0, 2, 3, 1)
        if (tiles_h * tile, tiles_w * tile) == (out_h, out_w) and smooth.is_contiguous():
            out = smooth
        else:
            out = smooth.new_empty(batch, tiles_h * tile, tiles_w * tile, c_out)  # the convs' dtype (autocast)
            out[:, :out_h, :out_w] = smooth

        b, i, j = active.nonzero(as_tuple=True)
        if b.numel():
            # Gather the active blocks with their halo as whole pixels (rows of C contiguous floats) with
            # one index_select: (n, in_h, in_w, C). Advanced indexing of a strided 6-D view is ~6x slower.
            rows_in = torch.arange(in_h, device=x.device)
            cols_in = torch.arange(in_w, device=x.device)
            top_left = (b * full_h + i * (tile * sh)) * full_w + j * (tile * sw)  # (n,)
            pixels = top_left[:, None, None] + rows_in[None, :, None] * full_w + cols_in[None, None, :]
            blocks = buffer.view(-1, c_in).index_select(0, pixels.flatten()).view(-1, in_h, in_w, c_in)
            sharp = F.conv2d(
                blocks.permute(0, 3, 1, 2), self.weight, self.bias, self.stride, 0, self.dilation, self.groups
            )
            sharp = sharp.permute(0, 2, 3, 1).reshape(-1, c_out)  # (n*tile*tile, C_out), block-major
            # Scatter only the sharp windows of the active blocks (they are all the sharp windows).
            rows_out = torch.arange(tile, device=x.device)
            out_w_full = tiles_w * tile
            corner = (b * (tiles_h * tile) + i * tile) * out_w_full + j * tile  # (n,)
            positions = corner[:, None, None] + rows_out[None, :, None] * out_w_full + rows_out[None, None, :]
            keep = grid[b, i, j].flatten().nonzero().squeeze(1)  # sharp windows, in block order
            out.view(-1, c_out).index_copy_(0, positions.flatten()[keep], sharp.index_select(0, keep))
        return out[:, :out_h, :out_w].permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        s = f"{self.spec.describe()}, algorithm={self.algorithm!r}, threshold={self.threshold!r}"
        return s + (f", tile={self.tile}" if self.algorithm == "block" else "")
