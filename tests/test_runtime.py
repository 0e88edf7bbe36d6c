"""tune_cpu_allocator: freed memory stays in the process, so repeated steps stop page-faulting."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from convzoo.runtime import OPT_OUT_VARIABLE, tune_cpu_allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Several large blocks alive at once, then all freed, ten times: the allocation pattern of a training
# step (activations kept for backward, released after it). It calls malloc/free through ctypes, so
# nothing else allocates in between and glibc's default heuristics act deterministically: the
# dynamic mmap threshold moves up to the largest block, the heap then grows past the (dynamic) trim
# threshold and is handed back at every free. Prints the page faults of the ten steps.
PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, resource, sys
    from convzoo.runtime import tune_cpu_allocator
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    if sys.argv[1] == "tuned":
        assert tune_cpu_allocator()
    sizes = [n << 20 for n in (1, 4, 16, 8, 2, 12, 4)]  # bytes; 47 MiB alive at once
    def steps(n):
        for _ in range(n):
            blocks = [libc.malloc(size) for size in sizes]
            for block, size in zip(blocks, sizes):
                libc.memset(block, 1, size)  # touch every page
            for block in reversed(blocks):
                libc.free(block)
    steps(2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    steps(10)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _page_faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != OPT_OUT_VARIABLE and not k.startswith("MALLOC_")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True, timeout=120
    )
    return int(result.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning applies to glibc only")
def test_tuned_allocator_stops_page_faults_on_repeated_steps() -> None:
    untuned, tuned = _page_faults("default"), _page_faults("tuned")
    assert untuned > 10_000  # glibc hands the blocks back and faults them in again every step
    assert tuned < untuned / 100


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning applies to glibc only")
def test_tuning_is_idempotent_in_process() -> None:
    assert tune_cpu_allocator() is True
    assert tune_cpu_allocator() is True


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "On", " on "])
def test_opt_out_variable_leaves_malloc_alone(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    import convzoo.runtime as runtime

    monkeypatch.setattr(runtime, "_applied", False)
    monkeypatch.setenv(OPT_OUT_VARIABLE, value)
    assert runtime.opted_out() is True
    assert runtime.tune_cpu_allocator() is False


@pytest.mark.parametrize("value", ["", "0", "false", "False", "NO", "off"])
def test_false_values_mean_not_set(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    import convzoo.runtime as runtime

    monkeypatch.setenv(OPT_OUT_VARIABLE, value)
    assert runtime.opted_out() is False
    if GLIBC:
        monkeypatch.setattr(runtime, "_applied", False)
        assert runtime.tune_cpu_allocator() is True


def test_unknown_value_warns_and_leaves_malloc_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import convzoo.runtime as runtime

    monkeypatch.setattr(runtime, "_applied", False)
    monkeypatch.setenv(OPT_OUT_VARIABLE, "maybe")
    match = r"CONVZOO_KEEP_ALLOCATOR='maybe' is not understood: use 1/true/yes/on .* 0/false/no/off"
    with pytest.warns(UserWarning, match=match):
        assert runtime.tune_cpu_allocator() is False


def test_unknown_value_is_one_warning_line_from_the_cli(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import convzoo.runtime as runtime
    from convzoo.cli import main

    monkeypatch.setattr(runtime, "_applied", False)
    monkeypatch.setenv(OPT_OUT_VARIABLE, "maybe")
    assert main(["models", "cifar_resnet20"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("convzoo models: warning: CONVZOO_KEEP_ALLOCATOR='maybe' is not understood")
    assert len(err.splitlines()) == 1


def test_non_glibc_systems_report_not_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    import convzoo.runtime as runtime

    monkeypatch.setattr(runtime, "_applied", False)
    monkeypatch.delenv(OPT_OUT_VARIABLE, raising=False)
    monkeypatch.setattr(runtime.platform, "system", lambda: "Darwin")
    assert runtime.tune_cpu_allocator() is False
