"""The `ift` command. Each command group lives in its own module and registers its parser here."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ift.errors import IftError
from ift.recipe import Parser  # noqa: F401  (one-line usage errors; lives beside the override parsing)
from ift.recipe import parse_args as parse  # the override-aware parse lives beside load_recipe

# Order = order in `ift --help`.
COMMANDS = ["train", "eval", "templates", "data", "validate", "estimate", "merge", "push", "chat", "generate",
            "export", "studio", "env"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ift",
        description="Instruction fine-tuning: templates, splits, training, evaluation and Hub publishing.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"ift.cli.{name}").register(sub)
    return parser


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
