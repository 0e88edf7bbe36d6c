"""Helpers for equivalence tests of folded / converted models (used by convzoo's tests too)."""

from __future__ import annotations

import torch
from torch import nn

from convzoo.ops.registry import check_module
from convzoo.profiling import count_parameters

__all__ = ["assert_same_backward", "count_parameters", "make_trained_like_", "randomize_batchnorm_"]


@torch.no_grad()
def randomize_batchnorm_(model: nn.Module, *, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters, in place.

    A freshly initialised BN (mean 0, var 1, gamma 1, beta 0) is close to identity and
    hides folding bugs; equivalence tests call this first.
    """
    for module in check_module(model).modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            shape = module.num_features
            tensor = module.running_mean if module.running_mean is not None else module.weight
            if tensor is None:  # neither running statistics nor affine parameters: nothing to randomize
                continue
            like = {"device": tensor.device, "dtype": tensor.dtype}
            if module.running_mean is not None and module.running_var is not None:
                module.running_mean.copy_(torch.randn(shape, generator=generator).to(**like) * 0.5)
                module.running_var.copy_(torch.rand(shape, generator=generator).to(**like) * 1.5 + 0.25)
            if module.affine:
                module.weight.copy_(torch.randn(shape, generator=generator).to(**like) * 0.5 + 1.0)
                module.bias.copy_(torch.randn(shape, generator=generator).to(**like) * 0.5)
    return model


@torch.no_grad()
def make_trained_like_(model: nn.Module, inputs: torch.Tensor, *, sharp_ratio: float = 0.5) -> nn.Module:
    """Put a model with convzoo operators into a trained-like state, in place, and return it in eval mode.

    A freshly converted model hides folding bugs (BN near identity, DO-Conv's D' = 0, every CAC window
    sharp). This randomizes every BatchNorm (:func:`randomize_batchnorm_`), draws DO-Conv's D' from
    N(0, 0.1²) and calibrates CAC layers so that ``sharp_ratio`` of the windows of ``inputs`` are sharp
    (both branches of every layer then run).

    Args:
        model: any model; operators it does not hold are left alone.
        inputs: a batch (B, C, H, W) for the CAC calibration.
        sharp_ratio: the target fraction of sharp CAC windows in [0, 1].
    """
    from convzoo.ops.cac import has_cac_layers
    from convzoo.ops.cac_cost import calibrate_sharp_ratio_
    from convzoo.ops.doconv import DOConv2d

    randomize_batchnorm_(model)
    for module in model.modules():
        if isinstance(module, DOConv2d):
            module.d_delta.normal_(0, 0.1)
    model.eval()
    if has_cac_layers(model):
        calibrate_sharp_ratio_(model, inputs, sharp_ratio)
    return model


def assert_same_backward(
    model: nn.Module,
    reference: nn.Module,
    output: torch.Tensor,
    reference_output: torch.Tensor,
    *,
    rtol: float,
    atol: float,
) -> torch.Tensor:
    """Backpropagate one random gradient through ``output`` and ``reference_output``; assert that the
    two modules' parameters (in the same order) got the same gradients. Returns the gradient used."""
    grad = torch.randn_like(output)  # not output.sum(): a constant gradient vanishes through a BatchNorm
    output.backward(grad)
    reference_output.backward(grad)
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol, msg=name)
    return grad
