"""DO-Conv speed: training step and inference against nn.Conv2d, in one process.

For each model, three forms: the standard model (nn.Conv2d), the DO-Conv training
form, and the deployed model (``convzoo.deploy``: DO-Conv folded into nn.Conv2d, BN
folded). The deployed model is also compared with the standard model deployed the
same way (BN folded), which is the like-for-like inference baseline. The training step
is also timed with the kernel composition forced onto its torch form (``bmm`` + transposed
copy) instead of convzoo's native kernels, and a second table times the composition alone
(forward + backward) per layer shape against a plain copy of the weight.

    python benchmarks/bench_doconv.py            # full run, writes results/doconv.md
    python benchmarks/bench_doconv.py --quick    # fewer repeats (5 instead of 45)
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

import torch
import torchvision

import convzoo
import convzoo.ops.doconv as doconv_module
from common import inference_fn, interleaved_median_times, markdown_table, train_step_fn, write_results
from convzoo.ops.doconv import compose_kernel, native_compose_applies

CASES = {
    "cifar_resnet20 (batch 128, 32x32)": (lambda: convzoo.create_model("cifar_resnet20"), (128, 3, 32, 32)),
    "torchvision resnet18 (batch 32, 64x64)": (
        lambda: torchvision.models.resnet18(num_classes=10),
        (32, 3, 64, 64),
    ),
}


LAYER_SHAPES = [(64, 64), (128, 128), (256, 256), (256, 512), (512, 512)]  # resnet18's 3x3 (C_in, C_out)


@contextlib.contextmanager
def torch_composition() -> Iterator[None]:
    """Compose DO-Conv kernels with the torch ops (bmm + transposed copy) instead of the native kernels."""
    originals = doconv_module.native_compose_applies, doconv_module.native_weight_ready
    doconv_module.native_compose_applies = doconv_module.native_weight_ready = lambda *args: False
    try:
        yield
    finally:
        doconv_module.native_compose_applies, doconv_module.native_weight_ready = originals


def _in(context: Callable[[], contextlib.AbstractContextManager], fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with context():
            fn()

    return run


def measure(build, shape: tuple[int, ...], repeats: int) -> list[str]:
    torch.manual_seed(0)
    standard = build()
    doconv = convzoo.convert(standard, "doconv")
    x = torch.randn(*shape)
    y = torch.randint(0, 10, (shape[0],))
    doconv_step = train_step_fn(doconv, x, y)
    train = interleaved_median_times(
        {
            "conv": train_step_fn(standard, x, y),
            "doconv": doconv_step,
            "doconv_torch": _in(torch_composition, doconv_step),
        },
        repeats=repeats,
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
        f"{train['doconv_torch'] / train['conv']:.3f}",
        f"{infer['conv'] * 1e3:.1f} ms",
        f"{infer['doconv'] / infer['conv']:.3f}",
        f"{infer['deployed'] / infer['conv']:.3f}",
        f"{infer['deployed'] / infer['conv_deployed']:.3f}",
    ]


def measure_composition(c_in: int, c_out: int, repeats: int) -> list[str]:
    """Composition forward + backward for one 3x3 layer: native kernels, torch ops, and a copy of W."""
    W = torch.randn(c_in, 9, c_out, requires_grad=True)
    D = (torch.eye(9) + 0.1 * torch.randn(c_in, 9, 9)).requires_grad_()
    grad = torch.randn(c_out, c_in, 9)
    if not native_compose_applies(W.detach(), D.detach(), 1):
        raise SystemExit("convzoo's native kernels are unavailable here (see convzoo.native.native_error())")

    def step() -> None:
        W.grad = D.grad = None
        compose_kernel(W, D, 1).backward(grad)

    times = interleaved_median_times(
        {"native": step, "torch": _in(torch_composition, step), "copy": lambda: grad.clone()}, repeats=repeats
    )
    return [
        f"{c_in} -> {c_out}",
        f"{times['torch'] * 1e3:.2f} ms",
        f"{times['native'] * 1e3:.2f} ms",
        f"{times['torch'] / times['native']:.1f}x",
        f"{times['copy'] * 1e3:.2f} ms",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (5)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=45,
        help="interleaved runs per form (default 45: on a shared 2-core host one step varies by about 5 %%, so a "
        "median of 15 still moved the ratio by 2-3 %% from run to run)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else args.repeats
    header = [
        "model",
        "Conv2d train step",
        "DO-Conv train / Conv2d",
        "same, torch composition",
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
        "'deployed / Conv2d' compares against the un-folded standard model, so BN folding shows there as a gain. "
        "'torch composition' runs the same DO-Conv step with the kernel composition on torch ops (bmm + "
        "transposed copy) instead of convzoo's native kernels."
    )
    composition = [measure_composition(c_in, c_out, max(15, repeats)) for c_in, c_out in LAYER_SHAPES]
    body += "\n\n## Kernel composition alone: forward + backward of one 3x3 layer\n\n" + markdown_table(
        ["layer", "torch (bmm + transposed copy)", "native", "speed-up", "one copy of W"],
        composition,
    )
    body += (
        "\n\nThe composition reads W and D and writes W'; its backward reads dL/dW' and W and writes dL/dW and "
        "dL/dD: at least three copies' worth of memory traffic, each of the size of W."
    )
    write_results("doconv", "DO-Conv: training step and inference vs nn.Conv2d", body)


if __name__ == "__main__":
    main()
