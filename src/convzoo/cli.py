"""The ``convzoo`` command: a thin dispatcher over ``convzoo.commands.*``.

Each command module defines ``add_parser(subparsers)`` and ``run(args) -> int``.
Errors meant for the user (bad names, missing data, ...) are ``CLIError`` or
``ValueError``/``TypeError`` and print as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from convzoo.runtime import tune_cpu_allocator

# Command modules under convzoo.commands, in help order.
COMMANDS = ("convs", "models", "profile", "train", "eval", "compare", "demo")


class CLIError(Exception):
    """An error in the user's input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convzoo", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"convzoo.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convzoo`` console script."""
    args = build_parser().parse_args(argv)
    tune_cpu_allocator()  # reuse freed memory across steps (see convzoo.runtime); CONVZOO_KEEP_ALLOCATOR=1 opts out
    try:
        return int(args.run(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError) as error:
        print(f"convzoo {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"convzoo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
