"""``convzoo models``: list registered models."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list registered models",
        description=(
            "List registered models, or those whose name matches the glob pattern. "
            "Exit code 0, or 1 (with a message on stderr) when the pattern matches nothing."
        ),
    )
    parser.add_argument("pattern", nargs="?", default="*", help="glob over model names, e.g. 'cifar_*'")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from convzoo import list_models

    found = list_models(args.pattern)
    if not found:
        print(f"convzoo models: no model matches {args.pattern!r}; 'convzoo models' lists them all", file=sys.stderr)
        return 1
    for name in found:
        print(name)
    return 0
