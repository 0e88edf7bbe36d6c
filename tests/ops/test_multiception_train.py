"""The fused training op of Multiception's middle (convzoo.ops.multiception_train)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from convzoo.ops.multiception import MulticeptionConv2d
from convzoo.ops.multiception_train import branches_norm_pointwise
from convzoo.testing import assert_same_backward, randomize_batchnorm_

F64 = {"dtype": torch.float64}
FUSED = "_BranchesNormPointwiseBackward"


def _plain_modules(m: MulticeptionConv2d, x: torch.Tensor) -> torch.Tensor:
    """The block through its modules and autograd: the definition the fused op must match."""
    return m.bn_out(m.pointwise(m.bn_in(torch.cat([branch(x) for branch in m.branches], dim=1))))


def _layer(kernels, stride, **bn) -> MulticeptionConv2d:
    m = MulticeptionConv2d(4, 6, 3, stride, kernels=kernels, **F64)
    for module in (m.bn_in, m.bn_out):
        for key, value in bn.items():
            setattr(module, key, value)
    randomize_batchnorm_(m)
    with torch.no_grad():
        m.bn_in.bias.normal_()
        m.pointwise.bias.normal_()
    return m.train()


def _pointwise_node(y: torch.Tensor) -> str:
    """Name of the autograd node of the 1x1 step: the first node under bn_out's."""
    node = y.grad_fn
    assert type(node).__name__ == "NativeBatchNormBackward0"  # bn_out
    node = node.next_functions[0][0]
    while type(node).__name__ == "CloneBackward0":  # the copy back to the input's layout, if any
        node = node.next_functions[0][0]
    return type(node).__name__


