"""The inference form of a CAC layer that is sharp for every input: its k×k conv, as an ``nn.Conv2d``.

G >= 0 everywhere, so with γ >= 0 and β > 0 every window is sharp (γG + β >= β > 0) and the layer
computes exactly its k×k conv. ``CAConv2d.fuse()`` (so ``convzoo.deploy``) then returns a
:class:`CACSharpConv2d`: an ``nn.Conv2d`` in all it computes and exports, with no score map, that
still counts as a CAC layer for the statistics, the profiler and ``plot_masks`` (ρ = 1 on every call).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convzoo.ops.cac import CACStatsMixin
from convzoo.ops.cac_sparse import batchnorm_folded
from convzoo.ops.conv_spec import ConvSpec, NoTorchScript, check_input, is_tracing


class CACSharpConv2d(NoTorchScript, CACStatsMixin, nn.Conv2d):
    """An always-sharp CAC layer in its deployed form: exactly ``nn.Conv2d`` with the layer's kernel.

    Args:
        spec: the conv geometry.
        weight, bias: the trained kernel (C_out, C_in/g, kh, kw) and bias (C_out,) or None (copied).
        gamma, beta: the trained score parameters (copied; unused by ``forward``, kept so that the
            state_dict has the keys of :class:`~convzoo.ops.cac_sparse.CACSparseConv2d`).

    Shapes:
        input (B, C_in, H, W) or (C_in, H, W) -> output as ``nn.Conv2d``.

    Each call records what a CAC layer records, for ρ = 1: ``last_mask`` (all True, an expanded view),
    ``last_sharp_count`` and ``last_output_size``. Its effective MACs are the conv's (no score map runs).
    The parameters are frozen, as in the sparse form.
    """

    convzoo_kind = "cac"

    def __init__(self, spec: ConvSpec, weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor) -> None:
        if not isinstance(spec, ConvSpec):
            raise TypeError(f"spec must be a ConvSpec, got {type(spec).__name__}")
        expected = (spec.out_channels, spec.in_channels // spec.groups, *spec.kernel_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight must have shape {expected} for {spec.describe()}, got {tuple(weight.shape)}")
        gamma_value, beta_value = float(gamma.detach()), float(beta.detach())
        if not (gamma_value >= 0 and beta_value > 0):
            raise ValueError(
                f"CACSharpConv2d needs gamma >= 0 and beta > 0 (every window sharp), got gamma={gamma_value}, "
                f"beta={beta_value}: use CACSparseConv2d"
            )
        super().__init__(**spec.conv_kwargs(), device=weight.device, dtype=weight.dtype)
        self.spec = spec
        with torch.no_grad():
            self.weight.copy_(weight)
            if self.bias is not None:
                self.bias.copy_(bias)
        self.requires_grad_(False)
        self.gamma = nn.Parameter(gamma.detach().clone().reshape(()), requires_grad=False)
        self.beta = nn.Parameter(beta.detach().clone().reshape(()), requires_grad=False)
        self.last_output_size: tuple[int, int] | None = None
        self._last_call: tuple[int, torch.device] | None = None  # (batch, device) of the last call

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_in, H, W) -> (B, C_out, H', W'): the conv; records ρ = 1 (except under tracing)."""
        if check_input(x, self.in_channels, "CACSharpConv2d"):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        out = super().forward(x)
        if not is_tracing():  # plain ints only: the mask and counts are built when someone reads them
            self.last_output_size = (out.shape[2], out.shape[3])
            self._last_call = (out.shape[0], out.device)
        return out

    @property
    def last_mask(self) -> Tensor | None:  # type: ignore[override]
        """The last call's sharp-window mask, (B, H', W') bool: all True (an expanded view)."""
        if self._last_call is None or self.last_output_size is None:
            return None
        batch, device = self._last_call
        return torch.ones((), dtype=torch.bool, device=device).expand(batch, *self.last_output_size)

    @property
    def last_sharp_count(self) -> Tensor | None:  # type: ignore[override]
        """The last call's sharp windows per image, (B,) int64: every window."""
        if self._last_call is None or self.last_output_size is None:
            return None
        batch, device = self._last_call
        height, width = self.last_output_size
        return torch.full((batch,), height * width, dtype=torch.int64, device=device)

    def effective_macs_per_image(self) -> Tensor:
        """MACs of each image of the last call, (B,) float64: the k×k conv at every position, nothing more."""
        rho = self.last_rho()
        positions = self.last_output_size[0] * self.last_output_size[1]  # type: ignore[index]
        return torch.full_like(rho, float(positions * self.macs_per_position()[0]))

    def fuse_batchnorm(self, bn: nn.Module) -> CACSharpConv2d:
        """This layer followed by eval-mode ``bn``, as one CACSharpConv2d (exact; ``convzoo.deploy`` calls it)."""
        spec, weight, bias = batchnorm_folded(self.spec, self.weight, self.bias, bn)
        return CACSharpConv2d(spec, weight, bias, self.gamma, self.beta).train(self.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", always sharp"
