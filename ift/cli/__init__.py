"""The `ift` command. Each command group lives in its own module and registers its parser here."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ift.errors import IftError

# Order = order in `ift --help`.
COMMANDS = ["train", "eval", "templates", "data", "validate", "estimate", "merge", "push", "env"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ift",
        description="Instruction fine-tuning: templates, splits, training, evaluation and Hub publishing.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"ift.cli.{name}").register(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, letting `key.path=value` overrides come after flags too (`ift eval RUN --split test a.b=1`).

    argparse alone stops filling a positional list at the first flag; the leftovers are overrides when the
    command takes them and look like one, and an error otherwise.
    """
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except IftError as err:
        for line in err.lines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # output piped into `head` and closed early: not an error; silence the flush at exit too
        sys.stdout = open(os.devnull, "w")
        return 0
