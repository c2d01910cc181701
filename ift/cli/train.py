"""`ift train` (under construction)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("train", help="(under construction)")
