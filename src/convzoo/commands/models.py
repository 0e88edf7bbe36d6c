"""``convzoo models``: list registered models."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list registered models")
    parser.add_argument("pattern", nargs="?", default="*", help="glob over model names, e.g. 'cifar_*'")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from convzoo import list_models

    for name in list_models(args.pattern):
        print(name)
    return 0
