"""`ift train RECIPE`: the training job in this process (`accelerate launch ift/train.py` for several)."""

from __future__ import annotations

import argparse

from ift.arguments import train_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a model as the recipe says (one process; see accelerate launch)",
                       description="Same as `accelerate launch ift/train.py RECIPE`, in this process.")
    train_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ift.train import run as train  # torch and the whole stack load only for this command

    return train(args)
