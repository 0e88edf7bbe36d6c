"""CAC inference: wall-clock of the sparse path against nn.Conv2d as ρ varies, and at model level.

Layer: one 3×3 conv 64->64 on 32×32 maps, batch 64 (the issue's targets: >= 1.5× faster than
nn.Conv2d at ρ = 0.25, never slower than 1.1× at ρ = 1). Masks come from the layer's own score map
on smooth, image-like inputs (bilinearly upsampled 8×8 noise) with β calibrated to each ρ; an
i.i.d.-noise input (scattered sharp windows, the worst case for blocks) is reported too. Each ρ
is timed with the path forced to each sparse algorithm ("pixel": convzoo's native kernel, which reads
the sharp windows' taps straight from the input; "pixel (torch)": the torch-ops fallback, gathered
sharp windows + one GEMM; "block": active 4×4 blocks with halo) and to dense, which locates the
switch-over threshold (on ρ for the pixel algorithm, which is what its time follows).

Model: a CAC cifar_resnet20 whose layers are calibrated to a range of ρ (low in shallow layers,
high in deep ones, like the paper's Fig. 4), deployed, against the deployed standard model.

Usage: python benchmarks/bench_cac.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.nn.functional as F
from torch import nn

import convzoo
from common import interleaved_median_times, markdown_table, write_results
from convzoo.ops.cac import CAConv2d, cac_layers, gradient_map, score_windows, sharp_windows
from convzoo.ops.cac_cost import cac_statistics, calibrate_sharp_ratio_
from convzoo.ops.cac_sparse import CACSparseConv2d, rows_times_kernel
from convzoo.testing import randomize_batchnorm_


def smooth_images(batch: int, channels: int, size: int, *, generator: torch.Generator) -> torch.Tensor:
    """Image-like inputs: low-resolution noise upsampled bilinearly (sharp windows cluster at edges)."""
    low = torch.randn(batch, channels, size // 4, size // 4, generator=generator)
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False)


def torch_ops_only(layer: CACSparseConv2d) -> CACSparseConv2d:
    """The layer with its native kernel switched off: the pixel path in torch ops (the fallback)."""
    layer._native_applies = lambda x: False
    return layer


def layer_benchmark(rhos: list[float], repeats: int) -> tuple[str, float]:
    """Rows of ρ -> speed-ups of the pixel / block / dense / automatic paths; returns the table and threshold."""
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False).eval()
    inputs = {
        "image-like": smooth_images(64, 64, 32, generator=generator),
        "iid noise": torch.randn(64, 64, 32, 32, generator=generator),
    }
    rows, crossover = [], 0.0
    for input_name, x_nchw in inputs.items():
        for layout in ("NCHW", "channels_last"):
            if input_name == "iid noise" and layout == "NCHW":
                continue
            x = x_nchw.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x_nchw
            cac = CAConv2d.from_conv(conv).eval()
            # ρ = 1 twice: calibrated (γ = 1, β = 1: sharp for every input, so fuse() gives the plain conv),
            # and with β = -min(G)/2 < 0 (every window of this input sharp, but the mask must be computed)
            for rho, data_dependent in [(rho, False) for rho in rhos] + [(1.0, True)] * (1.0 in rhos):
                calibrate_sharp_ratio_(cac, x, rho)
                if data_dependent:
                    with torch.no_grad():
                        cac.beta.fill_(-0.5 * float(gradient_map(cac.spec, x, (32, 32)).min()))
                sparse = CACSparseConv2d.from_cac(cac, threshold=1.0)
                sparse_torch = torch_ops_only(CACSparseConv2d.from_cac(cac, threshold=1.0))
                block = CACSparseConv2d.from_cac(cac, threshold=1.0, algorithm="block")
                dense = CACSparseConv2d.from_cac(cac, threshold=0.0)
                auto = cac.fuse()
                with torch.inference_mode():
                    times = interleaved_median_times(
                        {
                            "conv": lambda x=x: conv(x),
                            "sparse": lambda x=x, m=sparse: m(x),
                            "sparse torch": lambda x=x, m=sparse_torch: m(x),
                            "block": lambda x=x, m=block: m(x),
                            "dense": lambda x=x, m=dense: m(x),
                            "auto": lambda x=x, m=auto: m(x),
                            "masked": lambda x=x, m=cac: m(x),
                        },
                        warmup=2,
                        repeats=repeats,
                    )
                    sparse(x)
                    block(x)
                achieved = float(sparse.last_rho().mean())
                if input_name == "image-like" and times["sparse"] < times["dense"]:
                    crossover = max(crossover, achieved)
                speed = {name: times["conv"] / t for name, t in times.items()}
                rows.append(
                    [
                        input_name,
                        layout,
                        f"{achieved:.2f}" + (" (β < 0)" if data_dependent else ""),
                        f"{block.last_active:.2f}",
                        f"{times['conv'] * 1e3:.1f}",
                        f"{speed['sparse']:.2f}×",
                        f"{speed['sparse torch']:.2f}×",
                        f"{speed['block']:.2f}×",
                        f"{speed['dense']:.2f}×",
                        f"**{speed['auto']:.3f}×**",  # 3 decimals: the ρ = 1 target is 1/1.1 = 0.909
                        f"{speed['masked']:.2f}×",
                    ]
                )
                print(rows[-1], flush=True)
    header = [
        "input",
        "layout",
        "ρ",
        "active 4×4 blocks",
        "nn.Conv2d ms",
        "pixel",
        "pixel (torch)",
        "block",
        "dense",
        "deployed (auto)",
        "training form",
    ]
    return markdown_table(header, rows), crossover


def model_benchmark(repeats: int) -> str:
    """Deployed CAC cifar_resnet20 with a range of per-layer ρ against the deployed standard model."""
    generator = torch.Generator().manual_seed(1)
    x = smooth_images(64, 3, 32, generator=generator)
    torch.manual_seed(0)
    base = convzoo.create_model("cifar_resnet20").eval()
    randomize_batchnorm_(base)
    standard = convzoo.deploy(base)
    # the same model run channels-last: a deployed CAC layer runs channels-last whatever its input (an NCHW one
    # is moved as the score map reads it), and so does every layer after it
    standard_cl = copy.deepcopy(standard).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    rows = []
    for low, high in ((1.0, 1.0), (0.6, 0.95), (0.2, 0.8), (0.1, 0.4)):
        model = convzoo.convert(base, "cac").eval()
        layers = cac_layers(model)
        targets = [low + (high - low) * index / (len(layers) - 1) for index in range(len(layers))]
        calibrate_sharp_ratio_(model, x, targets)
        stats = cac_statistics(model, [x])
        deployed = convzoo.deploy(model)
        with torch.inference_mode():
            times = interleaved_median_times(
                {
                    "standard": lambda: standard(x),
                    "standard_cl": lambda: standard_cl(x_cl),
                    "cac": lambda m=deployed: m(x),
                    "cac_cl": lambda m=deployed: m(x_cl),
                },
                warmup=2,
                repeats=repeats,
            )
        rows.append(
            [
                f"{low:.2f} → {high:.2f}",
                f"{sum(stats.rho.values()) / len(stats.rho):.2f}",
                f"{stats.baseline_macs / 1e6:.1f}",
                f"{float(stats.image_macs.mean()) / 1e6:.1f}",
                f"{stats.mean_ratio:.2f}",
                f"{times['standard'] * 1e3:.1f}",
                f"{times['cac'] * 1e3:.1f}",
                f"{times['cac'] / times['standard']:.2f}",
                f"{times['standard_cl'] * 1e3:.1f}",
                f"{times['cac_cl'] * 1e3:.1f}",
                f"{times['cac_cl'] / times['standard_cl']:.2f}",
            ]
        )
        print(rows[-1], flush=True)
    header = [
        "ρ by depth",
        "mean ρ",
        "MMACs std",
        "MMACs CAC",
        "MAC ratio",
        "std ms",
        "CAC ms",
        "time ratio",
        "std ms (channels-last)",
        "CAC ms (channels-last)",
        "time ratio (channels-last)",
    ]
    return markdown_table(header, rows)


def pixel_path_parts(repeats: int) -> str:
    """The torch pixel path at ρ = 0.25 (image-like, channels-last) taken apart: each step timed on its own."""
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False).eval()
    x = smooth_images(64, 64, 32, generator=generator).contiguous(memory_format=torch.channels_last)
    cac = CAConv2d.from_conv(conv).eval()
    calibrate_sharp_ratio_(cac, x, 0.25)
    native = CACSparseConv2d.from_cac(cac, threshold=1.0)
    layer = torch_ops_only(CACSparseConv2d.from_cac(cac, threshold=1.0))
    size = (32, 32)
    with torch.inference_mode():
        mask, _ = sharp_windows(layer.spec, x, layer.gamma, layer.beta, size)
        sharp = mask.flatten().nonzero().squeeze(1)
        rows = x.permute(0, 2, 3, 1).reshape(-1, 64)
        offsets = (torch.arange(3)[:, None] * 32 + torch.arange(3)[None, :]).flatten()
        index = (sharp.clamp(max=rows.shape[0] - 3 * 32 - 3)[:, None] + offsets).flatten()  # interior-like rows
        columns = rows.index_select(0, index).view(sharp.numel(), -1)
        weight = layer.weight.permute(0, 2, 3, 1).reshape(64, -1, 1, 1)
        products = rows_times_kernel(columns, weight, None, 1)
        out_rows = torch.empty_like(rows)
        steps = {
            "nn.Conv2d (the whole dense conv)": lambda: conv(x),
            "score map and mask": lambda: sharp_windows(layer.spec, x, layer.gamma, layer.beta, size),
            "1×1 Σw on every centre": lambda: layer._smooth(x, x, size),
            "positions of the sharp windows": lambda: mask.flatten().nonzero(),
            "gather (im2col of the sharp windows)": lambda: rows.index_select(0, index),
            "GEMM (oneDNN 1×1 conv)": lambda: rows_times_kernel(columns, weight, None, 1),
            "GEMM with torch.mm": lambda: columns @ weight.flatten(1).t(),
            "scatter (index_copy_)": lambda: out_rows.index_copy_(0, sharp, products),
            "whole torch pixel path (forward, threshold 1)": lambda: layer(x),
            "whole native pixel path (forward, threshold 1)": lambda: native(x),
        }
        times = interleaved_median_times(steps, warmup=2, repeats=repeats)
    rows_out = [[name, f"{seconds * 1e3:.2f}"] for name, seconds in times.items()]
    note = f"{sharp.numel()} sharp windows of {mask.numel()} (ρ = {sharp.numel() / mask.numel():.2f})."
    return markdown_table(["step", "ms (median)"], rows_out) + "\n\n" + note


def layout_parts(repeats: int) -> str:
    """An NCHW input: the score map alone, the score map with the mask writing the channels-last copy as it reads
    (what the deployed layer runs), torch's own layout change, and the conv in each layout, dense and grouped."""
    generator = torch.Generator().manual_seed(0)
    x = smooth_images(64, 64, 32, generator=generator)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    size = (32, 32)
    layer = CAConv2d(64, 64, 3, padding=1)
    spec, gamma, beta = layer.spec, layer.gamma, layer.beta
    steps = {
        "score map G alone (native, NCHW)": lambda: gradient_map(spec, x, size),
        "G, the mask and the channels-last copy in one pass": lambda: score_windows(
            spec, x, gamma, beta, size, to_channels_last=True
        ),
        "x.contiguous(memory_format=torch.channels_last)": lambda: x.contiguous(memory_format=torch.channels_last),
    }
    for groups in (1, 4, 64):
        conv = nn.Conv2d(64, 64, 3, padding=1, groups=groups, bias=False).eval()
        name = {1: "dense", 4: "4 groups", 64: "depthwise"}[groups]
        steps[f"3×3 conv ({name}), NCHW input"] = lambda conv=conv: conv(x)
        steps[f"3×3 conv ({name}), channels-last input"] = lambda conv=conv: conv(x_cl)
    with torch.inference_mode():
        times = interleaved_median_times(steps, warmup=2, repeats=repeats)
    rows = [[name, f"{seconds * 1e3:.2f}"] for name, seconds in times.items()]
    return markdown_table(["step (64×64×32×32 input)", "ms (median)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer ρ values and repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    repeats = 3 if args.quick else 9
    rhos = [0.1, 0.25, 0.5, 1.0] if args.quick else [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0]
    layer_table, crossover = layer_benchmark(rhos, repeats)
    model_table = model_benchmark(repeats)
    parts_table = pixel_path_parts(3 * repeats)
    layout_table = layout_parts(3 * repeats)
    load = f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after the run"
    body = f"""{load} (on a loaded machine, every extra small op of the CAC paths pays a
thread-scheduling penalty that the single big nn.Conv2d call does not; re-run on a quiet one).

## One layer: 3×3 conv 64→64, 32×32, batch 64 (speed-up over nn.Conv2d on the same input; >1 is faster)

Targets: ≥ 1.5× at ρ = 0.25, ≥ 1/1.1 = 0.91× at ρ = 1 (deployed = automatic path choice).
At ρ = 1 the layer calibrated with γ = 1, β = 1 is sharp for *every* input (G ≥ 0), so `fuse()` returns
the plain conv it equals (`CACSharpConv2d`); the "ρ = 1 (β < 0)" rows set β = -min(G)/2 instead, so that
every window of this input is sharp but the mask still has to be computed: there the deployed module runs
the score map, then the conv.
Each cell is a median of interleaved runs; single cells move by about ±0.05 from run to run on this machine.
"pixel"/"pixel (torch)"/"block"/"dense" force the path ("pixel" is convzoo's native kernel, `csrc/cac_sparse.cpp`;
"pixel (torch)" the torch-ops pixel path it replaces where it applies); "training form" is the dense masked
CAConv2d (both convs everywhere).

{layer_table}

Largest ρ (image-like inputs) at which the pixel path beat the dense one: **{crossover:.2f}**. "deployed (auto)"
is `CAConv2d.fuse()` with its default `threshold="auto"`, which measures this crossing per input signature on
its first call (warm-up); `DEFAULT_SPARSE_THRESHOLD` in `convzoo/ops/cac_sparse.py` (0.45) is the fallback
where nothing can be timed.

## Where the torch pixel path's time goes (ρ = 0.25, image-like, channels-last)

The torch-ops pixel path (the fallback where the native kernel does not apply), each step timed on its own,
on the benchmark layer's input (the gather uses interior-window indices), with both whole paths beside it.
1.5× Conv2d needs the whole path within Conv2d / 1.5.

{parts_table}

## An NCHW input: the layout change inside the score map's pass

A deployed CAC layer moves a contiguous NCHW input (a multiple of 16 channels, a dense or depthwise conv) to
channels-last memory inside the score map's native pass, then runs every path channels-last
(`convzoo.ops.cac.score_windows`). The parts, each timed on its own:

{layout_table}

## Model: deployed CAC cifar_resnet20, batch 64, per-layer ρ ramped from shallow to deep

"std" is the deployed standard model (BN folded into its convs). The first three time columns run both models on
the NCHW input, the last three on the same input in channels-last memory (the standard model converted with
`.to(memory_format=torch.channels_last)`). On the NCHW input the CAC model's 3-channel stem keeps it NCHW, and
from the first 16-channel CAC layer on every layer runs channels-last (the score map's kernel moves an NCHW input
as it reads it), so only the channels-last columns compare like with like. `convzoo.deploy` folds the BN after
each CAC layer through `CACSparseConv2d.fuse_batchnorm` (exact). In the "1.00 → 1.00" row every layer is
calibrated to γ = 1, β = 1, sharp for every input, so `deploy()` turns each into the plain conv it equals
(`CACSharpConv2d`, BN folded), which keeps its input's layout.

{model_table}
"""
    write_results("cac", "CAC: sparse inference wall-clock vs ρ", body)


if __name__ == "__main__":
    main()
