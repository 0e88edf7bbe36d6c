"""DO-Conv's native kernel composition (csrc/doconv_compose.cpp) against float64 references."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import convzoo.ops.doconv as doconv_module
from convzoo.native import native_disabled, native_ops
from convzoo.ops.doconv import DOConv2d, compose_kernel, native_compose_applies

pytestmark = pytest.mark.skipif(
    native_disabled() or (shutil.which("c++") is None and shutil.which("g++") is None),
    reason="native kernels switched off (CONVZOO_NATIVE=0) or no C++ compiler",
)
F32 = {"rtol": 1e-5, "atol": 1e-5}
SHAPES = [(16, 16), (16, 48), (64, 32), (48, 128)]  # (C_in, C_out)


def _reference(W: torch.Tensor, D: torch.Tensor) -> torch.Tensor:  # noqa: N803
    """W'[o, i, s] = sum_d D[i, s, d] W[i, d, o], in float64."""
    return torch.einsum("isd,ido->ois", D.double(), W.double())


def _operands(c_in: int, c_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(c_in, 9, c_out, generator=generator)
    D = torch.eye(9) + 0.3 * torch.randn(c_in, 9, 9, generator=generator)
    grad = torch.randn(c_out, c_in, 9, generator=generator)
    return W, D, grad


@pytest.fixture
def calls(monkeypatch) -> SimpleNamespace:
    """Counts the native composition calls made through convzoo.ops.doconv (the module's backward runs in C++)."""
    counts = SimpleNamespace(forward=0, backward=0)
    ops = native_ops()
    assert ops is not None  # a C++ compiler is here, so a failed build is a bug, not a skip

    def forward(*args):
        counts.forward += 1
        return ops.doconv_compose(*args)

    def backward(*args):
        counts.backward += 1
        return ops.doconv_compose_backward(*args)

    def weight(*args):  # DOConv2d.weight's op: its backward runs in C++ (see the doconv_weight tests below)
        counts.forward += 1
        return ops.doconv_weight(*args)

    spy = SimpleNamespace(doconv_compose=forward, doconv_compose_backward=backward, doconv_weight=weight)
    monkeypatch.setattr(doconv_module, "native_ops", lambda: spy)
    return counts


@pytest.mark.parametrize(("c_in", "c_out"), SHAPES)
def test_the_composition_kernel_equals_the_float64_composition(c_in, c_out) -> None:
    W, D, _ = _operands(c_in, c_out)
    out = native_ops().doconv_compose(W, D)
    assert out.shape == (c_out, c_in, 9) and out.is_contiguous()
    torch.testing.assert_close(out.double(), _reference(W, D), **F32)


@pytest.mark.parametrize(("c_in", "c_out"), SHAPES)
def test_the_backward_kernel_equals_float64_autograd(c_in, c_out) -> None:
    W, D, grad = _operands(c_in, c_out)
    grad_w, grad_d = native_ops().doconv_compose_backward(grad, W, D, True, True)
    W64, D64 = W.double().requires_grad_(), D.double().requires_grad_()
    _reference(W64, D64).backward(grad.double())
    torch.testing.assert_close(grad_w.double(), W64.grad, **F32)
    # D's gradient sums C_out products per entry: float32 accumulation error grows with C_out
    torch.testing.assert_close(grad_d.double(), D64.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("need_w", "need_d"), [(True, False), (False, True), (False, False)])
def test_the_backward_kernel_skips_the_gradients_not_needed(need_w, need_d) -> None:
    W, D, grad = _operands(32, 16)
    full_w, full_d = native_ops().doconv_compose_backward(grad, W, D, True, True)
    grad_w, grad_d = native_ops().doconv_compose_backward(grad, W, D, need_w, need_d)
    assert grad_w.shape == ((32, 9, 16) if need_w else (0, 9, 16))
    assert grad_d.shape == ((32, 9, 9) if need_d else (0, 9, 9))
    if need_w:
        torch.testing.assert_close(grad_w, full_w, rtol=0, atol=0)
    if need_d:
        torch.testing.assert_close(grad_d, full_d, rtol=0, atol=0)


def test_the_kernels_read_non_contiguous_operands() -> None:
    W, D, grad = _operands(32, 48)
    W_t = W.transpose(0, 2).contiguous().transpose(0, 2)
    grad_t = grad.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    assert not W_t.is_contiguous() and not grad_t.is_contiguous()
    ops = native_ops()
    torch.testing.assert_close(ops.doconv_compose(W_t, D), ops.doconv_compose(W, D), rtol=0, atol=0)
    for a, b in zip(
        ops.doconv_compose_backward(grad_t, W_t, D, True, True),
        ops.doconv_compose_backward(grad, W, D, True, True),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_kernels_give_the_same_bits_on_any_number_of_threads() -> None:
    W, D, grad = _operands(64, 32)
    ops = native_ops()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (ops.doconv_compose(W, D), *ops.doconv_compose_backward(grad, W, D, True, True))
        torch.set_num_threads(2)
        two = (ops.doconv_compose(W, D), *ops.doconv_compose_backward(grad, W, D, True, True))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # each input channel is one task's, whole


@pytest.mark.parametrize(
    ("W_shape", "D_shape", "grad_shape", "message"),
    [
        ((16, 9, 20), (16, 9, 9), None, "multiples of 16"),
        ((16, 8, 16), (16, 9, 9), None, "3x3"),
        ((16, 9, 16), (32, 9, 9), None, "C_in, 9, C_out"),
        ((16, 9, 16), (16, 9, 9), (16, 16, 8), "grad must be"),
    ],
)
def test_the_kernels_reject_bad_operands(W_shape, D_shape, grad_shape, message) -> None:  # noqa: N803
    ops = native_ops()
    W, D = torch.randn(W_shape), torch.randn(D_shape)
    with pytest.raises(RuntimeError, match=message):
        if grad_shape is None:
            ops.doconv_compose(W, D)
        else:
            ops.doconv_compose_backward(torch.randn(grad_shape), W, D, True, True)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        ops.doconv_compose(torch.randn(16, 9, 16, dtype=torch.float64), torch.randn(16, 9, 9))


def _module_pair(c_in: int, c_out: int, kernel_size, **kwargs) -> tuple[DOConv2d, DOConv2d]:
    """A float32 DOConv2d with random W, D' and bias, and its float64 copy."""
    torch.manual_seed(0)
    module = DOConv2d(c_in, c_out, kernel_size, **kwargs)
    with torch.no_grad():
        module.d_delta.normal_(0, 0.3)
    reference = DOConv2d(c_in, c_out, kernel_size, dtype=torch.float64, **kwargs)
    reference.load_state_dict(module.state_dict())
    return module, reference


@pytest.mark.parametrize(
    ("c_in", "c_out", "kernel_size", "kwargs"),
    [
        (16, 32, 3, {"padding": 1}),
        (32, 16, 3, {"stride": 2, "dilation": 2, "padding": 2, "padding_mode": "reflect"}),
        (16, 16, (1, 9), {"padding": (0, 4)}),  # any kernel of area 9
        (48, 16, (9, 1), {"stride": (2, 1), "bias": False}),
    ],
)
def test_a_training_step_runs_the_native_kernels_and_matches_float64(calls, c_in, c_out, kernel_size, kwargs) -> None:
    module, reference = _module_pair(c_in, c_out, kernel_size, **kwargs)
    x = torch.randn(2, c_in, 11, 13)
    module(x).square().sum().backward()
    reference(x.double()).square().sum().backward()
    assert calls.forward == 1  # doconv_weight, whose backward is the native kernel (test_the_weight_op_...)
    for name, parameter in module.named_parameters():
        expected = dict(reference.named_parameters())[name].grad
        torch.testing.assert_close(parameter.grad.double(), expected, rtol=1e-4, atol=1e-4, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(module(x).double(), reference(x.double()), rtol=1e-4, atol=1e-4)


def test_a_frozen_W_gets_no_gradient_and_D_gets_the_right_one(calls) -> None:  # noqa: N802
    module, reference = _module_pair(16, 16, 3, padding=1)
    module.W.requires_grad_(False)
    reference.W.requires_grad_(False)
    x = torch.randn(2, 16, 7, 7)
    module(x).sum().backward()
    reference(x.double()).sum().backward()
    assert calls.forward == 1 and module.W.grad is None
    torch.testing.assert_close(module.d_delta.grad.double(), reference.d_delta.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("c_in", "c_out", "kernel_size", "kwargs", "dtype"),
    [
        (16, 16, 3, {"groups": 2}, torch.float32),  # DO-GConv
        (16, 16, 3, {"d_mul": 10}, torch.float32),
        (16, 16, 5, {}, torch.float32),
        (8, 16, 3, {}, torch.float32),  # C_in not a multiple of 16
        (16, 24, 3, {}, torch.float32),  # C_out not a multiple of 16
        (16, 16, 3, {}, torch.float64),
    ],
)
def test_other_layers_compose_with_torch(calls, c_in, c_out, kernel_size, kwargs, dtype) -> None:
    module = DOConv2d(c_in, c_out, kernel_size, dtype=dtype, **kwargs)
    module(torch.randn(1, c_in, 6, 6, dtype=dtype)).sum().backward()
    assert (calls.forward, calls.backward) == (0, 0)
    assert not native_compose_applies(module.W.detach(), module.D.detach(), module.groups)


def test_double_backward_composes_with_torch(calls) -> None:
    module, reference = _module_pair(16, 16, 3)
    grads = []
    for m in (module, reference):
        (grad_w,) = torch.autograd.grad(compose_kernel(m.W, m.D, 1).square().sum(), m.W, create_graph=True)
        grads.append(grad_w)
    assert calls.backward == 0  # create_graph: the native kernels have no derivative, so torch ran this one
    for grad_w in grads:
        grad_w.square().sum().backward()  # its second derivative reaches D' through the composition
    assert calls.backward == 1  # ... whose own (first-order) backward may be native again
    torch.testing.assert_close(module.d_delta.grad.double(), reference.d_delta.grad, rtol=1e-4, atol=1e-4)


def test_torch_compile_traces_the_torch_composition(calls) -> None:
    module, _ = _module_pair(16, 16, 3, padding=1)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)  # fullgraph: no break at the kernel
    x = torch.randn(2, 16, 5, 5)
    out = compiled(x)
    out.sum().backward()
    assert (calls.forward, calls.backward) == (0, 0)
    with torch.no_grad():
        torch.testing.assert_close(out, module(x), **F32)


def test_the_tracing_check_gates_the_kernels(calls, monkeypatch) -> None:
    monkeypatch.setattr(doconv_module, "is_tracing", lambda: True)
    DOConv2d(16, 16, 3)(torch.randn(1, 16, 5, 5)).sum().backward()
    assert (calls.forward, calls.backward) == (0, 0)


def test_autocast_composes_natively_in_float32(calls) -> None:
    module, reference = _module_pair(16, 16, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        composed = compose_kernel(module.W, module.D, 1)  # the composition runs with autocast off
    assert calls.forward == 1 and composed.dtype == torch.float32
    torch.testing.assert_close(composed.double(), compose_kernel(reference.W, reference.D, 1), **F32)


def test_fuse_folds_with_the_native_composition(calls) -> None:
    module, reference = _module_pair(32, 16, 3, padding=1)
    conv = module.fuse()
    assert isinstance(conv, nn.Conv2d) and calls.forward == 1
    torch.testing.assert_close(conv.weight.double(), reference.fuse().weight, rtol=1e-5, atol=1e-6)


def test_backward_inside_autocast_runs_in_float32(calls) -> None:
    module, reference = _module_pair(16, 16, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        composed = compose_kernel(module.W, module.D, 1)
        composed.square().sum().backward()  # backward() called inside the region: autocast is on there too
    compose_kernel(reference.W, reference.D, 1).square().sum().backward()
    assert calls.backward == 1
    torch.testing.assert_close(module.W.grad.double(), reference.W.grad, **F32)
    torch.testing.assert_close(module.d_delta.grad.double(), reference.d_delta.grad, rtol=1e-5, atol=1e-4)


def test_fake_tensors_and_flop_counting_see_the_torch_composition(calls) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    module = DOConv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 5, 5)
    with FlopCounterMode(display=False) as counter:
        module(x).sum().backward()
    assert counter.get_total_flops() > 0
    mode = FakeTensorMode()
    fake_W, fake_D = mode.from_tensor(module.W.detach()), mode.from_tensor(module.D.detach())
    assert compose_kernel(fake_W, fake_D, 1).shape == (16, 16, 9)  # fake tensors used outside their mode
    with mode:
        assert compose_kernel(fake_W, fake_D, 1).shape == (16, 16, 9)
    assert (calls.forward, calls.backward) == (0, 0)


@pytest.mark.parametrize(("c_in", "c_out"), SHAPES[:2])
def test_adding_the_identity_in_the_kernels_equals_an_explicit_D(c_in, c_out) -> None:  # noqa: N802
    W, D, grad = _operands(c_in, c_out)
    d_delta = D - torch.eye(9)
    explicit = d_delta + torch.eye(9)  # the float32 sum DOConv2d.D forms
    ops = native_ops()
    assert torch.equal(ops.doconv_compose(W, d_delta, True), ops.doconv_compose(W, explicit))
    for got, expected in zip(
        ops.doconv_compose_backward(grad, W, d_delta, True, True, True),
        ops.doconv_compose_backward(grad, W, explicit, True, True),
        strict=True,
    ):
        assert torch.equal(got, expected)


@pytest.mark.parametrize(("c_in", "c_out", "kernel_size"), [(16, 32, 3), (32, 16, (1, 9))])
def test_the_module_composes_straight_from_d_delta(calls, c_in, c_out, kernel_size) -> None:
    """DOConv2d.weight passes D' to the kernels (no D = D' + I op) and gets the bits of compose_kernel(W, D)."""
    module, _ = _module_pair(c_in, c_out, kernel_size)
    seen = []
    spy_forward = doconv_module.native_ops().doconv_weight
    doconv_module.native_ops().doconv_weight = lambda *args: seen.append(args) or spy_forward(*args)
    weight = module.weight
    assert len(seen) == 1 and seen[0][0] is module.W and seen[0][1] is module.d_delta
    assert weight.shape == (c_out, c_in, *module.kernel_size)
    explicit = compose_kernel(module.W, module.D, 1)
    assert torch.equal(weight.detach(), explicit.detach().view_as(weight))
    grad = torch.randn_like(weight)
    weight.backward(grad)
    grads = module.W.grad, module.d_delta.grad
    module.W.grad = module.d_delta.grad = None
    explicit.backward(grad.view_as(explicit))
    assert torch.equal(grads[0], module.W.grad) and torch.equal(grads[1], module.d_delta.grad)


def test_module_double_backward_takes_the_torch_form(calls) -> None:
    module, reference = _module_pair(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 5, 5)
    for m, inputs in ((module, x), (reference, x.double())):
        (grad_w,) = torch.autograd.grad(m(inputs).square().sum(), m.W, create_graph=True)
        grad_w.square().sum().backward()  # reaches D' only through the first backward's composition
    assert calls.forward == 1  # the float32 module's forward was native; its create_graph backward was not
    # second-order gradients of a squared loss in float32: a few elements round at ~3e-4 relative
    torch.testing.assert_close(module.d_delta.grad.double(), reference.d_delta.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(module.W.grad.double(), reference.W.grad, rtol=1e-3, atol=1e-3)


def test_forward_ad_and_torch_func_see_the_torch_composition(calls) -> None:
    from torch.autograd import forward_ad

    module, reference = _module_pair(16, 16, 3, padding=1)
    x, tangent = torch.randn(2, 16, 5, 5), torch.randn(2, 16, 5, 5)
    with forward_ad.dual_level():
        out = forward_ad.unpack_dual(module(forward_ad.make_dual(x, tangent))).tangent
    with forward_ad.dual_level():
        expected = forward_ad.unpack_dual(reference(forward_ad.make_dual(x.double(), tangent.double()))).tangent
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    params = {"W": module.W.detach(), "d_delta": module.d_delta.detach(), "bias": module.bias.detach()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(module, p, (x,)).square().sum())(params)
    reference(x.double()).square().sum().backward()
    torch.testing.assert_close(grads["d_delta"].double(), reference.d_delta.grad, rtol=1e-4, atol=1e-4)
    assert (calls.forward, calls.backward) == (0, 0)


def test_the_module_gate_wants_plain_float32_cpu_operands() -> None:
    from torch.testing._internal.two_tensor import TwoTensor

    W, D, _ = _operands(16, 16)
    assert doconv_module.native_weight_ready(nn.Parameter(W), D)
    assert not doconv_module.native_weight_ready(W.double(), D)
    assert not doconv_module.native_weight_ready(TwoTensor(W, W.clone()), D)
    assert not doconv_module.native_weight_ready(W, nn.Parameter(TwoTensor(D, D.clone())))


def test_the_module_weight_can_be_edited_in_place_and_shapes_are_read_on_every_call(calls) -> None:
    module = DOConv2d(16, 16, 3, padding=1)
    module.weight.mul_(2)  # the op's own output (allocated 4-D by the kernel), not a view made around it
    assert calls.forward == 1
    # channels pruned after construction: judged by the parameters it now holds, so it composes with torch
    module.W = nn.Parameter(module.W.detach()[:12].clone())
    module.d_delta = nn.Parameter(module.d_delta.detach()[:12].clone())
    module.spec = module.spec.__class__.create(12, 16, 3, 1, 1, 1, 1, True, "zeros")
    assert module(torch.randn(1, 12, 5, 5)).shape == (1, 16, 5, 5) and calls.forward == 1


def test_the_kernel_writes_the_conv_shape_and_its_backward_reads_it() -> None:
    W, D, grad = _operands(16, 32)
    ops = native_ops()
    flat = ops.doconv_compose(W, D)
    for kernel_size in ([3, 3], [1, 9]):
        shaped = ops.doconv_compose(W, D, False, kernel_size)
        assert shaped.shape == (32, 16, *kernel_size) and shaped.is_contiguous()
        assert torch.equal(shaped.reshape(flat.shape), flat)
        for got, expected in zip(
            ops.doconv_compose_backward(grad.reshape(32, 16, *kernel_size), W, D, True, True),
            ops.doconv_compose_backward(grad, W, D, True, True),
            strict=True,
        ):
            assert torch.equal(got, expected)
    with pytest.raises(RuntimeError, match="kernel_size must be empty or a pair"):
        ops.doconv_compose(W, D, False, [2, 5])
    with pytest.raises(RuntimeError, match="grad must be a float32 CPU tensor"):
        ops.doconv_compose_backward(torch.randn(32, 16, 3, 4), W, D, True, True)  # M*N = 12


def _weight_operands(need_w: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    W, D, grad = _operands(32, 48, seed=5)
    W.requires_grad_(need_w)
    d_delta = (D - torch.eye(9)).requires_grad_()
    return W, d_delta, grad.view(48, 32, 3, 3)


@pytest.mark.parametrize("need_w", [True, False])
def test_the_weight_op_runs_the_native_kernels_both_ways(need_w) -> None:
    """doconv_weight's C++ autograd: forward and backward are the native kernels, bit for bit."""
    from convzoo.ops.doconv import _torch_compose_backward

    ops = native_ops()
    W, d_delta, grad = _weight_operands(need_w)
    weight = ops.doconv_weight(W, d_delta, [3, 3])
    assert weight.shape == (48, 32, 3, 3) and weight.grad_fn is not None
    assert torch.equal(weight.detach(), ops.doconv_compose(W.detach(), d_delta.detach(), True, [3, 3]))
    weight.backward(grad)
    expected_w, expected_d = ops.doconv_compose_backward(grad, W.detach(), d_delta.detach(), need_w, True, True)
    assert torch.equal(d_delta.grad, expected_d)
    assert torch.equal(W.grad, expected_w) if need_w else W.grad is None
    # the torch form rounds differently, so the bit-for-bit checks above tell the two apart
    D = d_delta.detach() + torch.eye(9)
    torch_d = _torch_compose_backward(grad.view(48, 32, 9), W.detach(), D, 1, False, True)[1]
    assert not torch.equal(torch_d, expected_d)
    torch.testing.assert_close(torch_d, expected_d, **F32)
    with torch.inference_mode():  # below autograd: the plain CPU kernel
        assert torch.equal(ops.doconv_weight(W, d_delta, [3, 3]), weight.detach())


def test_the_weight_op_double_backward_and_dispatch_modes_take_the_torch_form() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    ops = native_ops()
    W, d_delta, grad = _weight_operands()
    reference_w = W.detach().double().requires_grad_()
    reference_d = d_delta.detach().double().requires_grad_()
    reference = torch.einsum("isd,ido->ois", reference_d + torch.eye(9, dtype=torch.float64), reference_w)
    grads = torch.autograd.grad(ops.doconv_weight(W, d_delta, [3, 3]), (W, d_delta), grad, create_graph=True)
    expected = torch.autograd.grad(reference.reshape(grad.shape), (reference_w, reference_d), grad.double(),
                                   create_graph=True)  # fmt: skip
    assert all(g.grad_fn is not None for g in grads)  # differentiable: the torch form ran
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    sum(g.square().sum() for g in grads).backward()  # second order: reaches W and D' through the first backward
    sum(g.square().sum() for g in expected).backward()
    torch.testing.assert_close(W.grad.double(), reference_w.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(d_delta.grad.double(), reference_d.grad, rtol=1e-3, atol=1e-3)
    W.grad = d_delta.grad = None
    weight = ops.doconv_weight(W, d_delta, [3, 3])
    with FlopCounterMode(display=False) as counter:  # a dispatch mode around the backward sees torch ops
        weight.backward(grad)
    assert counter.get_total_flops() > 0
    native = ops.doconv_compose_backward(grad, W.detach(), d_delta.detach(), True, True, True)
    torch.testing.assert_close(W.grad, native[0], **F32)
    torch.testing.assert_close(d_delta.grad, native[1], **F32)


def test_the_weight_op_rejects_other_shapes() -> None:
    with pytest.raises(RuntimeError, match="only 3x3 kernels with d_mul = 9"):
        native_ops().doconv_weight(torch.randn(16, 25, 16), torch.randn(16, 25, 25), [5, 5])
    with pytest.raises(RuntimeError, match="C_in and C_out must be multiples of 16"):
        native_ops().doconv_weight(torch.randn(16, 9, 24), torch.randn(16, 9, 9), [3, 3])


def test_the_weight_op_backward_takes_batched_gradients() -> None:
    """vmap's batched gradients (autograd.grad(is_grads_batched=True), jacobian(vectorize=True)) are wrappers
    without storage: the torch form computes them, one per example."""
    ops = native_ops()
    W, d_delta, grad = _weight_operands()
    batch = torch.stack([grad, -2 * grad, torch.randn_like(grad)])
    weight = ops.doconv_weight(W, d_delta, [3, 3])
    grads = torch.autograd.grad(weight, (W, d_delta), batch, is_grads_batched=True)
    assert grads[0].shape == (3, *W.shape) and grads[1].shape == (3, *d_delta.shape)
    for example, g in enumerate(batch):
        native = ops.doconv_compose_backward(g, W.detach(), d_delta.detach(), True, True, True)
        torch.testing.assert_close(grads[0][example], native[0], **F32)
        torch.testing.assert_close(grads[1][example], native[1], **F32)


def test_the_weight_op_torch_form_runs_with_autocast_off() -> None:
    """A create_graph backward called inside an autocast region: the torch form's bmm stays in float32."""
    ops = native_ops()
    W, d_delta, grad = _weight_operands()
    native = ops.doconv_compose_backward(grad, W.detach(), d_delta.detach(), True, True, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = torch.autograd.grad(ops.doconv_weight(W, d_delta, [3, 3]), (W, d_delta), grad, create_graph=True)
    for got, want in zip(grads, native, strict=True):
        assert got.dtype == torch.float32 and got.grad_fn is not None
        torch.testing.assert_close(got, want, **F32)  # bfloat16 products would miss by about 1e-2


def test_the_weight_op_has_shapes_for_meta_and_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = native_ops()
    W, d_delta, _ = _weight_operands()
    assert ops.doconv_weight(W.detach().to("meta"), d_delta.detach().to("meta"), [3, 3]).shape == (48, 32, 3, 3)
    assert ops.doconv_weight(W.detach().to("meta"), d_delta.detach().to("meta"), []).shape == (48, 32, 9)
    with FakeTensorMode() as mode:
        fake = ops.doconv_weight(mode.from_tensor(W), mode.from_tensor(d_delta), [1, 9])
    assert fake.shape == (48, 32, 1, 9) and fake.device.type == "cpu"
    with pytest.raises(RuntimeError, match="d_delta must be"):
        ops.doconv_weight(W.detach().to("meta"), torch.empty(32, 9, 8, device="meta"), [3, 3])
