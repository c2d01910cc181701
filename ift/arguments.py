"""Command-line arguments shared by the `ift` command and the script entry `accelerate launch ift/train.py`: a
parser whose usage errors are one line like every other error, the override-aware parse, and the training
job's arguments."""

from __future__ import annotations

import argparse


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
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


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line like every other error, `error: what (where) — fix`, exit 2.
    Sub-command parsers are of this class too (argparse makes them of the parent's class)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        required = "the following arguments are required: "
        if message.startswith(required):  # argparse lists optional `nargs="*"` positionals there too
            optional = {a.metavar or a.dest for a in self._actions if not a.option_strings and a.nargs in ("*", "?")}
            message = required + ", ".join(n for n in message[len(required):].split(", ") if n not in optional)
        prog = " ".join([self.prog, *self._words])
        self.exit(2, f"error: {message} ({prog}) — see `{prog} --help`\n")

    _words: list[str] = []  # the command words parsed so far, e.g. ["data", "stats"]: named in later errors

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extra = super().parse_known_args(args, namespace)
        self._words = [w for w in (getattr(parsed, k, None) for k in ("command", "templates_command", "data_command"))
                       if isinstance(w, str)]
        return parsed, extra


def train_arguments(parser: argparse.ArgumentParser) -> None:
    """`RECIPE [key.path=value ...] [--resume [CHECKPOINT]]`."""
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue from the latest checkpoint in output_dir (or from the given checkpoint)")
