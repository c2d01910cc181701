"""`ift export RUN_DIR --format gguf [--quant f16|bf16|q8_0] [--out FILE]`: one GGUF file + an Ollama Modelfile."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from ift.publish.gguf import QUANTS

    p = sub.add_parser(
        "export", help="write the run's merged model as GGUF (llama.cpp) with an Ollama Modelfile",
        description="Merge RUN_DIR's adapter into its full-precision base (QLoRA runs too) and write one GGUF file "
                    "(tokenizer, chat template, stop tokens included) for llama.cpp, plus an Ollama Modelfile beside "
                    "it whose TEMPLATE reproduces the run's prompt format. Supports Llama-family models (SmolLM, "
                    "Llama, Mistral, Qwen2) with byte-level BPE tokenizers.")
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run folder (training.output_dir)")
    p.add_argument("--format", choices=["gguf"], default="gguf", help="output format (gguf)")
    p.add_argument("--quant", choices=QUANTS, default="f16",
                   help="weight type: f16 (default), bf16, or q8_0 (8-bit blocks, about half the size); norms stay f32")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="the .gguf file to write (default RUN_DIR/export/<run>-<quant>.gguf); the Modelfile goes "
                        "beside it")
    p.add_argument("--check", action="store_true",
                   help="read the file back with transformers and compare its logits with the merged model's")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ift.publish.export import check_export, export_gguf, merged_model
    from ift.publish.merge import load_run_recipe

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    done = export_gguf(args.run_dir, quant=args.quant, out=args.out, report=say)
    for note in done.notes:
        say(f"note: {note}")
    if args.check:
        say("reading the file back with transformers")
        model, tokenizer, _ = merged_model(args.run_dir, load_run_recipe(args.run_dir))
        figures = check_export(done.gguf, model, tokenizer)
        say(f"logits vs the merged model: max |difference| {figures['max_abs']:.3g} "
            f"({figures['max_rel']:.2%} of the largest logit); same tokens: {figures['same_tokens']}")
    print(f"GGUF ({done.architecture}, {done.quant}, {done.tensors} tensors): {done.gguf}")
    print(f"Modelfile: {done.modelfile}  ->  ollama create {args.run_dir.resolve().name} -f {done.modelfile}")
    return 0
