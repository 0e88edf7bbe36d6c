"""CPWC speed: training step and inference of CPWC models against their baselines, beside the MACs ratio.

Models: torchvision resnet50 and mobilenet_v2, batch 16 at 64x64, every 1x1 conv replaced (the
paper's rule). Forms measured, all in one process and timed interleaved with the baseline:

* ``cpwc``: convzoo's form (stage 1 as one depthwise conv + a gather or a segment sum);
* ``cpwc w/o stage 2``: the paper's ablation;
* ``cpwc literal grouped``: the same weights computed as the paper draws it, stage 1 as a grouped
  conv with ``groups=Z`` (r channels per group) or a depthwise conv with a channel multiplier;
* the same models in ``channels_last`` memory format (baseline in channels_last too).

Inference compares deployed models (``convzoo.deploy``: BN folded into the nn.Conv2d or CPWC before it).
A second table times stage 1 alone on ResNet-50 layer shapes, both forms, forward + backward.

    python benchmarks/bench_cpwc.py            # full run, writes results/cpwc.md
    python benchmarks/bench_cpwc.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import convzoo
from common import inference_fn, interleaved_median_times, markdown_table, train_step_fn, write_results
from convzoo import CPWConv2d
from convzoo.profiling import count_macs

BATCH, SIZE, TARGET = 16, 64, 1.3


class LiteralGroupedCPWConv2d(CPWConv2d):
    """CPWConv2d with stage 1 computed literally: one grouped conv per run of equal groups.

    Case 1-2 runs are grouped convs with ``size`` channels per group; case 3 runs are depthwise
    convs with a channel multiplier ``size``. Same weights, same outputs as CPWConv2d.
    """

    def stage1(self, x: torch.Tensor) -> torch.Tensor:
        parts, channel, connection = [], 0, 0
        for blocks, size in self.plan.segments:
            in_per_block, out_per_block = (1, size) if self.plan.case == 3 else (size, 1)
            weight = self.stage1_weight[connection : connection + blocks * size]
            weight = weight.reshape(blocks * out_per_block, in_per_block, 3, 3)
            source = x[:, channel : channel + blocks * in_per_block]
            parts.append(F.conv2d(source, weight, None, self.stride, 1, 1, blocks))
            channel, connection = channel + blocks * in_per_block, connection + blocks * size
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def literal(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (same weights) with every CPWConv2d computing stage 1 literally."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, CPWConv2d):
            module.__class__ = LiteralGroupedCPWConv2d
    return model


def check_literal_form() -> None:
    """The literal form computes what convzoo's form computes (float64, every case, with remainders)."""
    for c, z, stride in [(6, 6, 1), (8, 4, 2), (11, 4, 1), (2, 6, 1), (3, 8, 2)]:
        module = CPWConv2d(c, z, stride, dtype=torch.float64)
        x = torch.randn(2, c, 9, 7, dtype=torch.float64)
        torch.testing.assert_close(literal(module)(x), module(x), rtol=1e-12, atol=1e-12)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
}


def measure_model(name: str, repeats: int) -> list[list[str]]:
    """Rows: variant, MACs ratio, train ratio, train/MACs, inference ratio, inference/MACs."""
    torch.manual_seed(0)
    base = MODELS[name]()
    variants = {
        "cpwc": convzoo.convert(base, "cpwc"),
        "cpwc w/o stage 2": convzoo.convert(base, "cpwc", stage2=False),
    }
    variants["cpwc literal grouped"] = literal(variants["cpwc"])
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    y = torch.randint(0, 10, (BATCH,))
    base_macs = count_macs(base, (3, SIZE, SIZE))
    rows = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        suffix = "" if memory_format is torch.contiguous_format else ", channels_last"
        xm = x.contiguous(memory_format=memory_format)
        models = {"baseline": base, **variants}
        models = {key: m.to(memory_format=memory_format) for key, m in models.items()}
        train = interleaved_median_times(
            {key: train_step_fn(m, xm, y) for key, m in models.items()}, warmup=2, repeats=repeats
        )
        deployed = {key: convzoo.deploy(m) for key, m in models.items()}
        infer = interleaved_median_times(
            {key: inference_fn(m, xm) for key, m in deployed.items()}, warmup=2, repeats=repeats
        )
        for key in variants:
            macs = count_macs(models[key], (3, SIZE, SIZE)) / base_macs
            t, i = train[key] / train["baseline"], infer[key] / infer["baseline"]
            rows.append(
                [
                    f"{name}{suffix}",
                    key,
                    f"{train['baseline'] * 1e3:.0f} / {infer['baseline'] * 1e3:.0f} ms",
                    f"{macs:.3f}",
                    f"{t:.2f}",
                    f"**{t / macs:.2f}**" if t / macs <= TARGET else f"{t / macs:.2f}",
                    f"{i:.2f}",
                    f"**{i / macs:.2f}**" if i / macs <= TARGET else f"{i / macs:.2f}",
                ]
            )
        print(markdown_table(["model", "variant", "", "", "", "", "", ""], rows), flush=True)
    return rows


# ResNet-50 pointwise convs at 64x64 input: (C, Z, stride, input size)
LAYERS = [(256, 64, 1, 16), (64, 256, 1, 16), (512, 128, 1, 8), (256, 512, 2, 16), (1024, 256, 1, 4), (512, 2048, 1, 2)]


def measure_layers(repeats: int) -> list[list[str]]:
    """Stage 1 alone, forward + backward: convzoo's form vs the literal grouped conv, and the PWC."""
    rows = []
    for c, z, stride, size in LAYERS:
        module = CPWConv2d(c, z, stride)
        literal_module = literal(module)
        pwc = nn.Conv2d(c, z, 1, stride, bias=False)
        x = torch.randn(BATCH, c, size, size, requires_grad=True)

        def step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor = x) -> Callable[[], None]:
            return lambda: fn(x).sum().backward()

        times = interleaved_median_times(
            {"pwc": step(pwc), "fast": step(module.stage1), "literal": step(literal_module.stage1)},
            warmup=2,
            repeats=repeats,
        )
        plan = module.plan
        rows.append(
            [
                f"{c}->{z} s{stride} @{size}x{size} (case {plan.case})",
                f"{9 * plan.num_connections / (z * c):.3f}",
                f"{times['pwc'] * 1e3:.2f} ms",
                f"{times['fast'] / times['pwc']:.2f}",
                f"{times['literal'] / times['pwc']:.2f}",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 15
    check_literal_form()
    header = [
        "model",
        "variant",
        "baseline train / infer",
        "MACs ratio",
        "train time ratio",
        "train / MACs",
        "inference time ratio",
        "inference / MACs",
    ]
    rows = [row for name in args.models for row in measure_model(name, repeats)]
    body = markdown_table(header, rows)
    body += (
        f"\n\nBatch {BATCH}, {SIZE}x{SIZE} input, 10 classes. Medians of {repeats} interleaved runs after 2 "
        "warm-up runs; every ratio is against the baseline model measured in the same loop (same memory "
        "format). Inference compares deployed models (every BN folded into the conv or CPWC before it). "
        f"Target: time ratio <= {TARGET} x MACs ratio (bold where met).\n\n"
    )
    body += "## Stage 1 alone: convzoo's form vs the literal grouped conv (forward + backward)\n\n"
    body += markdown_table(
        ["layer", "stage-1 MACs / PWC MACs", "PWC time", "depthwise + gather/sum / PWC", "literal grouped / PWC"],
        measure_layers(repeats),
    )
    write_results("cpwc", "CPWC: training step and inference vs the baseline, beside the MACs ratio", body)


if __name__ == "__main__":
    main()
