"""DO-Conv speed: training step and inference against nn.Conv2d, in one process.

For each model, three forms: the standard model (nn.Conv2d), the DO-Conv training
form, and the deployed model (``convzoo.deploy``: DO-Conv folded into nn.Conv2d, BN
folded). The deployed model is also compared with the standard model deployed the
same way (BN folded), which is the like-for-like inference baseline.

    python benchmarks/bench_doconv.py            # full run, writes results/doconv.md
    python benchmarks/bench_doconv.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse

import torch
import torchvision

import convzoo
from common import inference_fn, interleaved_median_times, markdown_table, train_step_fn, write_results

CASES = {
    "cifar_resnet20 (batch 128, 32x32)": (lambda: convzoo.create_model("cifar_resnet20"), (128, 3, 32, 32)),
    "torchvision resnet18 (batch 32, 64x64)": (
        lambda: torchvision.models.resnet18(num_classes=10),
        (32, 3, 64, 64),
    ),
}


def measure(build, shape: tuple[int, ...], repeats: int) -> list[str]:
    torch.manual_seed(0)
    standard = build()
    doconv = convzoo.convert(standard, "doconv")
    x = torch.randn(*shape)
    y = torch.randint(0, 10, (shape[0],))
    train = interleaved_median_times(
        {"conv": train_step_fn(standard, x, y), "doconv": train_step_fn(doconv, x, y)}, repeats=repeats
    )
    deployed, standard_deployed = convzoo.deploy(doconv), convzoo.deploy(standard)
    infer = interleaved_median_times(
        {
            "conv": inference_fn(standard, x),
            "conv_deployed": inference_fn(standard_deployed, x),
            "doconv": inference_fn(doconv, x),
            "deployed": inference_fn(deployed, x),
        },
        repeats=repeats,
    )
    return [
        f"{train['conv'] * 1e3:.1f} ms",
        f"{train['doconv'] / train['conv']:.3f}",
        f"{infer['conv'] * 1e3:.1f} ms",
        f"{infer['doconv'] / infer['conv']:.3f}",
        f"{infer['deployed'] / infer['conv']:.3f}",
        f"{infer['deployed'] / infer['conv_deployed']:.3f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 15
    header = [
        "model",
        "Conv2d train step",
        "DO-Conv train / Conv2d",
        "Conv2d inference",
        "DO-Conv (training form) inference / Conv2d",
        "deployed / Conv2d",
        "deployed / Conv2d with BN folded",
    ]
    rows = [[name, *measure(build, shape, repeats)] for name, (build, shape) in CASES.items()]
    body = markdown_table(header, rows)
    body += (
        f"\n\nMedians of {repeats} interleaved runs after 3 warm-up runs. Targets: training step <= 1.10x "
        "Conv2d; deployed inference 1.00x (+-3%) of the Conv2d model deployed the same way (BN folded). "
        "'deployed / Conv2d' compares against the un-folded standard model, so BN folding shows there as a gain."
    )
    write_results("doconv", "DO-Conv: training step and inference vs nn.Conv2d", body)


if __name__ == "__main__":
    main()
