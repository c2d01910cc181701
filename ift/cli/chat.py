"""`ift chat RUN_DIR|MODEL`: talk to the fine-tuned (or --base) model in the prompt format the run trained with."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_decoding_options(p: argparse.ArgumentParser, max_new_default: int) -> None:
    """--temperature / --top-p / --max-new-tokens / --seed, shared by chat and generate."""
    g = p.add_argument_group("decoding (greedy unless --temperature > 0)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 = greedy, the default (the answer evaluation scores); e.g. 0.7 to sample")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling: keep the most likely "
                   "tokens up to this probability mass (default 1 = all); only with --temperature > 0")
    g.add_argument("--max-new-tokens", type=int, default=max_new_default, metavar="N",
                   help=f"answer length limit in tokens (default {max_new_default})")
    g.add_argument("--seed", type=int, metavar="N", help="seed for sampling (default: a new one each time)")


def add_target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="RUN_DIR|MODEL",
                   help="a run folder (recipe.yaml + final/; a LoRA adapter is applied, not merged), a model folder, "
                        "a .gguf file or a Hub model id")
    p.add_argument("--base", action="store_true", help="the run's untuned base model, in the run's prompt format")
    p.add_argument("--template", metavar="REF|none",
                   help="fill this promptsource template's prompt with your text (default: a run trained without a "
                        "chat template uses its own template; a chat-template run takes your text as it is)")
    p.add_argument("--raw", action="store_true", help="give the model the text as it is: no chat template, no template")
    p.add_argument("--system", metavar="TEXT", help="system prompt (chat-template formats only)")
    p.add_argument("--tools", type=Path, metavar="FILE.json",
                   help="function schemas (a JSON list) handed to the chat template; calls in the answer are shown "
                        "(and, in generate, written as tool_calls)")


def decoding_from(args: argparse.Namespace):
    from ift.evaluation.decoding import Decoding

    return Decoding(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def register(sub: argparse._SubParsersAction) -> None:
    from ift.evaluation.decoding import DEFAULT_MAX_NEW_TOKENS

    p = sub.add_parser(
        "chat", help="talk to a run's model in the terminal (streaming; /reset, /system TEXT, /exit)",
        description="An interactive chat with the fine-tuned model of RUN_DIR (or its --base model, or any MODEL), in "
                    "exactly the prompt format the run trained with: the tokenizer's chat template for "
                    "data.chat_template runs, the run's promptsource template otherwise. Answers stream as they are "
                    "decoded. Commands: /reset, /system TEXT, /exit (or Ctrl-D).")
    add_target_options(p)
    add_decoding_options(p, DEFAULT_MAX_NEW_TOKENS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ift.inference.chat import ChatSession, chat_loop
    from ift.inference.target import resolve_target

    from ift.inference.tools import read_tools

    decoding = decoding_from(args)  # option mistakes before the model loads
    tools = read_tools(args.tools) if args.tools else None
    target = resolve_target(args.target, base=args.base, template=args.template, raw=args.raw)
    target.check_system(args.system)
    target.use_tools(tools)
    session = ChatSession(target, decoding, system=args.system)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass

        def read() -> str | None:
            try:
                return input("you> ")
            except EOFError:
                return None
    else:
        def read() -> str | None:
            line = sys.stdin.readline()
            return line if line else None
    return chat_loop(session, read, sys.stdout)
