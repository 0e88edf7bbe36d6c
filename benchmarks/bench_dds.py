"""DDS benchmark: ddsnet against MobileNetV2, and the pyramid's branch form against its folded form.

1. Inference time (CPU, 224x224, batch 8), parameters and MACs of ``ddsnet`` and ``mobilenetv2``,
   both deployed (BatchNorm folded); ddsnet once with each deploy form of its pyramid convs.
2. Each distinct pyramid layer shape of ddsnet at 224 (batch 8): the split pyramid as concatenated
   dilated branches vs as one folded depthwise conv with the zero-filled (k-1)·max(r)+1 kernel.
   This measurement decides ``convzoo.ops.dilated.DEFAULT_DEPLOY_FORM``.

Usage: python benchmarks/bench_dds.py [--quick]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import convzoo
from common import interleaved_median_times, markdown_table, write_results
from convzoo.ops.dilated import DEFAULT_DEPLOY_FORM, PyramidDilatedConv2d
from convzoo.profiling import count_macs
from convzoo.testing import count_parameters


def deploy_with_form(model: nn.Module, form: str) -> nn.Module:
    """``convzoo.deploy`` after replacing every pyramid conv by its ``fuse(form=...)``."""
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, PyramidDilatedConv2d):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.fuse(form=form))
    return convzoo.deploy(model)


def infer(model: nn.Module, x: torch.Tensor):
    model.eval()

    def run() -> None:
        with torch.inference_mode():
            model(x)

    return run


def pyramid_shapes(model: nn.Module, size: int) -> list[tuple[int, int, int]]:
    """Distinct (channels, input side, stride) of the pyramid convs of ``model`` at ``size`` x ``size``."""
    shapes: list[tuple[int, int, int]] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        shape = (module.in_channels, inputs[0].shape[-1], module.stride[0])
        if shape not in shapes:
            shapes.append(shape)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PyramidDilatedConv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and layer shapes")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    repeats, warmup = (3, 1) if args.quick else (15, 3)
    x = torch.randn(args.batch, 3, args.size, args.size)
    input_size = (3, args.size, args.size)

    baseline = convzoo.create_model("mobilenetv2", num_classes=1000)
    dds = convzoo.create_model("ddsnet", num_classes=1000)
    models = {
        "mobilenetv2 (deployed)": convzoo.deploy(baseline),
        "ddsnet, folded pyramid (deployed)": deploy_with_form(dds, "folded"),
        "ddsnet, branch pyramid (deployed)": deploy_with_form(dds, "branches"),
        "ddsnet, training form (eval)": copy.deepcopy(dds).eval(),
    }
    times = interleaved_median_times({k: infer(m, x) for k, m in models.items()}, warmup=warmup, repeats=repeats)
    base_time = times["mobilenetv2 (deployed)"]
    base_macs = count_macs(baseline, input_size)
    rows = []
    for name, model in models.items():
        macs = count_macs(model, input_size)
        rows.append(
            [
                name,
                f"{count_parameters(model) / 1e6:.3f}M",
                f"{macs / 1e6:.1f}M",
                f"{macs / base_macs:.2f}",
                f"{times[name] * 1e3:.1f}",
                f"{times[name] / base_time:.2f}",
            ]
        )
    network = markdown_table(["model", "params", "MACs/image", "MACs ratio", "ms/batch", "time ratio"], rows)

    shapes = pyramid_shapes(dds, args.size)
    if args.quick:
        shapes = shapes[::3]
    layer_rows = []
    for channels, side, stride in shapes:
        module = PyramidDilatedConv2d(channels, 3, stride).eval()
        forms = {form: module.fuse(form=form).eval() for form in ("branches", "folded")}
        inputs = torch.randn(args.batch, channels, side, side)
        t = interleaved_median_times({f: infer(m, inputs) for f, m in forms.items()}, warmup=warmup, repeats=repeats)
        macs = {f: count_macs(m, (channels, side, side)) for f, m in forms.items()}
        layer_rows.append(
            [
                f"{channels}x{side}x{side} s{stride}",
                f"{macs['branches'] / 1e6:.2f}M",
                f"{macs['folded'] / 1e6:.2f}M",
                f"{t['branches'] * 1e3:.2f}",
                f"{t['folded'] * 1e3:.2f}",
                f"{t['folded'] / t['branches']:.2f}",
            ]
        )
    layers = markdown_table(
        [
            "pyramid layer (C x H x W, stride)",
            "MACs branches",
            "MACs folded",
            "ms branches",
            "ms folded",
            "folded/branches",
        ],
        layer_rows,
    )
    body = (
        f"CPU inference, batch {args.batch}, {args.size}x{args.size}, median of {repeats} interleaved runs "
        f"after {warmup} warm-up runs. MACs per image from `convzoo.profiling.count_macs`.\n\n"
        f"## ddsnet vs MobileNetV2\n\n{network}\n\n"
        f"## Pyramid conv (dilations 1, 2, 3, split): branch form vs folded form\n\n"
        f"Every distinct ddsnet layer shape{' (every third, --quick)' if args.quick else ''}; the operator alone "
        f"(the deployed network above also folds the following BatchNorm into the folded form).\n\n{layers}\n\n"
        f"`PyramidDilatedConv2d.fuse()` deploys the `{DEFAULT_DEPLOY_FORM}` form.\n"
    )
    write_results("dds", "DDS: ddsnet vs MobileNetV2, pyramid deploy forms", body)


if __name__ == "__main__":
    main()
