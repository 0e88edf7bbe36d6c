"""Every operator, in training and deployed form, under torch.func transforms and forward-mode AD.

The fast paths (custom autograd Functions, native kernels, channels-last relayouts) step aside there
(``conv_spec.transform_active``): their results must equal plain autograd, finite differences and a loop.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

import convzoo
from convzoo.ops.cac_sparse import CACSparseConv2d
from convzoo.ops.conv_spec import relayout
from convzoo.ops.multiception import MulticeptionConv2d

KINDS = convzoo.list_convs()
DTYPES = [torch.float32, torch.float64]  # the native kernels run in float32 only
TOLERANCE = {torch.float32: 2e-3, torch.float64: 1e-7}


SOURCE_CONVS = {  # (kernel, padding, groups) of a conv each kind replaces; every other kind takes a dense 3x3
    "cpwc": (1, 0, 1),
    "pyramid": (3, 1, 32),
}


def _converted(kind: str, dtype: torch.dtype, deployed: bool) -> nn.Module:
    torch.manual_seed(0)
    kernel, padding, groups = SOURCE_CONVS.get(kind, (3, 1, 1))
    source = nn.Sequential(nn.Conv2d(32, 32, kernel, padding=padding, groups=groups, dtype=dtype))
    model = convzoo.convert(source, kind)
    assert type(model[0]) is not nn.Conv2d, f"{kind} replaced nothing"
    if kind == "cac":  # a mask that depends on the input (mixed sharp and smooth): deploys to the sparse form
        with torch.no_grad():
            model[0].gamma.fill_(-1.0)
            model[0].beta.fill_(1.0)
    for module in model.modules():  # random BN statistics, so that deploying folds something
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return convzoo.deploy(model.eval()) if deployed else model.train()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_grad_equals_autograd(kind, dtype) -> None:
    model = _converted(kind, dtype, deployed=False)
    torch.func.replace_all_batch_norm_modules_(model)  # BN's running-stat updates are not functional
    x = torch.randn(2, 32, 9, 9, dtype=dtype)
    params = {name: p.detach() for name, p in model.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).square().sum())(params)
    model(x).square().sum().backward()
    tol = TOLERANCE[dtype]
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("deployed", [False, True], ids=["training", "deployed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_ad_and_vmap_equal_reverse_mode_finite_differences_and_a_loop(kind, dtype, deployed) -> None:
    model = _converted(kind, dtype, deployed).eval()
    generator = torch.Generator().manual_seed(1)
    x, tangent, cotangent = (torch.randn(2, 32, 9, 9, dtype=dtype, generator=generator) for _ in range(3))
    with forward_ad.dual_level():
        jvp = forward_ad.unpack_dual(model(forward_ad.make_dual(x, tangent))).tangent
    # <u, J t> = <J^T u, t>, with J^T u from reverse mode (the fast paths' own backward where they have one)
    x_tracked = x.clone().requires_grad_()
    (vjp,) = torch.autograd.grad(model(x_tracked), x_tracked, cotangent)
    tol = TOLERANCE[dtype] * 10
    torch.testing.assert_close((cotangent * jvp).sum(), (vjp * tangent).sum(), rtol=tol, atol=tol)
    if kind != "cac":  # CAC's mask is piecewise constant in x: differences across its flips are not derivatives
        eps = 1e-2 if dtype == torch.float32 else 1e-6
        with torch.no_grad():  # eval mode: the layer is affine in x, so central differences are exact up to rounding
            expected = (model(x + eps * tangent) - model(x - eps * tangent)) / (2 * eps)
        torch.testing.assert_close(jvp, expected, rtol=tol, atol=tol)
    inputs = torch.randn(3, 2, 32, 9, 9, dtype=dtype, generator=generator)
    params = {name: p.detach() for name, p in model.named_parameters()}
    with torch.no_grad():
        batched = torch.func.vmap(lambda xi: torch.func.functional_call(model, params, (xi,)))(inputs)
        looped = torch.stack([model(xi) for xi in inputs])
    torch.testing.assert_close(batched, looped, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_the_fast_paths_still_run_outside_transforms(monkeypatch) -> None:
    """The guard is off in plain eager code: a training-form Multiception step takes its channels-last path."""
    from convzoo.ops import conv_spec

    calls = []
    original = conv_spec._Relayout.apply
    monkeypatch.setattr(conv_spec._Relayout, "apply", lambda *a: calls.append(1) or original(*a))
    model = copy.deepcopy(_converted("multiception", torch.float32, deployed=False))
    model(torch.randn(2, 32, 9, 9, requires_grad=True)).sum().backward()
    assert calls  # and under a transform, where x requires grad just the same, it is skipped:
    calls.clear()
    torch.func.grad(lambda x: model.eval()(x).sum())(torch.randn(2, 32, 9, 9))
    assert not calls


def test_the_cac_test_layer_has_a_data_dependent_mask() -> None:
    model = _converted("cac", torch.float32, deployed=False)
    rho = float(model[0].sharp_mask(torch.randn(2, 32, 9, 9)).float().mean())
    assert 0.05 < rho < 0.95
    assert isinstance(_converted("cac", torch.float32, deployed=True)[0], CACSparseConv2d)


def test_forward_mode_gives_cac_its_straight_through_gradient() -> None:
    """jacfwd of γ and β equals their reverse-mode (straight-through) gradient, which is not zero."""
    model = _converted("cac", torch.float64, deployed=False)
    x = torch.randn(2, 32, 9, 9, dtype=torch.float64)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(scalars: torch.Tensor) -> torch.Tensor:
        state = {**params, "0.gamma": scalars[0], "0.beta": scalars[1]}
        return torch.func.functional_call(model, state, (x,)).sum()

    scalars = torch.stack([params["0.gamma"], params["0.beta"]])
    reverse, forward = torch.func.grad(loss)(scalars), torch.func.jacfwd(loss)(scalars)
    assert reverse.abs().min() > 0
    torch.testing.assert_close(forward, reverse, rtol=1e-9, atol=1e-9)


def test_a_cac_layer_used_under_transforms_can_still_be_copied() -> None:
    """CAC records per-call statistics (mask, counts): none may hold a functorch wrapper afterwards."""
    for deployed in (False, True):
        model = _converted("cac", torch.float32, deployed)
        torch.func.vmap(model.eval())(torch.randn(3, 2, 32, 9, 9))
        torch.func.grad(lambda x, m=model: m(x).sum())(torch.randn(2, 32, 9, 9))
        copy.deepcopy(model)  # no functorch wrapper left behind in the layer's recorded statistics


@pytest.mark.parametrize("algorithm", ["auto", "branch", "accumulate", "native", "dense"])
def test_a_fresh_deployed_multiception_batches_under_vmap(algorithm) -> None:
    torch.manual_seed(0)
    fused = MulticeptionConv2d(16, 16, kernels=(3, 5, 7)).eval().fuse()
    fused.algorithm = algorithm
    inputs = torch.randn(3, 2, 16, 8, 8)
    batched = torch.func.vmap(fused)(inputs)  # the first call: nothing chosen or cached yet
    torch.testing.assert_close(batched, torch.stack([fused(x) for x in inputs]), rtol=1e-4, atol=1e-4)


def test_relayout_is_a_no_op_under_transforms() -> None:
    inputs = torch.randn(3, 2, 4, 5, 5)
    batched = torch.func.vmap(lambda x: relayout(x, torch.channels_last) * 2)(inputs)
    torch.testing.assert_close(batched, inputs * 2)
