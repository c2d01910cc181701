"""Tool calls of held-out prompts, base vs fine-tuned: call exact match and argument F1.

    python bench/tool_call_match.py runs/tool_calls [--input data/tool_calls/test.jsonl] [--tools FILE]

Each input line is a `messages` conversation whose last turn is the assistant's reference call; the model answers
the turns before it (greedy, in the run's prompt format with the tools given to the chat template, as
`ift generate --tools` does), its reply is read back (`ift.inference.tools.parse_reply`: reasoning stripped, calls
parsed) and scored against the reference: call exact match (the same calls, names and arguments equal as JSON) and
argument F1 over (function, argument, value) triples. The run's base model (`--base`) is scored on the same prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from ift.data.formats import conversation_tools, normalize_row
    from ift.evaluation.decoding import Decoding, decode, text_of
    from ift.inference.target import resolve_target
    from ift.inference.tools import argument_f1, calls_match, parse_reply, read_tools

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--input", type=Path, default=Path("data/tool_calls/test.jsonl"))
    p.add_argument("--tools", type=Path, help="function schemas for rows without a tools column")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, help="score the first N rows only")
    p.add_argument("--only", choices=["base", "fine-tuned"], help="score one of the two models")
    args = p.parse_args(argv)
    default = read_tools(args.tools) if args.tools else None
    lines = [json.loads(line) for line in args.input.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = lines[:args.limit] if args.limit else lines
    cases = []
    for i, line in enumerate(lines):
        messages = normalize_row(line, "messages", source=str(args.input), index=i)
        tools = conversation_tools(line, source=str(args.input), index=i, default=default)
        cases.append((messages[:-1], messages[-1].get("tool_calls") or [], tools))
    results = {}
    for label, base in (("base", True), ("fine-tuned", False)):
        if args.only and args.only != label:
            continue
        target = resolve_target(args.run, base=base)
        target.use_tools(cases[0][2])  # checks the template renders tools
        # each row's prompt with its own tools (the format's tools swapped per row), then one batched decode
        encoded = [dataclasses.replace(target.format, tools=tools).encode(target.tokenizer, history, f"row {k + 1}")
                   for k, (history, _, tools) in enumerate(cases)]
        gens = decode(target.model, target.tokenizer, target.kind, encoded,
                      Decoding(max_new_tokens=args.max_new_tokens), batch_size=args.batch_size)
        answers = []
        for k, g in enumerate(gens):
            reply = parse_reply(text_of(target.tokenizer, g.ids))
            answers.append((k, {"prompt": cases[k][0][-1]["content"], "prediction": reply.content,
                                "tool_calls": reply.tool_calls}))
        exact = [calls_match(o.get("tool_calls", []), cases[k][1]) for k, o in answers]
        f1 = [argument_f1(o.get("tool_calls", []), cases[k][1]) for k, o in answers]
        results[label] = {"call_exact_match": sum(exact) / len(exact), "argument_f1": sum(f1) / len(f1),
                          "example": answers[0][1]}
        print(f"{label}: call exact match {results[label]['call_exact_match']:.3f}, argument F1 "
              f"{results[label]['argument_f1']:.3f} ({len(exact)} prompts)", file=sys.stderr)
    print(json.dumps(results, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
