"""convzoo.native: building, switching off, and falling back when the build fails."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from convzoo import native
from convzoo.ops.multiception import FusedMulticeptionConv2d


@pytest.fixture
def fresh_state(monkeypatch):
    """A process state in which the build has not been tried yet."""
    monkeypatch.setattr(native, "_state", SimpleNamespace(ops=None, tried=False, error=None))


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_the_environment_switches_the_native_kernels_off(monkeypatch, fresh_state, value) -> None:
    monkeypatch.setenv(native.ENV_VAR, value)
    monkeypatch.setattr(native, "_build", lambda: pytest.fail("must not build when switched off"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.native_ops() is None
    assert native.native_error() is None


def test_a_failed_build_warns_once_and_the_layer_falls_back(monkeypatch, fresh_state) -> None:
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    calls = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(native, "_build", broken)
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable.*no compiler here"):
        assert native.native_ops() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.native_ops() is None  # tried once per process: no second build, no second warning
    assert calls == [1] and "no compiler here" in str(native.native_error())
    fused = FusedMulticeptionConv2d(16, 16, kernels=(3, 5), algorithm="native").eval().requires_grad_(False)
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        y = fused(x)
    assert fused.last_algorithm == "canonical"
    torch.testing.assert_close(y, fused.pointwise(fused.depthwise(x)))


def test_build_flags_name_the_capability_and_change_with_the_source(monkeypatch, tmp_path) -> None:
    name, flags = native.build_flags()
    assert name.startswith(f"convzoo_native_{torch.backends.cpu.get_cpu_capability().lower()}_")
    assert "-O3" in flags and "-fopenmp" in flags and "-march=native" not in flags
    edited = tmp_path / "kernel.cpp"
    edited.write_text(native.SOURCES[0].read_text() + "\n// edited\n")
    monkeypatch.setattr(native, "SOURCES", (edited,))
    assert native.build_flags()[0] != name  # an edited source gets a new build folder


def test_other_platforms_do_not_build(monkeypatch) -> None:
    monkeypatch.setattr(native.sys, "platform", "darwin")
    with pytest.raises(RuntimeError, match="Linux only"):
        native._build()


def test_operands_must_be_plain_float32_cpu_tensors(monkeypatch) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.two_tensor import TwoTensor

    monkeypatch.setattr(native, "native_ops", lambda: SimpleNamespace())  # as if built: only the operands decide
    x = torch.randn(2, 3)
    assert native.native_operands_ready(x, None, torch.nn.Parameter(torch.randn(3), requires_grad=False))
    assert not native.native_operands_ready(x, x.double())
    assert not native.native_operands_ready(x, torch.randn(3, requires_grad=True))
    assert not native.native_operands_ready(FakeTensorMode().from_tensor(x))  # a fake tensor outside its mode
    assert not native.native_operands_ready(TwoTensor(x, x.clone()))  # a Python tensor subclass
    with torch.no_grad():
        assert native.native_operands_ready(x, torch.randn(3, requires_grad=True))
