"""Process-level CPU tuning: keep freed memory in the process instead of returning it to the OS.

PyTorch on CPU allocates and frees every activation, gradient and composed kernel each step.
glibc's malloc serves large blocks with ``mmap`` and trims the heap when much of it is free, so
the next step gets fresh pages from the kernel and faults on every 4 KiB of them. On the
2-core VM this project is developed on, a cifar_resnet20 training step took about 21,000 page
faults (84 MB of first-touch zeroing) and ran 15-30 % slower than with freed memory kept
(``benchmarks/results/allocator.md``). PyTorch's CPU performance guide recommends jemalloc or
tcmalloc for the same reason; :func:`tune_cpu_allocator` gets the effect from glibc itself, with
no preload and no extra package.

Every ``convzoo`` command and benchmark calls it at start-up. Python API users call it once at the
top of a CPU training script. Set ``CONVZOO_KEEP_ALLOCATOR=1`` (or ``true``, ``yes``, ``on``) to leave
malloc untouched; ``0``, ``false``, ``no``, ``off`` or empty mean the same as unset (case-insensitive).
Any other value leaves malloc untouched too, with a warning naming the accepted values.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import warnings

# mallopt parameters (glibc <malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# glibc caps M_MMAP_THRESHOLD at HEAP_MAX_SIZE / 2, which is 32 MiB on 64-bit systems
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30
TOP_PAD_BYTES = 64 << 20
OPT_OUT_VARIABLE = "CONVZOO_KEEP_ALLOCATOR"
OPT_OUT_VALUES = ("1", "true", "yes", "on")  # leave malloc untouched
NOT_SET_VALUES = ("", "0", "false", "no", "off")  # same as unset: tune

_applied = False


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def opted_out() -> bool:
    """Whether ``CONVZOO_KEEP_ALLOCATOR`` asks to leave malloc untouched (case-insensitive).

    1/true/yes/on: yes; unset, empty, 0/false/no/off: no. Any other value: yes (as before values were
    parsed), with a UserWarning naming the variable and the accepted values; it never raises.
    """
    value = os.environ.get(OPT_OUT_VARIABLE, "")
    if value.strip().lower() in NOT_SET_VALUES:
        return False
    if value.strip().lower() not in OPT_OUT_VALUES:
        warnings.warn(
            f"{OPT_OUT_VARIABLE}={value!r} is not understood: use {'/'.join(OPT_OUT_VALUES)} to leave malloc "
            f"untouched or {'/'.join(NOT_SET_VALUES[1:])} (or unset) to tune it; leaving malloc untouched",
            UserWarning,
            stacklevel=3,
        )
    return True


def tune_cpu_allocator() -> bool:
    """Make glibc's malloc reuse freed memory instead of handing it back to the OS.

    Sets, through ``mallopt``: blocks below 32 MiB come from the heap rather than ``mmap``
    (``M_MMAP_THRESHOLD``); the heap is trimmed only when more than 1 GiB of it is free
    (``M_TRIM_THRESHOLD``); it grows 64 MiB at a time (``M_TOP_PAD``). The process then keeps
    up to its peak footprint between steps, which is what a training loop reuses anyway.

    Returns:
        True when the settings are in effect (now or from an earlier call); False on systems
        without glibc (macOS, Windows, musl), when ``CONVZOO_KEEP_ALLOCATOR`` opts out (see
        :func:`opted_out`), or when glibc refused a value. It never raises.
    """
    global _applied
    if _applied:
        return True
    if opted_out():
        return False
    libc = _glibc()
    if libc is None:
        return False
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (_M_TOP_PAD, TOP_PAD_BYTES),
    )
    _applied = all(libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) == 1 for option, value in settings)
    return _applied
