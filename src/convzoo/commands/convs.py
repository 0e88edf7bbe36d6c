"""``convzoo convs``: list operator kinds."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convs",
        help="list operator kinds",
        description=(
            "List operator kinds, or those whose name matches the glob pattern. "
            "Exit code 0, or 1 (with a message on stderr) when the pattern matches nothing."
        ),
    )
    parser.add_argument("pattern", nargs="?", default="*", help="glob over kind names")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from convzoo import list_convs

    found = list_convs(args.pattern)
    if not found:
        print(f"convzoo convs: no conv kind matches {args.pattern!r}; 'convzoo convs' lists them all", file=sys.stderr)
        return 1
    for name, description in found.items():
        print(f"{name:<14} {description}")
    return 0
