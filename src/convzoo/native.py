"""Native CPU kernels, compiled on first use with torch's C++ extension builder.

Some operators have an exact native kernel that beats any sequence of torch ops on CPU:
``FusedMulticeptionConv2d``'s ``algorithm="native"`` (``csrc/multiception_fused.cpp``),
``CACSparseConv2d``'s native sparse path (``csrc/cac_sparse.cpp``), CAC's score-map gradient
(``csrc/cac_gradient.cpp``) and DO-Conv's kernel composition and its backward (``csrc/doconv_compose.cpp``,
the training form's per-step cost). The source
ships with the package and is compiled the first time it is needed, like StyleGAN's custom ops:
``torch.utils.cpp_extension.load`` with ninja (a dependency) and the system's C++ compiler, about
10-20 s once per machine; the result is cached under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) and loaded from there afterwards.

The ops are registered with the dispatcher as ``torch.ops.convzoo.*`` (CPU only). Everything that
uses them has a pure-torch fallback: when the build is impossible (no compiler, not Linux) or
disabled with ``CONVZOO_NATIVE=0``, :func:`native_ops` returns None after one warning and callers
use their torch implementations. GPUs never use these kernels.

The build targets the CPU capability torch itself dispatches to (``torch.backends.cpu.get_cpu_capability``),
not ``-march=native``, and each capability gets its own build folder, so a home directory shared by
machines of different generations never loads code a machine cannot run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

ENV_VAR = "CONVZOO_NATIVE"
SOURCES = tuple(
    Path(__file__).parent / "csrc" / name
    for name in ("multiception_fused.cpp", "cac_sparse.cpp", "cac_gradient.cpp", "doconv_compose.cpp")
)
HEADERS = (Path(__file__).parent / "csrc" / "vec16.h",)
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state = SimpleNamespace(ops=None, tried=False, error=None)


def native_disabled() -> bool:
    """Whether ``CONVZOO_NATIVE=0`` (or ``false`` / ``off`` / ``no``) switches the native kernels off."""
    return os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "off", "no")


def build_flags() -> tuple[str, list[str]]:
    """(build name, compiler flags) for this machine's CPU capability and this torch and source."""
    capability = torch.backends.cpu.get_cpu_capability()
    isa = _ISA_FLAGS.get(capability, []) if platform.machine().lower() in ("x86_64", "amd64") else []
    digest = hashlib.sha256(torch.__version__.encode())
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    name = f"convzoo_native_{capability.lower()}_{digest.hexdigest()[:10]}"
    return name, ["-O3", "-fno-math-errno", "-fopenmp", *isa]


@contextlib.contextmanager
def _build_environment() -> Iterator[None]:
    """ninja on PATH (the wheel's binary, for a venv that is not activated) and the builder's logger quiet,
    for the build only."""
    path = os.environ.get("PATH", "")
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    try:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
        except ImportError:
            pass
        # importing the builder logs a "no CUDA runtime" warning on CPU-only machines: nothing to do with us
        logger.setLevel(logging.ERROR)
        yield
    finally:
        os.environ["PATH"] = path
        logger.setLevel(level)


def _built(cpp_extension: Any, name: str) -> bool:
    """Whether ``name`` is already compiled in torch's extension cache (best effort: a private torch helper)."""
    try:
        return (Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so").exists()
    except Exception:
        return False


def _build() -> Any:
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"native kernels are built on Linux only (this is {sys.platform})")
    name, flags = build_flags()
    with _build_environment():
        from torch.utils import cpp_extension

        if not _built(cpp_extension, name):
            _log.warning("convzoo: compiling native CPU kernels %s once (about 20 s; then cached)", name)
        cpp_extension.load(
            name=name,
            sources=[str(source) for source in SOURCES],
            extra_cflags=flags,
            # -fopenmp links libgomp.so.1, which resolves to the copy torch already loaded (same soname):
            # the kernels' at::parallel_for runs on torch's own OpenMP thread pool, not a second one
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    return torch.ops.convzoo


def native_ops() -> Any | None:
    """``torch.ops.convzoo`` with the native CPU kernels, building them on first use; None if unavailable.

    Thread-safe; the build is attempted once per process. A failure warns once (``RuntimeWarning``,
    with the reason) and is remembered in :func:`native_error`.
    """
    if _state.tried:
        return _state.ops
    with _lock:
        if _state.tried:
            return _state.ops
        if not native_disabled():
            try:
                _state.ops = _build()
            except Exception as error:  # no compiler, no ninja, a compile error: fall back, say why once
                _state.error = error
                warnings.warn(
                    f"convzoo: native CPU kernels unavailable, using the torch implementations instead ({error})",
                    RuntimeWarning,
                    stacklevel=2,
                )
        _state.tried = True
    return _state.ops


def native_ready(x: Tensor, *weights: Tensor | None) -> bool:
    """Whether a native kernel may compute this call, with ``x`` (B, C, H, W) and the weights it reads.

    A non-empty 4-D map, then the conditions of :func:`native_operands_ready` on ``x`` and the weights.
    """
    if x.dim() != 4 or x.shape[-2] == 0 or x.shape[-1] == 0:
        return False
    return native_operands_ready(x, *weights)


def native_operands_ready(*operands: Tensor | None) -> bool:
    """Whether a native kernel may read these operands (None entries are skipped).

    The shared conditions of every native kernel (each caller adds its own shape checks first):
    every operand a plain float32 CPU tensor (no Python tensor subclass such as DTensor); no autograd
    on any of them (the kernels have no derivative formulas: no tensor that requires grad while grad
    mode is on, no forward-mode tangent, no torch.func transform); no autocast (the torch forms would
    compute in the autocast dtype); no torch dispatch mode (fake tensors, FLOP counting and convzoo's
    profiler see the torch forms). Last, the kernels must be built (:func:`native_ops`; the first call builds them).
    """
    tensors = [t for t in operands if t is not None]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    # tensor subclasses that dispatch in Python (DTensor, fake tensors outside their mode, ...) look like CPU
    # float32 tensors but hold no plain data the kernels could read
    if any(torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Python) for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    # tangents exist only inside a dual level (forward_ad._current_level >= 0): skip the unpacking otherwise
    if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return False
    if torch._C._are_functorch_transforms_active() or torch.is_autocast_enabled("cpu"):
        return False
    return not is_in_torch_dispatch_mode() and native_ops() is not None


def native_error() -> Exception | None:
    """Why the native kernels failed to build in this process (None if they built, or were not tried)."""
    return _state.error
