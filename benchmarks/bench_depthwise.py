"""Depthwise weight gradients on CPU: oneDNN's cliff above 3 columns, and convzoo's column blocks.

Table 1 times oneDNN's weight gradient alone (``convolution_backward``, weight only) for depthwise
kernels of several shapes on a channels-last (128, 16, 32, 32) input. It is fast while the kernel is at
most 3 wide, at any height. Table 2 times the forward + backward of ``F.conv2d`` against
``convzoo.ops.depthwise.depthwise_conv2d``, which computes the weight gradient by column blocks, on
the depthwise layer shapes of stages 1 and 2 of a Multiception cifar_resnet20 (stride 1, kernels up
to 9). Both tables are timed interleaved,
and each cell is the median.

    python benchmarks/bench_depthwise.py            # writes results/depthwise.md
    python benchmarks/bench_depthwise.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import interleaved_median_times, markdown_table, write_results
from convzoo.ops.depthwise import depthwise_conv2d

KERNEL_SHAPES = [(3, 3), (5, 3), (7, 3), (9, 3), (7, 1), (1, 7), (3, 5), (3, 7), (5, 5), (7, 7), (9, 9)]
LAYERS = [(16, 32, 3), (16, 32, 5), (16, 32, 7), (16, 32, 9), (32, 16, 3), (32, 16, 5), (32, 16, 7)]
BATCH = 128


def _channels_last(*shape: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last).requires_grad_(requires_grad)


def weight_gradient_by_shape(repeats: int) -> str:
    x = _channels_last(BATCH, 16, 32, 32)
    fns = {}
    for kh, kw in KERNEL_SHAPES:
        weight = torch.randn(16, 1, kh, kw)
        padding = (kh // 2, kw // 2)
        grad = torch.randn_like(F.conv2d(x, weight, None, 1, padding, 1, 16))
        args = (grad, x, weight, None, (1, 1), padding, (1, 1), False, (0, 0), 16, (False, True, False))
        fns[f"{kh}x{kw}"] = lambda args=args: torch.ops.aten.convolution_backward(*args)
    times = interleaved_median_times(fns, warmup=3, repeats=repeats)
    rows = [[name, f"{seconds * 1e3:.2f}", f"{seconds / times['3x3']:.1f}x"] for name, seconds in times.items()]
    return markdown_table(["kernel (h x w)", "weight gradient ms", "vs 3x3"], rows)


def layers(repeats: int) -> str:
    rows = []
    for channels, size, k in LAYERS:
        x = _channels_last(BATCH, channels, size, size, requires_grad=True)
        weight = torch.randn(channels, 1, k, k, requires_grad=True)
        grad = torch.randn(BATCH, channels, size, size).contiguous(memory_format=torch.channels_last)
        padding = (k // 2, k // 2)

        def plain(x=x, weight=weight, grad=grad, padding=padding, channels=channels) -> None:
            F.conv2d(x, weight, None, 1, padding, 1, channels).backward(grad)

        def blocks(x=x, weight=weight, grad=grad, padding=padding) -> None:
            depthwise_conv2d(x, weight, None, (1, 1), padding).backward(grad)

        times = interleaved_median_times({"plain": plain, "blocks": blocks}, warmup=3, repeats=repeats)
        plain, blocks = times["plain"], times["blocks"]
        shape = f"({BATCH}, {channels}, {size}, {size}), {k}x{k}"
        rows.append([shape, f"{plain * 1e3:.2f}", f"{blocks * 1e3:.2f}", f"{plain / blocks:.2f}x"])
    header = ["input, kernel", "F.conv2d fwd+bwd ms", "column blocks fwd+bwd ms", "speed-up"]
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 5 if args.quick else 21
    body = (
        "## oneDNN's depthwise weight gradient by kernel shape (channels-last (128, 16, 32, 32), stride 1)\n\n"
        + weight_gradient_by_shape(repeats)
        + "\n\n## Forward + backward of depthwise layers, cifar_resnet20 stage 1 and 2 shapes (batch 128)\n\n"
        + layers(repeats)
        + "\n\nColumn blocks (`convzoo.ops.depthwise`): the weight gradient of a kernel wider than 3 is summed from"
        " kh x 3 (and kh x 1) blocks, each a oneDNN weight gradient on the input read from a shifted storage"
        " offset of one zero-gapped copy. 3x3 kernels take the plain path, so their two columns time the same"
        " thing."
    )
    write_results("depthwise", "Depthwise weight gradients on CPU", body)


if __name__ == "__main__":
    main()
