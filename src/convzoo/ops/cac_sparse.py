"""The inference form of CAC whose wall-clock time falls with the fraction of sharp windows.

The dense masked form computes the k×k conv *and* the 1×1 conv at every position, so it saves
nothing (that is what the authors' code does). :class:`CACSparseConv2d` is block-sparse:

1. the score map (channel mean, Sobel, γG + β > 0) is computed exactly as the training form does;
2. the output is cut into ``tile × tile`` blocks; a block is *active* if it holds a sharp window;
3. the padded input is copied once to channels-last (B, Hp, Wp, C); a strided view with one entry
   per block lets one gather collect the input of every active block *with its halo*
   (``(tile-1)·stride + (k-1)·dilation + 1`` pixels a side), (n_active, h_in, w_in, C);
4. one dense conv (oneDNN / cuDNN, channels-last) over the gathered blocks gives their k×k outputs;
5. the 1×1 conv Σw runs on every window centre (1/k² of the k×k cost), and the active blocks
   are written back as ``where(sharp, k×k, 1×1)``; the result is a (B, C_out, H', W') tensor with
   channels-last strides (no copy back).

Cost: (active blocks)·(k×k conv of a block with its halo) + 1×1 everywhere + gathers and copies,
so it is the fraction of *active blocks* (not ρ itself) that sets the time: 25 % sharp windows
spread evenly over the map activate nearly every block. Above a fraction of active blocks
(``threshold``, measured in ``benchmarks/bench_cac.py``) the dense conv is faster and the module
runs it instead (plus the 1×1 where a window is smooth, nothing more when every window is sharp).
Both paths equal the dense masked form of the training layer.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convzoo.ops.cac import (
    CAConv2d,
    CACStatsMixin,
    centre_pixels,
    pad_input,
    score_logits,
    summed_kernel,
)
from convzoo.ops.conv_spec import ConvAttributes, ConvSpec

DEFAULT_SPARSE_THRESHOLD = 0.7
"""Fraction of active blocks above which the dense conv is faster.

Measured by ``benchmarks/bench_cac.py`` (3×3, 64->64, 32×32, batch 64, CPU): the sparse and dense
paths crossed at about 0.7 active 4×4 blocks, on NCHW and channels-last inputs alike.
"""

DEFAULT_TILE = 4
"""Output block size of the sparse path (blocks of 4×4 outputs, 6×6 inputs for a 3×3 kernel)."""


def check_threshold(value: object) -> float:
    """Validate a sparse/dense switch-over fraction: a real number in [0, 1]."""
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"sparse_threshold must be a real number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"sparse_threshold must be in [0, 1], got {value!r}")
    return float(value)


def check_tile(value: object) -> int:
    """Validate the block size of the sparse path: a positive int."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"tile must be a positive int, got {value!r}")
    return value


