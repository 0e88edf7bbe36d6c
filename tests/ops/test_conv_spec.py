"""Layout helpers of convzoo.ops.conv_spec."""

from __future__ import annotations

import pytest
import torch

from convzoo.ops.conv_spec import memory_format_of, relayout
from convzoo.ops.multiception import MulticeptionConv2d
from convzoo.ops.separable import MixConv2d


@pytest.mark.parametrize(
    ("source", "target"),
    [(torch.contiguous_format, torch.channels_last), (torch.channels_last, torch.contiguous_format)],
)
def test_relayout_returns_the_gradient_in_the_inputs_layout(source, target) -> None:
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=source).requires_grad_()
    y = relayout(x, target)
    assert memory_format_of(y) == target or (target == torch.contiguous_format and y.is_contiguous())
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    grad = torch.randn(2, 3, 4, 5).contiguous(memory_format=target)
    # autograd.grad returns the gradient raw (x.grad would be made to match x's layout anyway)
    (grad_x,) = torch.autograd.grad(y, x, grad)
    assert grad_x.is_contiguous(memory_format=source)
    torch.testing.assert_close(grad_x, grad, rtol=0, atol=0)


def test_tensor_contiguous_alone_would_leak_the_layout() -> None:
    """Why relayout exists: Tensor.contiguous passes the gradient through in the new layout."""
    seen = []
    activation = torch.randn(2, 3, 4, 5, requires_grad=True) * 1.0  # not a leaf: leaves get dense grads anyway
    activation.register_hook(seen.append)
    activation.contiguous(memory_format=torch.channels_last).backward(
        torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), retain_graph=True
    )
    assert not seen[0].is_contiguous()
    seen.clear()
    relayout(activation, torch.channels_last).backward(
        torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    )
    assert seen[0].is_contiguous()


@pytest.mark.parametrize("layer", [MulticeptionConv2d(4, 6, kernels=(3, 5)), MixConv2d(4, 6, kernels=(3, 5))])
def test_channels_last_islands_keep_the_models_layout_forward_and_backward(layer) -> None:
    seen = []
    x = torch.randn(2, 4, 8, 8, requires_grad=True) * 1.0
    x.register_hook(seen.append)
    y = layer.train()(x)
    assert y.is_contiguous()
    y.backward(torch.randn_like(y))
    assert seen[0].is_contiguous()
