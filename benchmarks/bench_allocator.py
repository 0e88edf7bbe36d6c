"""What ``convzoo.tune_cpu_allocator`` buys: training-step time and page faults, default vs tuned malloc.

mallopt settings are process-wide and cannot be undone, so each measurement runs in its own
worker process (default malloc: ``CONVZOO_KEEP_ALLOCATOR=1``), alternating default and tuned
workers; each worker reports the median of its timed steps after warm-up and the minor page
faults per step. The table gives the median over workers.

    python benchmarks/bench_allocator.py            # writes results/allocator.md
    python benchmarks/bench_allocator.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CASES = {
    "cifar_resnet20 standard (batch 128)": ("cifar_resnet20", "standard", 128, 32),
    "cifar_resnet20 doconv (batch 128)": ("cifar_resnet20", "doconv", 128, 32),
    "cifar_resnet20 multiception (batch 128)": ("cifar_resnet20", "multiception", 128, 32),
    "torchvision resnet18 standard (batch 32, 64x64)": ("resnet18", "standard", 32, 64),
    "torchvision resnet18 doconv (batch 32, 64x64)": ("resnet18", "doconv", 32, 64),
}


def worker(case: str, steps: int, threads: int) -> None:
    """Time ``steps`` training steps of one case in this process; print JSON."""
    import torch

    from common import train_step_fn

    torch.set_num_threads(threads)
    import convzoo

    name, conv, batch, size = CASES[case]
    torch.manual_seed(0)
    model = convzoo.create_model(name, conv=conv, num_classes=10)
    step = train_step_fn(model, torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,)))
    for _ in range(3):
        step()
    times, faults = [], 0
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"seconds": statistics.median(times), "faults": faults / steps}))


def run_worker(case: str, tuned: bool, steps: int, threads: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["CONVZOO_KEEP_ALLOCATOR"] = "0" if tuned else "1"
    command = [sys.executable, __file__, "--worker", case, "--steps", str(steps), "--threads", str(threads)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer workers and steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.threads)
        return
    from common import markdown_table, write_results

    rounds, steps = (2, 5) if args.quick else (3, 7)
    rows = []
    for case in CASES:
        samples: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for _ in range(rounds):
            for tuned in (False, True):
                samples[tuned].append(run_worker(case, tuned, steps, args.threads))
        ms = {t: statistics.median(s["seconds"] for s in samples[t]) * 1e3 for t in samples}
        faults = {t: statistics.median(s["faults"] for s in samples[t]) for t in samples}
        rows.append(
            [
                case,
                f"{ms[False]:.0f}",
                f"{faults[False]:.0f}",
                f"{ms[True]:.0f}",
                f"{faults[True]:.0f}",
                f"{ms[True] / ms[False]:.2f}",
            ]
        )
    header = ["training step", "default ms", "default faults/step", "tuned ms", "tuned faults/step", "tuned / default"]
    body = markdown_table(header, rows) + (
        f"\n\nEach cell: median over {rounds} worker processes per setting (alternating default and tuned), "
        f"each the median of {steps} steps after 3 warm-up steps. 'faults' are minor page faults "
        "(first touches of pages the kernel had to hand out and zero). The machine line above refers to "
        "this parent process; workers set their own allocator."
    )
    write_results("allocator", "CPU allocator: default glibc malloc vs convzoo.tune_cpu_allocator", body)


if __name__ == "__main__":
    main()