class CACSparseConv2d(CACStatsMixin, ConvAttributes, nn.Module):
    """Inference form of :class:`~convzoo.ops.cac.CAConv2d`: block-sparse below ``threshold`` sharp windows.

    Built by ``CAConv2d.fuse()`` (so ``convzoo.deploy`` selects it). It is the deployed form of
    kind ``"cac"`` (``convzoo_kind``), which keeps it a leaf for tracers and for ``convert()``.

    Args:
        spec: the conv geometry.
        weight, bias, gamma, beta: the trained tensors (copied).
        threshold: run the dense path when the fraction of active blocks (blocks holding a sharp
            window) in the batch exceeds this.
        tile: output block size of the sparse path.

    Shapes:
        input (B, C_in, H, W) -> output (B, C_out, H', W'), with channels-last strides.

    After each call ``last_path`` is ``"sparse"`` or ``"dense"`` and ``last_active`` the fraction of
    active blocks.
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
        threshold: float = DEFAULT_SPARSE_THRESHOLD,
        tile: int = DEFAULT_TILE,
    ) -> None:
        super().__init__()
        if not isinstance(spec, ConvSpec):
            raise TypeError(f"spec must be a ConvSpec, got {type(spec).__name__}")
        expected = (spec.out_channels, spec.in_channels // spec.groups, *spec.kernel_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight must have shape {expected} for {spec.describe()}, got {tuple(weight.shape)}")
        self.spec = spec
        self.threshold = check_threshold(threshold)
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

    @classmethod
    def from_cac(cls, layer: CAConv2d, *, threshold: float | None = None, tile: int = DEFAULT_TILE) -> CACSparseConv2d:
        """The inference form of a trained ``CAConv2d`` (weights copied)."""
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
        )

    @torch.no_grad()
    def fuse_batchnorm(self, bn: nn.BatchNorm2d) -> CACSparseConv2d:
        """This layer followed by eval-mode ``bn``, as one CACSparseConv2d (exact).

        Both branches are linear in (W, b) and Σ(s·W) = s·Σw, so BN's per-channel scale s and shift
        t fold into the kernel and bias; the score map reads only the input and is unchanged.
        (``convzoo.deploy`` folds BN only into ``nn.Conv2d``; this is the hook to fold it here.)
        """
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.running_var is None:
            raise TypeError(f"bn must be an nn.BatchNorm2d with running statistics, got {type(bn).__name__}")
        if bn.num_features != self.spec.out_channels:
            raise ValueError(f"bn has {bn.num_features} features, the layer {self.spec.out_channels} output channels")
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0.0)
        bias = shift if self.bias is None else self.bias * scale + shift
        spec = ConvSpec.create(**{**self.spec.conv_kwargs(), "bias": True})
        weight = self.weight * scale.reshape(-1, 1, 1, 1)
        return CACSparseConv2d(spec, weight, bias, self.gamma, self.beta, threshold=self.threshold, tile=self.tile)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_in, H, W) -> (B, C_out, H', W'), equal to the CAConv2d it came from."""
        if x.dim() != 4:
            raise ValueError(f"CACSparseConv2d expects a 4-D input (B, C, H, W), got shape {tuple(x.shape)}")
        out_size = self.spec.output_size(x.shape[-2], x.shape[-1])
        mask = score_logits(self.spec, x, self.gamma, self.beta, out_size) > 0
        counts = mask.flatten(1).sum(1)
        self.last_mask, self.last_sharp_count, self.last_output_size = mask, counts, out_size
        if self.threshold < 1.0 and int(counts.sum()) == mask.numel():
            # every window sharp, so every block active: the dense path's plain conv, no block bookkeeping
            self.last_active, self.last_path = 1.0, "dense"
            return self.spec.conv2d(x, self.weight, self.bias)
        grid = self._block_mask(mask)
        active = grid.any(dim=(3, 4))  # (B, blocks_h, blocks_w)
        self.last_active = int(active.sum()) / active.numel()
        if self.last_active > self.threshold:
            self.last_path = "dense"
            return self._dense(x, mask, out_size)
        self.last_path = "sparse"
        return self._sparse(x, grid, active, out_size)

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

    def _smooth(self, padded: Tensor, out_size: tuple[int, int]) -> Tensor:
        """The 1×1 conv Σw at every window centre: padded (B, C, Hp, Wp) -> (B, C_out, H', W').

        A channels-last ``padded`` (the sparse path's buffer) gets its centre pixels copied densely
        first: oneDNN's 1×1 conv runs ~5x faster on them than on the strided view.
        """
        centres = centre_pixels(self.spec, padded, out_size)
        if padded.stride(1) == 1:
            centres = centres.contiguous(memory_format=torch.channels_last)
        return F.conv2d(centres, summed_kernel(self.weight), self.bias, 1, 0, 1, self.groups)

    def _dense(self, x: Tensor, mask: Tensor, out_size: tuple[int, int]) -> Tensor:
        padded = pad_input(self.spec, x)
        sharp = F.conv2d(padded, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return torch.where(mask.unsqueeze(1), sharp, self._smooth(padded, out_size))

    def _sparse(self, x: Tensor, grid: Tensor, active: Tensor, out_size: tuple[int, int]) -> Tensor:
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
        buffer = x.new_empty(batch, full_h, full_w, c_in)
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

        # 1x1 conv on every window centre -> output buffer (B, tiles_h*tile, tiles_w*tile, C_out).
        smooth = self._smooth(buffer[:, :pad_h, :pad_w].permute(0, 3, 1, 2), out_size).permute(0, 2, 3, 1)
        if (tiles_h * tile, tiles_w * tile) == (out_h, out_w) and smooth.is_contiguous():
            out = smooth
        else:
            out = x.new_empty(batch, tiles_h * tile, tiles_w * tile, c_out)
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
        return f"{self.spec.describe()}, threshold={self.threshold}, tile={self.tile}"
