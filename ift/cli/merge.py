"""`ift merge RUN_DIR [--out DIR]`: fold a LoRA adapter into its full-precision base, save a standalone model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge", help="merge the run's LoRA adapter into its unquantized base model",
        description="Load the base model in its own dtype (or --dtype; never 4-bit, also for QLoRA runs), apply "
                    "RUN_DIR/final, merge the adapter weights and save a standalone model (safetensors, tokenizer, "
                    "model card).")
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run folder (training.output_dir)")
    p.add_argument("--out", metavar="DIR", type=Path, help="where to save the merged model (default RUN_DIR/merged)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="dtype of the merged weights (default auto: the base checkpoint's own, e.g. bf16 for a bf16 "
                        "base; a GGUF base is float32 once de-quantized)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ift.publish.merge import merge

    out = merge(args.run_dir, args.out, dtype=args.dtype, report=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"merged model: {out}")
    return 0
