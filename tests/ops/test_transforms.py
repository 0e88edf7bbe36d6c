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
def test_forward_ad_and_vmap_equal_finite_differences_and_a_loop(kind, dtype, deployed) -> None:
    model = _converted(kind, dtype, deployed).eval()
    generator = torch.Generator().manual_seed(1)
    x, tangent = (torch.randn(2, 32, 9, 9, dtype=dtype, generator=generator) for _ in range(2))
    with forward_ad.dual_level():
        jvp = forward_ad.unpack_dual(model(forward_ad.make_dual(x, tangent))).tangent
    eps = 1e-2 if dtype == torch.float32 else 1e-6
    with torch.no_grad():  # eval mode: the layer is affine in x, so central differences are exact up to rounding
        expected = (model(x + eps * tangent) - model(x - eps * tangent)) / (2 * eps)
    tol = TOLERANCE[dtype] * 10
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
