"""`ift generate RUN_DIR|MODEL --input F.jsonl | --prompt TEXT`: batched answers, in the run's prompt format."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ift.cli.chat import add_decoding_options, add_target_options, decoding_from
from ift.errors import IftError


def register(sub: argparse._SubParsersAction) -> None:
    from ift.evaluation.decoding import DEFAULT_MAX_NEW_TOKENS

    p = sub.add_parser(
        "generate", help="answer every prompt of a JSON Lines file (or one --prompt) with a run's model",
        description="Batched generation with the fine-tuned model of RUN_DIR (or --base, or any MODEL) in the run's "
                    "prompt format. Each input line is a JSON object with 'prompt' (text) or 'messages' (a "
                    "conversation ending with the user's turn); with --template, the fields the template reads. "
                    "The output keeps every input field and adds the answer ('prediction'), one line per input "
                    "line, written atomically. Greedy answers equal `ift eval`'s for the same prompts.")
    add_target_options(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", type=Path, metavar="F.jsonl", help="prompts, one JSON object per line")
    source.add_argument("--prompt", metavar="TEXT", help="one prompt (the answer is printed)")
    p.add_argument("--output", type=Path, metavar="F.jsonl",
                   help="write the results here (default: JSON Lines on standard output)")
    p.add_argument("--field", default="prediction", metavar="NAME",
                   help="output field that holds the answer (default prediction)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="prompts per forward pass (default 16)")
    add_decoding_options(p, DEFAULT_MAX_NEW_TOKENS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ift.inference.batch import generate_rows, write_jsonl
    from ift.inference.prompts import PromptRow, read_records, to_rows
    from ift.inference.target import resolve_target
    from ift.inference.tools import read_tools

    decoding = decoding_from(args)
    if args.input is None and args.prompt is None:
        raise IftError("no prompts given", "ift generate", "give --input prompts.jsonl or --prompt TEXT")
    if args.batch_size < 1:
        raise IftError(f"--batch-size must be at least 1, got {args.batch_size}", "--batch-size",
                       "e.g. --batch-size 16")
    if args.output is not None:
        if args.output.is_dir():
            raise IftError("--output is a folder", str(args.output), "give a file name, e.g. out.jsonl")
        if args.input is not None and args.output.resolve() == args.input.resolve():
            raise IftError("--output would replace the input file", str(args.output), "write to another file")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise IftError("the prompt is empty", "--prompt", "give some text")
        records = [(1, {"prompt": args.prompt})]
    else:
        records = read_records(args.input, field_name=args.field)  # input mistakes before the model loads
    tools = read_tools(args.tools) if args.tools else None
    target = resolve_target(args.target, base=args.base, template=args.template, raw=args.raw)
    target.check_system(args.system)
    target.use_tools(tools)
    rows: list[PromptRow] = to_rows(records, target.format, source=str(args.input or "--prompt"), system=args.system)
    results = generate_rows(target, rows, decoding, batch_size=args.batch_size, field_name=args.field)
    if args.output is not None:
        write_jsonl(args.output, results)
        print(f"wrote {len(results)} answers to {args.output}", file=sys.stderr)
    elif args.prompt is not None:
        print(results[0][args.field])
    else:
        for record in results:
            print(json.dumps(record, ensure_ascii=False))
    return 0
