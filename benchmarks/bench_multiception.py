"""Multiception speed on cifar_resnet20 (batch 128, CPU) and the stride-placement training comparison.

Speed: training step and inference of the standard-conv model, the authors' official form
(stride in the 1x1, full-resolution depthwise convs), convzoo's MulticeptionConv2d (stride in
the depthwise step, channels-last depthwise on CPU) and its deploy form, as ratios to the
standard model measured in the same process (interleaved medians).

Training comparison: the same initial weights trained with the stride in the depthwise step
(convzoo) and in the 1x1 step (official) on a fixed slice of CIFAR-10 (../shared/data/cifar10-jpeg),
then test accuracy of each.

    python benchmarks/bench_multiception.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convzoo
from common import (
    inference_fn,
    interleaved_median_times,
    markdown_table,
    train_step_fn,
    write_results,
)
from convzoo.ops import multiception
from convzoo.ops.multiception import FusedMulticeptionConv2d, MulticeptionConv2d, MulticeptionOfficial

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


NOTES = """## Notes

- `official` is the authors' form (`MulticeptionOfficial`: full-resolution depthwise convs, stride in the
  1x1, NCHW). `convzoo` is `MulticeptionConv2d` (stride in the depthwise convs, depthwise step
  channels-last on CPU); `convzoo deployed` is `convzoo.deploy()` of it (`FusedMulticeptionConv2d`,
  `algorithm="auto"`, which on CPU picks convzoo's native kernel in every layer here); `torch forms only`
  is the same with the native kernel excluded (each layer the fastest of branch / accumulate / dense, what
  convzoo shipped before the kernel).
  Rows in channels-last convert the whole model and its input (`model.to(memory_format=torch.channels_last)`)
  and are compared with the standard model converted alike.
- Training on CPU (`convzoo` rows): in layers with a kernel wider than 3, the depthwise branches, BN(K*C)
  and the 1x1 run as one autograd op (`convzoo.ops.multiception_train`: the 1x1 applied to the raw
  branch outputs with BN's scale folded in, one 1x1 per branch accumulated instead of a concatenation
  (6 % on the step), BN's two backward reductions read off the 1x1's gradients),
  and the 5x5 / 7x7 depthwise weight gradients are summed from 3-wide column blocks, which oneDNN
  computes ~10x faster per tap than a 5- or 7-wide kernel (`convzoo.ops.depthwise`, `results/depthwise.md`).
  `convzoo, plain autograd` is the same model through its modules and autograd, as before those two.
- Design measurements (per-op, 1 thread, CPU time, min of repeats, on a shared machine): the NCHW
  depthwise *weight gradient* for 7x7 kernels is ~25x the 3x3 one (oneDNN), channels-last cuts it ~4x;
  a single depthwise conv with channel multiplier K is 5-20x slower than K separate depthwise convs
  on CPU (oneDNN's generic grouped path), so neither training nor the eager CPU deploy path uses it.
  Rejected for training (interleaved A/B of one stage-1 layer, forward + backward): running the fused
  op's backward in batch chunks of 16 / 32 / 64 images so its intermediates stay in cache (0.95-1.0x);
  the 1x1's input gradient as an in-place `addmm_` into each branch's gradient (1.01x); the fused op on
  layers whose kernels are all 3x3 (0.9-1.0x, so they keep the modules).
- Deploy, whole model (1 thread, CPU time): standard 1.00, canonical `pointwise(depthwise(x))` 4.7x,
  branch windows channels-last 2.3x, + batch chunks (intermediate in cache) 1.44x.
- The native kernel (`src/convzoo/csrc/multiception_fused.cpp`, `algorithm="native"`) runs one pass per
  block of 8 output pixels: each branch's window taps as 16-channel vector FMAs on a padded copy of the
  rows it reads (one load per input pixel per row, reused by the 8 pixels' accumulators), the K*C branch
  outputs into a small buffer, and the 1x1 from there. The K*C intermediate never reaches memory, and
  5x5 / 7x7 windows cost their MACs, not oneDNN's per-tap overhead. It is built on first use (about
  15 s, cached) and reads NCHW or channels-last input directly.
"""


def to_official(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every MulticeptionConv2d replaced by the authors' form (same weights)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, MulticeptionConv2d):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, MulticeptionOfficial.from_multiception(module))
    return model


def _channels_last(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def _plain_autograd(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with Multiception's CPU training through its modules and autograd (the form before the
    column-block weight gradients and the fused branches -> BN -> 1x1 op), for comparison."""

    def run() -> None:
        with (
            mock.patch.object(multiception, "fused_training_applies", lambda *args: False),
            mock.patch.object(multiception, "run_depthwise", lambda conv, x: conv(x)),
        ):
            step()

    return run


def _without_native(model: nn.Module) -> nn.Module:
    """A copy of a deployed model whose FusedMulticeptionConv2d layers choose among the torch forms only."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, FusedMulticeptionConv2d):
            module._native_applies = lambda x: False
    return model


def speed(batch: int, repeats: int) -> str:
    x, t = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    standard = convzoo.create_model("cifar_resnet20")
    fast = convzoo.create_model("cifar_resnet20", conv="multiception")
    official = to_official(fast)
    deployed, deployed_standard = convzoo.deploy(fast), convzoo.deploy(standard)
    with torch.no_grad():  # tune the "auto" layers before timing (like a cudnn.benchmark warm-up)
        torch_forms, torch_forms_cl = _without_native(deployed), _channels_last(_without_native(deployed))
        deployed(x)
        chosen = [m.last_algorithm for m in deployed.modules() if isinstance(m, FusedMulticeptionConv2d)]
        deployed_cl = _channels_last(deployed)
        deployed_cl(x_cl)
        chosen_cl = [m.last_algorithm for m in deployed_cl.modules() if isinstance(m, FusedMulticeptionConv2d)]
        torch_forms(x)
        torch_forms_cl(x_cl)
    train = interleaved_median_times(
        {
            "standard": train_step_fn(standard, x, t),
            "official": train_step_fn(official, x, t),
            "convzoo": train_step_fn(fast, x, t),
            "convzoo, plain autograd": _plain_autograd(train_step_fn(copy.deepcopy(fast), x, t)),
            "standard CL": train_step_fn(_channels_last(standard), x_cl, t),
            "convzoo CL": train_step_fn(_channels_last(fast), x_cl, t),
            "convzoo, plain autograd CL": _plain_autograd(train_step_fn(_channels_last(fast), x_cl, t)),
        },
        warmup=2,
        repeats=repeats,
    )
    infer = interleaved_median_times(
        {
            "standard": inference_fn(deployed_standard, x),
            "official": inference_fn(official, x),
            "convzoo": inference_fn(fast, x),
            "convzoo deployed, torch forms only": inference_fn(torch_forms, x),
            "convzoo deployed": inference_fn(deployed, x),
            "standard CL": inference_fn(_channels_last(deployed_standard), x_cl),
            "convzoo deployed, torch forms only CL": inference_fn(torch_forms_cl, x_cl),
            "convzoo deployed CL": inference_fn(deployed_cl, x_cl),
        },
        warmup=2,
        repeats=repeats,
    )

    def rows_of(what: str, times: dict[str, float]) -> list[list[str]]:
        rows = []
        for name, seconds in times.items():
            layout = "channels-last" if name.endswith(" CL") else "NCHW"
            baseline = times["standard CL" if layout == "channels-last" else "standard"]
            model = name.removesuffix(" CL")
            rows.append([what, model, layout, f"{seconds * 1e3:.0f}", f"{seconds / baseline:.2f}x"])
        return rows

    rows = rows_of("training step", train) + rows_of("inference (standard: BN folded)", infer)
    header = ["what", "model", "layout", "ms (median)", "vs standard (same layout)"]
    return (
        markdown_table(header, rows)
        + "\n\nTargets: training step <= 1.5x standard; deployed inference <= 1.0x standard (deployed)."
        + f"\n\nAlgorithms `algorithm='auto'` chose per Multiception layer (NCHW): {', '.join(chosen)}; "
        + f"(channels-last): {', '.join(chosen_cl)}."
    )


# (C_in, C_out, H = W, kernels, stride) of cifar_resnet20's Multiception layers (authors' schedule)
LAYERS = [(16, 16, 32, (3, 5, 7), 1), (16, 32, 32, (3, 5), 2), (32, 32, 16, (3, 5), 1), (32, 64, 16, (3, 3), 2),
          (64, 64, 8, (3, 3), 1)]  # fmt: skip


def deploy_layers(batch: int, repeats: int) -> str:
    """Each deployed Multiception layer shape, channels-last, every exact form against the standard 3x3 conv,
    then stage 1's parts timed one by one (warm cache): what the layer could cost at best."""
    rows = []
    algorithms = ("branch", "accumulate", "dense", "native")
    for c_in, c_out, size, kernels, stride in LAYERS:
        fused = MulticeptionConv2d(c_in, c_out, 3, stride, kernels=kernels).eval().fuse()
        standard = nn.Conv2d(c_in, c_out, 3, stride, 1).eval().to(memory_format=torch.channels_last)
        x = torch.randn(batch, c_in, size, size).contiguous(memory_format=torch.channels_last)
        forms = {"standard 3x3": inference_fn(standard, x)}
        for name in algorithms:
            pinned = copy.deepcopy(fused)
            pinned.algorithm = name
            forms[name] = inference_fn(pinned, x)
        times = interleaved_median_times(forms, warmup=3, repeats=repeats)
        cells = [f"{times[name] * 1e3:.2f} ({times[name] / times['standard 3x3']:.2f}x)" for name in algorithms]
        layer = f"{c_in}->{c_out}, {size}x{size}, {kernels}, stride {stride}"
        rows.append([layer, f"{times['standard 3x3'] * 1e3:.2f}", *cells])
    table = markdown_table(["layer", "standard 3x3 ms", *[f"{name} ms (vs 3x3)" for name in algorithms]], rows)

    channels = LAYERS[0][0]
    x = torch.randn(batch, channels, 32, 32).contiguous(memory_format=torch.channels_last)
    weights = {k: torch.randn(channels, 1, k, k) for k in (3, 5, 7)}
    share = torch.randn(channels, channels, 1, 1)
    z = torch.nn.functional.conv2d(x, weights[3], None, 1, 1, 1, channels)
    out = torch.nn.functional.conv2d(z, share)
    standard = nn.Conv2d(channels, channels, 3, 1, 1).eval().to(memory_format=torch.channels_last)
    parts = {"standard 3x3 conv": inference_fn(standard, x)}
    for k, w in weights.items():
        parts[f"depthwise {k}x{k}"] = lambda w=w, k=k: torch.nn.functional.conv2d(x, w, None, 1, k // 2, 1, channels)
    parts["1x1 share (16->16)"] = lambda: torch.nn.functional.conv2d(z, share)
    parts["add into the output"] = lambda: out.add_(z)
    with torch.inference_mode():
        part_times = interleaved_median_times(parts, warmup=3, repeats=repeats)
    part_rows = [[name, f"{seconds * 1e3:.2f}"] for name, seconds in part_times.items()]
    floor = sum(part_times[f"depthwise {k}x{k}"] for k in (3, 5, 7))
    floor += 3 * part_times["1x1 share (16->16)"] + 2 * part_times["add into the output"]
    return (
        table
        + "\n\nStage 1's parts, each timed on its own (warm cache), against the standard conv it replaces:\n\n"
        + markdown_table(["part", "ms (median)"], part_rows)
        + f"\n\nThree depthwise convs + three 1x1 shares + two adds: {floor * 1e3:.2f} ms, "
        f"{floor / part_times['standard 3x3 conv']:.2f}x the standard conv."
    )


def load_slice(split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images of each class (sorted by file name), normalised, as tensors."""
    from PIL import Image
    from torchvision.transforms.functional import normalize, pil_to_tensor

    images, labels = [], []
    for label, folder in enumerate(sorted(p for p in (DATA / split).iterdir() if p.is_dir())):
        for path in sorted(folder.iterdir())[:per_class]:
            images.append(pil_to_tensor(Image.open(path).convert("RGB")))
            labels.append(label)
    x = torch.stack(images).float() / 255
    x = normalize(x, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])
    return x, torch.tensor(labels)


def train_and_test(model: nn.Module, data: tuple, epochs: int, batch: int, seed: int) -> tuple[float, float]:
    """SGD (Nesterov, lr 0.05, cosine) with random flips; returns (final train loss, test accuracy %)."""
    (x, y), (xt, yt) = data
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(x) + batch - 1) // batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=2e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch):
            index = order[i : i + batch]
            flip = torch.rand(len(index), generator=generator) < 0.5
            inputs = torch.where(flip[:, None, None, None], x[index].flip(3), x[index])
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), y[index])
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    with torch.inference_mode():
        predictions = torch.cat([model(xt[i : i + 500]).argmax(1) for i in range(0, len(xt), 500)])
    correct = (predictions == yt).sum().item()
    return loss.item(), 100.0 * correct / len(xt)


def stride_experiment(per_class: int, test_per_class: int, epochs: int, seeds: int) -> str:
    data = (load_slice("train", per_class), load_slice("test", test_per_class))
    rows = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        fast = convzoo.create_model("cifar_resnet20", conv="multiception")
        official = to_official(fast)
        for name, model in (("stride in depthwise (convzoo)", fast), ("stride in 1x1 (official)", official)):
            start = time.perf_counter()
            loss, accuracy = train_and_test(model, data, epochs, 128, seed)
            rows.append([seed, name, f"{loss:.3f}", f"{accuracy:.1f}", f"{time.perf_counter() - start:.0f}"])
    setup = (
        f"cifar_resnet20 + Multiception (authors' schedule), {10 * per_class} training / {10 * test_per_class} test "
        f"images (first files of each class), {epochs} epochs, batch 128, SGD Nesterov lr 0.05 cosine, "
        "same initial weights for both forms."
    )
    return setup + "\n\n" + markdown_table(["seed", "form", "final train loss", "test acc %", "seconds"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller training slice")
    parser.add_argument("--skip-training", action="store_true", help="speed only")
    parser.add_argument(
        "--stride-only", action="store_true", help="only the training comparison (results/multiception_stride.md)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the training comparison (default 10)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    per_class, epochs, seeds = (100, 2, 1) if args.quick else (1000, 10, 2)
    epochs = args.epochs or epochs
    heading = "## Stride placement: training comparison\n\n"
    if args.stride_only:
        stride = heading + stride_experiment(per_class, 50, epochs, seeds)
        write_results("multiception_stride", "Multiception: stride in the depthwise vs the pointwise step", stride)
        return
    body = "## Speed (cifar_resnet20, batch 128, CPU)\n\n" + speed(128, 3 if args.quick else 10)
    body += "\n\n## Deploy, layer by layer (channels-last, batch 128)\n\n" + deploy_layers(128, 5 if args.quick else 21)
    if not args.skip_training:
        body += "\n\n" + heading + stride_experiment(per_class, 50, epochs, seeds)
    write_results("multiception", "Multiception: speed and stride placement", body + "\n\n" + NOTES)


if __name__ == "__main__":
    main()
