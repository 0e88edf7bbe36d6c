"""Shared timing helpers for the benchmark scripts (never used by unit tests).

Every figure is a median over several timed runs after warm-up, and every
operator is reported as a ratio to its baseline measured in the same process.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from convzoo.runtime import tune_cpu_allocator

# every benchmark runs as `convzoo` commands do: freed memory kept for reuse (baseline and operator alike)
ALLOCATOR_TUNED = tune_cpu_allocator()

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_times(
    fns: dict[str, Callable[[], object]], *, warmup: int = 3, repeats: int = 10
) -> dict[str, float]:
    """Median seconds of each function, timing them round-robin so drift hits all alike.

    Each round starts one function later than the previous one, so no function always runs right
    after the same other one (which leaves caches and the allocator in its own state).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def train_step_fn(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    """A closure running one SGD training step (forward, cross-entropy, backward, update)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        optimizer.step()

    return step


def inference_fn(model: torch.nn.Module, inputs: torch.Tensor) -> Callable[[], None]:
    """A closure running one eval-mode forward pass under ``torch.inference_mode``."""
    model.eval()

    def infer() -> None:
        with torch.inference_mode():
            model(inputs)

    return infer


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    """One line describing where the numbers were taken."""
    return (
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"malloc {'tuned (convzoo.tune_cpu_allocator)' if ALLOCATOR_TUNED else 'default'}"
    )


def write_results(name: str, title: str, body: str) -> Path:
    """Write ``benchmarks/results/<name>.md`` with the command that produced it."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    text = f"# {title}\n\nProduced by `{command}` on {time.strftime('%Y-%m-%d')}.\n\n{machine_line()}\n\n{body}\n"
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text)
    print(text)
    return path
