"""Pick the fastest of several exact implementations of one op, once per input signature.

Like ``torch.backends.cudnn.benchmark``: the first call with a new input shape / dtype / device /
memory format times every candidate on that very input and remembers the winner; later calls
with the same signature run the winner directly. The candidates compute the same function (they
differ only in floating-point rounding order), so the choice never changes a result beyond that.

Under a torch dispatch mode (``FlopCounterMode``, fake tensors, convzoo's profiler) nothing is
timed, because time there means nothing: the first candidate runs and no choice is cached.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from convzoo.ops.conv_spec import autocast_enabled

Signature = tuple[tuple[int, ...], tuple[int, ...], torch.dtype, str, torch.dtype | None]


def input_signature(x: Tensor) -> Signature:
    """What the speed of a conv-like op depends on: shape, strides (layout), dtype, device and autocast.

    The device with its index (``cuda:0`` and ``cuda:1`` may be different GPUs), and the dtype autocast
    computes in there (None when it is off): under CUDA autocast the convs run in float16 on a float32
    input, which can change which candidate is fastest.
    """
    computed = torch.get_autocast_dtype(x.device.type) if autocast_enabled(x.device) else None
    return tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), computed


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(run: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Least wall-clock seconds of ``repeats`` runs of ``run()`` after one warm-up run (no autograd)."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    times = []
    with torch.no_grad():
        run()
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            times.append(time.perf_counter() - start)
    return min(times)


def time_candidates(candidates: Mapping[str, Callable[[], Tensor]], device: torch.device, repeats: int = 3) -> str:
    """Run each candidate once to warm up, then ``repeats`` times; return the name with the least best time.

    Args:
        candidates: name -> zero-argument callable computing the op on the input being tuned for.
        device: where the work runs (CUDA work is synchronized around each timing).
        repeats: timed runs per candidate (the minimum counts: it is the least disturbed by noise).
    """
    if not candidates:
        raise ValueError("candidates must hold at least one implementation, got none")
    best = {name: best_time(run, device, repeats) for name, run in candidates.items()}
    return min(best, key=best.__getitem__)


class AlgorithmCache:
    """Remembers, per input signature, which candidate :func:`time_candidates` found fastest."""

    def __init__(self) -> None:
        self._choices: dict[Signature, str] = {}

    def choose(self, x: Tensor, candidates: Mapping[str, Callable[[], Tensor]]) -> str:
        """The cached choice for ``x``'s signature, timing ``candidates`` on ``x`` the first time.

        Under a dispatch mode: the cached choice if there is one, else the first candidate (untimed).
        """
        if is_in_torch_dispatch_mode():
            return self._choices.get(input_signature(x), next(iter(candidates)))
        key = input_signature(x)
        if key not in self._choices:
            self._choices[key] = (
                next(iter(candidates)) if len(candidates) == 1 else time_candidates(candidates, x.device)
            )
        return self._choices[key]

    def clear(self) -> None:
        """Forget every choice (call after changing the weights or the hardware)."""
        self._choices.clear()

    def __len__(self) -> int:
        return len(self._choices)
