"""`ift merge` (under construction)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("merge", help="(under construction)")
