"""``convzoo demo``: the README's main job on the embedded digits data, in a few minutes on 2 CPU cores.

1. ``compare`` cifar_resnet20 with the standard conv and every operator registered for it
   (recipe ``digits-quick``), printing the paper-style table;
2. deploy the most accurate model (fold operators and BatchNorms) and check that the
   deployed model computes what the trained one computes on the test images.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_CONVS = "standard,doconv,cpwc,multiception,dsconv,mixconv,dds,cac"
DEFAULT_EPOCHS = 3  # eight kinds in a few minutes on 2 CPU cores


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="the README's main job: a short compare on digits, then deploy")
    parser.add_argument("--convs", default=DEFAULT_CONVS, help="kinds to compare (unregistered ones are skipped)")
    parser.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs per run (default {DEFAULT_EPOCHS}; recipe: 6)"
    )
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--output", default=None, help="folder for runs and tables (default runs/demo-<time>)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="DIR",
        help="continue an interrupted demo: the one in DIR or --output, else the latest runs/demo-<time>",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N or mps")
    parser.set_defaults(run=run)


def _resume_folder(resume: str | None) -> str | None:
    """The folder of the demo to continue: ``resume`` itself, or the latest ``runs/demo-<time>`` for ``latest``."""
    if resume is None:
        return None
    if resume != "latest":
        if not Path(resume).is_dir():
            raise ValueError(f"no demo run to resume in {resume}")
        return resume
    started = sorted(p for p in Path("runs").glob("demo-*") if p.is_dir())  # demo-<time> sorts by time
    if not started:
        raise ValueError("no demo run to resume (no runs/demo-<time> folder here); pass --resume DIR")
    return str(started[-1])


def run(args: argparse.Namespace) -> int:
    import torch

    import convzoo
    from convzoo.train.checkpoint import load_checkpoint
    from convzoo.train.compare import compare, markdown, write_outputs
    from convzoo.train.config import make_config
    from convzoo.train.distributed import check_device
    from convzoo.train.engine import model_from_checkpoint, prepare_data

    check_device(args.device)
    output = args.output or _resume_folder(args.resume) or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    print(f"demo runs in {output} (after an interruption, --resume continues it)", flush=True)
    start = time.perf_counter()
    convs = [c.strip() for c in args.convs.split(",") if c.strip()]
    overrides = {"device": args.device}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    comparison = compare(
        "cifar_resnet20", convs, data="digits", seeds=args.seeds, recipe="digits-quick", output=output, **overrides
    )
    if not comparison.rows:
        raise ValueError(f"none of {convs} could be trained")
    title = "cifar_resnet20 on digits (recipe digits-quick)"
    paths = write_outputs(comparison, title)
    print()
    print(markdown(comparison, title))

    best = max(comparison.rows, key=lambda row: row.top1_mean)
    run_dir = best.run_dirs[max(range(len(best.top1)), key=best.top1.__getitem__)]
    checkpoint = load_checkpoint(run_dir / "checkpoint.safetensors")
    model = model_from_checkpoint(checkpoint, run_dir)
    model.eval()
    deployed = convzoo.deploy(model)
    config = make_config("digits-quick", device=args.device)
    data = prepare_data(config)
    mean = torch.tensor(checkpoint.meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(checkpoint.meta["std"]).view(1, -1, 1, 1)
    images = (data.test.images.float() - mean) / std
    with torch.no_grad():
        reference, folded = model(images), deployed(images)
    error = (reference - folded).abs().max().item()
    accuracy = (folded.argmax(1) == data.test.labels).float().mean().item()
    params = convzoo.profiling.count_parameters(model), convzoo.profiling.count_parameters(deployed)
    macs = convzoo.profiling.count_macs(model), convzoo.profiling.count_macs(deployed)
    print(f"best: {best.conv} ({best.top1_mean:.2f}% top-1); deployed from {run_dir}")
    print(f"  parameters {params[0]:,} -> {params[1]:,}; MACs/image {macs[0]:,} -> {macs[1]:,}")
    print(
        f"  deployed top-1 {100 * accuracy:.2f}%; max |deployed - trained| over {len(images)} test images = {error:.2e}"
    )
    torch.testing.assert_close(folded, reference, rtol=1e-4, atol=1e-4)
    print("deployed outputs match")
    print(f"wrote {paths['md']}, {paths['csv']} and {paths['png']}; {time.perf_counter() - start:.0f} s in all")
    return 0
