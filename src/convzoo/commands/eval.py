"""``convzoo eval``: top-1, top-5 and per-class accuracy of a checkpoint on its test data."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint: top-1, top-5, per-class accuracy")
    parser.add_argument("--checkpoint", required=True, help="checkpoint.safetensors or its run folder")
    parser.add_argument("--model", default=None, help="expected model (an error if the checkpoint is another)")
    parser.add_argument("--conv", default=None, help="expected conv kind (an error if the checkpoint is another)")
    parser.add_argument("--data", default=None, help="data set (default: the one it was trained on)")
    parser.add_argument("--data-dir", default=None, help="data folder (default: the one it was trained with)")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from convzoo.train.distributed import check_device
    from convzoo.train.evaluate import evaluate_checkpoint

    check_device(args.device)
    report = evaluate_checkpoint(
        args.checkpoint,
        model=args.model,
        conv=args.conv,
        data=args.data,
        data_dir=args.data_dir,
        split=args.split,
        ema=args.ema,
        device=args.device,
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} conv={report['conv']} on {report['data']} {report['split']} ({report['count']} images)")
    print(f"top-1 {report['top1']:.4f}   top-5 {report['top5']:.4f}   loss {report['loss']:.4f}")
    print("per-class top-1:")
    for name, value in zip(report["classes"], report["per_class"]):
        print(f"  {name:<16} {value:.4f}")
    return 0
