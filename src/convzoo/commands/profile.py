"""``convzoo profile``: parameters, MACs, per-layer table and peak activation memory of a model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="parameters, MACs, per-layer table and peak activation memory of a model",
        description="Profile one eval-mode forward pass of a zoo model (MACs per image = FLOPs / 2).",
    )
    parser.add_argument("--model", required=True, help="a zoo name (convzoo models), 'tv:<name>' or 'timm:<name>'")
    parser.add_argument("--conv", default="standard", help="operator kind placed where its paper put it")
    parser.add_argument(
        "--conv-options", default=None, metavar="JSON", help="operator options as JSON, e.g. '{\"d_mul\": 12}'"
    )
    parser.add_argument(
        "--input-size",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="C H W of one image, or one number for a square RGB image (default: the model's own)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images in the profiled pass (MACs are per image)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's own)")
    parser.add_argument("--deploy", action="store_true", help="profile the deployed (folded) inference form")
    parser.add_argument("--format", choices=("md", "csv", "json"), default="md", help="output format")
    parser.add_argument("--summary", action="store_true", help="Markdown: only the summary, no per-layer table")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak activation memory pass")
    parser.add_argument("--output", type=Path, default=None, help="write to this file instead of stdout")
    parser.set_defaults(run=run)


def _input_size(values: list[int] | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if values is None:
        return default
    if len(values) == 1:
        return (3, values[0], values[0])
    if len(values) != 3:
        raise ValueError(f"--input-size takes C H W or one side length, got {' '.join(map(str, values))}")
    return tuple(values)


def run(args: argparse.Namespace) -> int:
    import convzoo
    from convzoo.models.registry import get_model_entry

    external = args.model.startswith(("tv:", "timm:"))
    default_size = (3, 224, 224) if external else get_model_entry(args.model).input_size
    input_size = _input_size(args.input_size, default_size)
    kwargs = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    elif external or default_size[-1] >= 128:  # ImageNet-size models: the 1000-class head the papers count
        kwargs["num_classes"] = 1000
    if args.conv_options:
        try:
            kwargs["conv_options"] = json.loads(args.conv_options)
        except json.JSONDecodeError as error:
            raise ValueError(f"--conv-options must be a JSON object, got {args.conv_options!r}: {error}") from None
        if not isinstance(kwargs["conv_options"], dict):
            raise ValueError(f"--conv-options must be a JSON object, got {args.conv_options!r}")
    if args.output is not None and args.output.is_dir():
        raise ValueError(
            f"--output {str(args.output)!r} is a directory; give a file path, e.g. {args.output / 'profile.md'}"
        )
    model = convzoo.create_model(args.model, conv=args.conv, **kwargs)
    name = args.model if args.conv == "standard" else f"{args.model} (conv={args.conv})"
    if args.deploy:
        model = convzoo.deploy(model)
        name += ", deployed"
    try:
        report = convzoo.profile_model(
            model, input_size, batch_size=args.batch_size, name=name, memory=not args.no_memory
        )
    except (RuntimeError, ValueError) as error:
        # profile_model reports a forward pass that refused the input (channels, too small, ...) as a
        # ValueError chained to torch's RuntimeError; say it in the command's terms (--input-size)
        torch_error = error.__cause__ if isinstance(error, ValueError) else error
        if not isinstance(torch_error, RuntimeError):
            raise
        shape = " ".join(map(str, input_size))
        hint = ""
        if input_size[0] != default_size[0]:
            hint = f"; {args.model} expects {default_size[0]} input channels (--input-size {default_size[0]} H W)"
        message = str(torch_error).strip()
        reason = message.splitlines()[0] if message else type(torch_error).__name__
        raise ValueError(f"{args.model} cannot run on input size {shape}{hint} (torch: {reason})") from None
    text = report.format(args.format, layers=not args.summary)
    if args.output is None:
        print(text, end="")
    else:
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text)
        except OSError as error:
            raise ValueError(f"cannot write --output {str(args.output)!r}: {error.strerror or error}") from None
        print(f"wrote {args.output}")
    return 0
