"""`ift train RECIPE`: the training job in this process (`accelerate launch ift/train.py` for several)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from ift.train import add_arguments, run

    p = sub.add_parser("train", help="fine-tune a model as the recipe says (one process; see accelerate launch)",
                       description="Same as `accelerate launch ift/train.py RECIPE`, in this process.")
    add_arguments(p)
    p.set_defaults(func=run)
