"""The training step of a Multiception block's middle, depthwise branches -> BN(K*C) -> 1x1, as one op.

In training mode BN(K*C) normalises with batch statistics, so the K*C-channel intermediate z (three
times the input for kernels (3, 5, 7)) has to exist. Autograd through ``cat -> BatchNorm2d -> 1x1``
copies the branch outputs into z, writes z's normalised copy, reads it back for the 1x1, and runs
BN's backward. That backward makes two more passes over z and its gradient, on top of the 1x1's
own. This is most of a Multiception layer's memory traffic, and on CPU the layer is memory-bound.

:func:`branches_norm_pointwise` computes the same values and gradients with fewer passes. With
batch mean mu, variance var and s = gamma / sqrt(var + eps), per channel of z:

    forward:  y = (P diag(s)) z + (b + P (beta - s mu))      the 1x1 on z itself, no normalised copy
    backward: with g_y the output gradient and G = g_y z^T (the 1x1's weight gradient on z),
              sum_p g_u   = P^T sum_p g_y                    (g_u = P^T g_y, the gradient BN's output gets)
              sum_p g_u z = sum_o P * G                      (so BN needs no reduction pass of its own)
              dL/dz       = (P diag(s))^T g_y + alpha z + delta      per-channel alpha, delta
              dL/dP = s G + outer(sum_p g_y, beta - s mu);  dL/dgamma = sum_p g_u z_hat;  dL/dbeta = sum_p g_u

This is BN's own backward formula, with its two reductions read off the 1x1's gradients instead of
recomputed. z is never concatenated: each branch output z_j keeps its own buffer, the 1x1 runs as
one 1x1 per branch accumulated into y, and every gradient is taken per branch (a whole training step
of cifar_resnet20 measured 6 % faster than with the concatenation). The depthwise weight gradients
of kernels wider than 3 go through :func:`~convzoo.ops.depthwise.column_block_weight_grad`, and the
branches share one laid-out input. The batch statistics come from ``batch_norm_update_stats``, BN's
own kernel; ``var_mean`` is 20x slower on channels-last tensors. The running statistics are
updated as ``nn.BatchNorm2d`` updates them.

Its fused backward is once-differentiable. Under ``create_graph`` (a gradient penalty, a double
backward) the op's backward instead runs autograd on the plain forward (cat -> BN -> 1x1) from the
saved inputs, so that its gradients can be differentiated again.
:class:`~convzoo.ops.multiception.MulticeptionConv2d` uses the op on CPU in training mode (no
tracing, no autocast, float32/float64) and runs plain modules elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from convzoo.ops.depthwise import (
    FAST_WIDTH,
    RowPadded,
    column_block_weight_grad,
    gradient_row_width,
    input_grad_from_rows,
)

_conv_backward = torch.ops.aten.convolution_backward


def _per_channel(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


def _centred_padding(weight: Tensor) -> tuple[int, int]:
    return weight.shape[2] // 2, weight.shape[3] // 2


def _branch_backward(
    x: Tensor,
    x_rows: RowPadded | None,
    row_width: int | None,
    weight: Tensor,
    z: Tensor,
    grad_u: Tensor,
    alpha: Tensor,
    delta: Tensor,
    stride: tuple[int, int],
    want_x: bool,
) -> tuple[Tensor | None, Tensor]:
    """One branch's gradients from dL/dz = grad_u + alpha z + delta (per-channel alpha, delta).

    Args:
        x: the block's input (B, C, H, W), channels-last; ``x_rows`` it laid out for column blocks,
            or None for a branch whose kernel is at most 3 wide (or a strided one).
        weight: the branch's (C, 1, k, k) depthwise kernel; z its output (B, C, H', W').

    Returns:
        (the gradient of x through this branch or None, the kernel's gradient).
    """
    padding = _centred_padding(weight)
    if x_rows is None:
        grad_z = torch.addcmul(_per_channel(delta), z, _per_channel(alpha)).add_(grad_u)
        grad_x, grad_w, _ = _conv_backward(
            grad_z, x, weight, None, stride, padding, (1, 1), False, (0, 0), x.shape[1], (want_x, True, False)
        )
        return grad_x, grad_w
    # written straight into zero-padded rows: the column blocks and the input gradient read them there
    grad_z_rows = RowPadded.empty(z, tuple(z.shape), row_width)
    grad_z = grad_z_rows.interior()
    torch.addcmul(_per_channel(delta), z, _per_channel(alpha), out=grad_z)
    grad_z.add_(grad_u)
    grad_w = column_block_weight_grad(grad_z_rows, x_rows, tuple(weight.shape[2:]), stride, padding)
    grad_x = input_grad_from_rows(grad_z_rows, weight, padding, x.shape[3]) if want_x else None
    return grad_x, grad_w


class _BranchesNormPointwise(torch.autograd.Function):
    """(x, BN gamma/beta, 1x1 weight/bias, K depthwise weights) -> (y, batch mean, batch variance)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        gamma: Tensor,
        beta: Tensor,
        pointwise_weight: Tensor,
        pointwise_bias: Tensor,
        stride: tuple[int, int],
        eps: float,
        *branch_weights: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        channels = x.shape[1]
        # z_j, (B, C, H', W') each: z = cat(z_j) is never built
        z = [F.conv2d(x, w, None, stride, _centred_padding(w), 1, channels) for w in branch_weights]
        stats = [torch.ops.aten.batch_norm_update_stats(z_j, None, None, 0.0) for z_j in z]  # biased variance
        mean, var = torch.cat([m for m, _ in stats]), torch.cat([v for _, v in stats])
        invstd = torch.rsqrt(var + eps)
        scale = gamma * invstd
        weight = pointwise_weight * _per_channel(scale)  # (C_out, K*C, 1, 1)
        bias = pointwise_bias + pointwise_weight.flatten(1) @ (beta - scale * mean)
        parts = weight.split(channels, dim=1)
        y = F.conv2d(z[0], parts[0], bias)
        for z_j, part in zip(z[1:], parts[1:], strict=True):
            y.add_(F.conv2d(z_j, part))
        ctx.save_for_backward(x, mean, invstd, gamma, beta, pointwise_weight, weight, *branch_weights, *z)
        ctx.stride, ctx.branches, ctx.eps = stride, len(branch_weights), eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mean: Tensor, _grad_var: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph: a double backward must be able to differentiate this
            return _BranchesNormPointwise._differentiable_backward(ctx, grad_y)
        return _BranchesNormPointwise._fused_backward(ctx, grad_y)

    @staticmethod
    def _differentiable_backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        """The same gradients through autograd on the plain forward (cat -> batch-stat BN -> 1x1), with a graph.

        Used under ``create_graph`` (gradient penalties, double backward): the saved inputs are still
        connected to the graph, so the gradients returned here can be differentiated again.
        """
        x, _, _, gamma, beta, pointwise_weight, _, *rest = ctx.saved_tensors
        branch_weights = rest[: ctx.branches]
        inputs = (x, gamma, beta, pointwise_weight, *branch_weights)
        needs = (*ctx.needs_input_grad[:4], *ctx.needs_input_grad[7:])
        wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
        grad_bias = grad_y.sum((0, 2, 3)) if ctx.needs_input_grad[4] else None
        if not wanted:  # only the 1x1 bias needs a gradient
            return None, None, None, None, grad_bias, None, None, *([None] * ctx.branches)
        with torch.enable_grad():
            channels = x.shape[1]
            z = torch.cat(
                [F.conv2d(x, w, None, ctx.stride, _centred_padding(w), 1, channels) for w in branch_weights], dim=1
            )
            normalized = F.batch_norm(z, None, None, gamma, beta, training=True, eps=ctx.eps)
            y = F.conv2d(normalized, pointwise_weight)  # no bias: its gradient is grad_y's sum (above)
            found = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True, allow_unused=True))
        grads = [next(found) if need else None for need in needs]
        return (*grads[:4], grad_bias, None, None, *grads[4:])

    @staticmethod
    @once_differentiable
    def _fused_backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, invstd, gamma, beta, pointwise_weight, weight, *rest = ctx.saved_tensors
        branch_weights, z = rest[: ctx.branches], rest[ctx.branches :]
        stride, channels = ctx.stride, x.shape[1]
        count = z[0].numel() // channels
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        grad_bias = grad_y.sum((0, 2, 3))
        parts = weight.split(channels, dim=1)
        # G = g_y z^T, the 1x1's weight gradient on z, one branch at a time
        weight_only = (False, True, False)
        g = torch.cat(
            [
                _conv_backward(grad_y, z_j, part, None, (1, 1), (0, 0), (1, 1), False, (0, 0), 1, weight_only)[1]
                for z_j, part in zip(z, parts, strict=True)
            ],
            dim=1,
        ).flatten(1)
        p = pointwise_weight.flatten(1)
        scale = gamma * invstd
        sum_grad_u = p.t() @ grad_bias  # sum_p g_u, per channel of z
        sum_grad_u_z = (p * g).sum(0)  # sum_p g_u * z
        grad_gamma = (sum_grad_u_z - mean * sum_grad_u) * invstd  # sum_p g_u * z_hat
        grad_pointwise = scale * g + torch.outer(grad_bias, beta - scale * mean)
        alpha = -scale * grad_gamma * invstd / count
        delta = -alpha * mean - scale * sum_grad_u / count

        wide = [w.shape[3] > FAST_WIDTH for w in branch_weights]
        x_rows = row_width = None
        if any(wide) and stride == (1, 1):  # one laid-out input for every wide branch
            row_width = max(
                gradient_row_width(x.shape[3], z[0].shape[3], w.shape[3] // 2, 1)
                for w, is_wide in zip(branch_weights, wide, strict=True)
                if is_wide
            )
            x_rows = RowPadded.of(x, row_width)
        grad_x, grad_branches = None, []
        for j, (w, z_j, part) in enumerate(zip(branch_weights, z, parts, strict=True)):
            block = slice(j * channels, (j + 1) * channels)
            grad_u = F.conv2d(grad_y, part.transpose(0, 1))  # (P_j diag(s_j))^T g_y, a 1x1 from g_y
            rows = x_rows if wide[j] else None
            grad_xj, grad_w = _branch_backward(
                x, rows, row_width, w, z_j, grad_u, alpha[block], delta[block], stride, ctx.needs_input_grad[0]
            )
            grad_branches.append(grad_w)
            if grad_xj is None:
                continue
            if grad_x is None:  # the first one copied into a dense buffer (unless it is one), the rest added to it
                grad_x = grad_xj.contiguous(memory_format=torch.channels_last)
            else:
                grad_x.add_(grad_xj)
        grad_weight = grad_pointwise.view_as(pointwise_weight)
        return (grad_x, grad_gamma, sum_grad_u, grad_weight, grad_bias, None, None, *grad_branches)


def branches_norm_pointwise(
    x: Tensor,
    branches: nn.ModuleList,
    bn: nn.BatchNorm2d,
    pointwise: nn.Conv2d,
) -> Tensor:
    """``pointwise(bn(cat([branch(x) for branch in branches])))`` in training mode, as one op (module docstring).

    Args:
        x: the input (B, C, H, W), channels-last.
        branches: K depthwise ``nn.Conv2d(C, C, k, stride, k // 2, groups=C, bias=False)``, one stride.
        bn: the ``nn.BatchNorm2d(K*C)`` (affine) between them, normalising with batch statistics;
            its running statistics are updated as its own forward would update them.
        pointwise: the 1x1 conv K*C -> C_out with bias.

    Returns:
        (B, C_out, H', W').

    Raises:
        ValueError: ``x`` is not (B, C, H, W) with C the branches' ``in_channels``.
    """
    channels = branches[0].in_channels
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(
            f"branches_norm_pointwise needs x (B, C, H, W) with C = the branches' in_channels={channels}, "
            f"got shape {tuple(x.shape)}"
        )
    y, mean, var = _BranchesNormPointwise.apply(
        x,
        bn.weight,
        bn.bias,
        pointwise.weight,
        pointwise.bias,
        branches[0].stride,
        bn.eps,
        *[b.weight for b in branches],
    )
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            count = y.shape[0] * y.shape[2] * y.shape[3]
            bn.running_mean.lerp_(mean, momentum)
            bn.running_var.lerp_(var * (count / max(count - 1, 1)), momentum)
    return y


def fused_training_applies(x: Tensor, branches: nn.ModuleList, bn: nn.Module, pointwise: nn.Module) -> bool:
    """Whether :func:`branches_norm_pointwise` computes this block.

    Plain modules, batch statistics, CPU, and a kernel wider than 3. Without a wide kernel the op
    gains nothing: on cifar_resnet20's (3, 3) layers it measured 5.3 vs 5.2 ms and 5.3 vs 4.7 ms
    (fused vs modules, forward and backward, channels-last, batch 128).
    """
    plain_branches = all(
        type(b) is nn.Conv2d
        and b.bias is None
        and b.padding_mode == "zeros"
        and b.groups == b.in_channels == b.out_channels
        and b.dilation == (1, 1)
        and b.padding == _centred_padding(b.weight)
        for b in branches
    )
    strides = {b.stride for b in branches}
    if len(strides) != 1:
        return False
    (stride_h, stride_w) = strides.pop()
    positions = x.shape[0] * ((x.shape[2] - 1) // stride_h + 1) * ((x.shape[3] - 1) // stride_w + 1)
    plain_bn = type(bn) is nn.BatchNorm2d and bn.affine and bn.training and positions > 1  # else BN's own error
    plain_pointwise = type(pointwise) is nn.Conv2d and pointwise.kernel_size == (1, 1) and pointwise.bias is not None
    wide = any(b.kernel_size[1] > FAST_WIDTH for b in branches)  # else BN(K*C) is small: modules are as fast
    return (
        wide
        and plain_branches
        and plain_bn
        and plain_pointwise
        and pointwise.stride == (1, 1)
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)  # reduced precision: BN's own mixed-precision handling
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    )
