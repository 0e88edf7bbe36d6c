"""``convzoo convs``: list operator kinds."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convs", help="list operator kinds")
    parser.add_argument("pattern", nargs="?", default="*", help="glob over kind names")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from convzoo import list_convs

    for name, description in list_convs(args.pattern).items():
        print(f"{name:<14} {description}")
    return 0