@pytest.mark.parametrize(
    ("kernels", "stride", "size"),
    [((3, 5, 7), 1, (9, 11)), ((3, 5), 2, (9, 10)), ((3, 3, 5), 1, (7, 6)), ((5,), 1, (8, 8)), ((9, 3), 1, (12, 13)),
     ((1, 5), (2, 1), (7, 9))],
)  # fmt: skip
@pytest.mark.parametrize("bn", [{}, {"momentum": None}])
def test_fused_training_equals_the_modules_outputs_gradients_and_statistics(kernels, stride, size, bn) -> None:
    fused = _layer(kernels, stride, **bn)
    plain = copy.deepcopy(fused)
    x = torch.randn(3, 4, *size, **F64, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    for _step in range(2):  # the second step sees updated running statistics and num_batches_tracked
        y, y_plain = fused(x), _plain_modules(plain, x_plain)
        assert _pointwise_node(y) == FUSED
        torch.testing.assert_close(y, y_plain, rtol=1e-10, atol=1e-12)
        assert_same_backward(fused, plain, y, y_plain, rtol=1e-10, atol=1e-12)  # accumulates over the steps
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(fused.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


def test_without_running_statistics() -> None:
    fused = MulticeptionConv2d(3, 5, kernels=(3, 5), **F64)
    fused.bn_in = nn.BatchNorm2d(6, track_running_stats=False, **F64)
    plain = copy.deepcopy(fused)
    x = torch.randn(2, 3, 6, 6, **F64)  # an input that needs no gradient: only the parameters get one
    y, y_plain = fused(x), _plain_modules(plain, x)
    assert _pointwise_node(y) == FUSED
    torch.testing.assert_close(y, y_plain, rtol=1e-10, atol=1e-12)
    assert_same_backward(fused, plain, y, y_plain, rtol=1e-10, atol=1e-12)


def test_the_modules_run_where_the_fused_op_does_not_apply() -> None:
    m = _layer((3, 5, 7), 1)
    x = torch.randn(2, 4, 8, 8, **F64)
    assert _pointwise_node(m(x)) == FUSED
    assert _pointwise_node(m.eval()(x)) != FUSED  # running statistics: the modules (and deploy) path
    m.train()
    with torch.no_grad():
        assert m(x).grad_fn is None
    assert _pointwise_node(_layer((3, 3), 1)(x)) != FUSED  # no kernel wider than 3: nothing to gain

    class MyNorm(nn.BatchNorm2d):
        pass

    custom = copy.deepcopy(m)
    custom.bn_in = MyNorm(12, **F64)
    assert _pointwise_node(custom(x)) != FUSED
    half = copy.deepcopy(m).to(torch.bfloat16)
    assert _pointwise_node(half(x.to(torch.bfloat16))) != FUSED
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _pointwise_node(m(x.float().to(torch.float64))) != FUSED


def test_a_single_value_per_channel_still_gets_batchnorms_error() -> None:
    m = _layer((3, 5), 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        m(torch.randn(1, 4, 1, 1, **F64))


def test_float32_training_matches_the_modules() -> None:
    fused = MulticeptionConv2d(8, 6, kernels=(3, 5, 7)).train()
    plain = copy.deepcopy(fused)
    x = torch.randn(4, 8, 12, 10).contiguous(memory_format=torch.channels_last)
    y, y_plain = fused(x), _plain_modules(plain, x)
    assert _pointwise_node(y) == FUSED
    torch.testing.assert_close(y, y_plain, rtol=1e-4, atol=1e-5)
    assert_same_backward(fused, plain, y, y_plain, rtol=1e-3, atol=1e-4)


def test_another_channel_count_is_named_before_the_fused_op() -> None:
    """It used to fail in the fused op with "Given groups=6, expected weight to be at least 6"."""
    m = _layer((3, 5, 7), 1)
    x = torch.randn(2, 6, 8, 8, **F64, requires_grad=True)
    with pytest.raises(ValueError, match=r"MulticeptionConv2d has in_channels=4, got an input with 6 channels"):
        m(x)


def test_branches_norm_pointwise_checks_its_input() -> None:
    m = _layer((3, 5), 1)
    with pytest.raises(ValueError, match=r"in_channels=4, got shape \(2, 6, 8, 8\)"):
        branches_norm_pointwise(torch.randn(2, 6, 8, 8, **F64), m.branches, m.bn_in, m.pointwise)
    with pytest.raises(ValueError, match=r"x \(B, C, H, W\).*got shape \(4, 8, 8\)"):
        branches_norm_pointwise(torch.randn(4, 8, 8, **F64), m.branches, m.bn_in, m.pointwise)


def test_unbatched_input_takes_the_fused_op_as_a_batch_of_one() -> None:
    fused = _layer((3, 5), 1)
    plain = copy.deepcopy(fused)
    x = torch.randn(4, 7, 6, **F64, requires_grad=True)
    y = fused(x)
    assert y.shape == (6, 7, 6)
    torch.testing.assert_close(y, _plain_modules(plain, x[None])[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("kernels", "stride"), [((3, 5, 7), 1), ((3, 5), 2)])
def test_a_gradient_penalty_differentiates_the_fused_op_like_the_modules(kernels, stride) -> None:
    """create_graph through the fused op (its backward then runs autograd on the plain forward)."""
    fused = _layer(kernels, stride)
    plain = copy.deepcopy(fused)
    x = torch.randn(3, 4, 9, 10, **F64, requires_grad=True)
    grads = []
    for module, forward in ((fused, fused.__call__), (plain, lambda x: _plain_modules(plain, x))):
        y = forward(x)
        if module is fused:
            assert _pointwise_node(y) == FUSED
        (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        grad_x.square().sum().backward()  # the penalty's gradient reaches every parameter through grad_x
        grads.append({name: p.grad for name, p in module.named_parameters()})
    for name, expected in grads[1].items():
        torch.testing.assert_close(grads[0][name], expected, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize(
    "trainable",
    [{"pointwise.bias"}, {"x", "pointwise.bias"}, {"pointwise.weight"}, {"x", "bn_in.weight", "branches.1.weight"},
     {"x"}],
    ids=["bias-only", "input-and-bias", "pointwise-weight", "input-bn-and-one-branch", "input-only"],
)  # fmt: skip
def test_a_gradient_penalty_with_frozen_parts_matches_the_modules(trainable) -> None:
    """Each subset of the fused op's inputs needing a gradient, under create_graph."""
    fused = _layer((3, 5, 7), 1)
    plain = copy.deepcopy(fused)
    x = torch.randn(3, 4, 9, 10, **F64, requires_grad="x" in trainable)
    results = []
    for module, forward in ((fused, fused.__call__), (plain, lambda x: _plain_modules(plain, x))):
        for name, parameter in module.named_parameters():
            parameter.requires_grad_(name in trainable)
        y = forward(x)
        if module is fused:
            assert _pointwise_node(y) == FUSED
        parameters = [p for name, p in module.named_parameters() if name in trainable]
        targets = [x, *parameters] if "x" in trainable else parameters
        grads = torch.autograd.grad(y.square().sum(), targets, create_graph=True)
        penalty = sum(g.square().sum() for g in grads if g.requires_grad)
        second = torch.autograd.grad(penalty, targets, allow_unused=True) if torch.is_tensor(penalty) else ()
        results.append((grads, second))
    for got, expected in zip(results[0], results[1], strict=True):
        for a, b in zip(got, expected, strict=True):
            if b is None:
                assert a is None or not a.abs().any()
            else:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
