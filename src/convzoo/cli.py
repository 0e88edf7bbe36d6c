"""The ``convzoo`` command: a thin dispatcher over ``convzoo.commands.*``.

Each command module defines ``add_parser(subparsers)`` and ``run(args) -> int``; ``run`` may set
``args.interrupt_hint`` to replace the command's Ctrl-C hint (``RESUME_HINTS``) when it does not apply.
Errors meant for the user (bad names, missing data, ...) are ``CLIError`` or
``ValueError``/``TypeError`` and print as one line with exit code 2. Warnings that convzoo
itself raises (``UserWarning`` from a convzoo module) print as one ``convzoo CMD: warning: ...`` line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from convzoo.runtime import tune_cpu_allocator

# Command modules under convzoo.commands, in help order.
COMMANDS = ("convs", "models", "profile", "train", "eval", "compare", "demo")
# How to continue after Ctrl-C, for the commands that train (their finished work is on disk).
RESUME_HINTS = {
    "train": "; rerun it with --resume to continue from the last checkpoint",
    "compare": "; rerun the same command to continue (finished runs are reused)",
    "demo": "; rerun it with --resume to continue (finished runs are reused)",
}


class CLIError(Exception):
    """An error in the user's input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convzoo", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"convzoo.commands.{name}").add_parser(subparsers)
    return parser


def _one_line_warnings(command: str, fallback: Callable[..., Any]) -> Callable[..., None]:
    """A ``warnings.showwarning`` printing convzoo's own UserWarnings as ``convzoo CMD: warning: ...``."""
    package = str(Path(__file__).resolve().parent)

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, *rest: Any) -> None:
        if issubclass(category, UserWarning) and str(Path(filename).resolve()).startswith(package):
            print(f"convzoo {command}: warning: {message}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, *rest)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convzoo`` console script."""
    try:  # importing the command modules takes a moment: Ctrl-C there stops as quietly as later on
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("convzoo: interrupted", file=sys.stderr)
        return 130
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
        try:
            tune_cpu_allocator()  # reuse freed memory across steps (convzoo.runtime); CONVZOO_KEEP_ALLOCATOR opts out
            status = int(args.run(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, inside this handler, not at interpreter exit
            return status
        except (CLIError, ValueError, TypeError, FileNotFoundError) as error:
            print(f"convzoo {args.command}: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            hint = getattr(args, "interrupt_hint", None) or RESUME_HINTS.get(args.command, "")
            print(f"convzoo {args.command}: interrupted{hint}", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # the reader stopped early (`convzoo train --list-recipes | head`): stop quietly, as Unix tools do.
            # Python flushes stdout again at exit, so point it at /dev/null first (the Python docs' recipe).
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1


if __name__ == "__main__":
    sys.exit(main())
