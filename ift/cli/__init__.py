"""The `ift` command. Each command group lives in its own module and registers its parser here."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ift.arguments import Parser, parse_args
from ift.errors import exit_code

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
    args = parse_args(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return exit_code(args.func, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # output piped into `head` and closed early: not an error; silence the flush at exit too
        sys.stdout = open(os.devnull, "w")
        return 0
