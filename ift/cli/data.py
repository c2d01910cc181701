"""`ift data preview|stats RECIPE`: what the recipe's data section turns into, before any training."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ift.data.encoding import IGNORE
OPEN, CLOSE = "⟦", "⟧"  # marks the tokens that carry loss, readable without colour too


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="preview templated rows and their loss tokens; split, label and token stats")
    cmds = p.add_subparsers(dest="data_command", metavar="COMMAND")

    pre = cmds.add_parser("preview", help="rendered pairs with source, template and the tokens that carry loss")
    _common(pre)
    pre.add_argument("--split", default="train", choices=["train", "validation", "test"])
    pre.add_argument("--n", type=int, default=5, help="rows to show (drawn with the recipe's seed)")
    pre.set_defaults(func=run_preview)

    st = cmds.add_parser("stats", help="rows, templates, labels, token lengths, truncation, leaks and mixture")
    _common(st)
    st.add_argument("--json", action="store_true", help="print the full report as JSON")
    st.set_defaults(func=run_stats)

    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys")


def _prepare(args: argparse.Namespace) -> tuple[Any, Any]:
    from ift.data.prepare import build_splits
    from ift.recipe import load_recipe
    from ift.templates.library import TemplateLibrary

    recipe = load_recipe(args.recipe, args.overrides)
    library = TemplateLibrary(dirs=tuple(recipe.data.templates_dir))
    return recipe, build_splits(recipe.data, library)


def _tokenizer_and_kind(recipe: Any, prepared: Any) -> tuple[Any, str]:
    import ift.modeling.tokenizer as modeling
    from ift.data.chat_templates import setup_chat_tokenizer
    train = prepared.splits["train"]
    texts = (p + " " + c for p, c in zip(train["prompt"], train["completion"]))
    tokenizer = modeling.load_tokenizer(recipe.model, train_texts=texts)
    # as training sets it up: the recipe's chat template and special tokens
    setup_chat_tokenizer(tokenizer, recipe.data.chat_template, recipe.data.special_tokens)
    if recipe.model.kind != "auto":
        return tokenizer, recipe.model.kind
    resolve = getattr(modeling, "resolve_kind", None) or getattr(modeling, "_kind_for_tokenizer")
    return tokenizer, resolve(recipe.model)


# ------------------------------------------------------------------------------------- preview


def run_preview(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ift.data.reports import preview_rows

    recipe, prepared = _prepare(args)
    tokenizer, kind = _tokenizer_and_kind(recipe, prepared)
    rows = preview_rows(prepared.splits[args.split], tokenizer, kind, recipe.data, n=args.n, seed=recipe.data.seed)
    console = Console(highlight=False, soft_wrap=True)
    if not rows:
        console.print(f"split '{args.split}' has no rows")
        return 0
    console.print(f"{len(prepared.splits[args.split])} rows in {args.split}; showing {len(rows)} "
                  f"({kind} model; {OPEN}…{CLOSE} = tokens that carry loss)")
    for i, row in enumerate(rows, 1):
        _show_row(console, i, row, tokenizer, kind)
    return 0


def _show_row(console: Any, i: int, row: dict, tokenizer: Any, kind: str) -> None:
    from rich.rule import Rule
    from rich.text import Text

    title = f"#{i} · source {row['source']} · template {row['template'] or '(raw text, loss on every token)'}"
    console.print(Rule(style="dim"))
    console.print(Text(title, style="bold"))
    for label, value in (("prompt", row["prompt"]), ("completion", row["completion"])):
        text = Text(f"{label}: ", style="bold")
        text.append(value)
        console.print(text)
    if row["choices"]:
        console.print(Text("choices: ", style="bold").append(" | ".join(row["choices"])))
    labels = row["labels"]
    loss = sum(1 for t in labels if t != IGNORE)
    cut = {1: " — prompt truncated", 2: " — first window of a long text", 3: " — window of a long text"}.get(
        row.get("truncated", 0), "")
    console.print(Text(f"tokens: {len(row['input_ids'])} in, {loss} with loss{cut}", style="bold"))
    if kind == "seq2seq":
        console.print(Text("encoder: ").append(_decode(tokenizer, row["input_ids"]), style="dim"))
        decoder = Text("decoder: ")
        decoder.append(f"{OPEN}{_decode(tokenizer, [t for t in labels if t != IGNORE])}{CLOSE}", style="bold green")
        console.print(decoder)
        return
    console.print(_marked(tokenizer, row["input_ids"], [t != IGNORE for t in labels]))


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _marked(tokenizer: Any, ids: list[int], carries: list[bool]) -> Any:
    """The token sequence decoded in runs: runs without loss dim, runs with loss bracketed and green."""
    from rich.text import Text

    out = Text()
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or carries[end] != carries[start]:
            piece = _decode(tokenizer, ids[start:end])
            if carries[start]:
                out.append(f"{OPEN}{piece}{CLOSE}", style="bold green")
            else:
                out.append(piece, style="dim")
            start = end
    return out


# ------------------------------------------------------------------------------------- stats


def run_stats(args: argparse.Namespace) -> int:
    from ift.data.reports import describe
    from ift.data.tokenization import tokenize

    recipe, prepared = _prepare(args)
    tokenizer, kind = _tokenizer_and_kind(recipe, prepared)
    tokens, report = tokenize(prepared.splits, tokenizer, kind, recipe.data)
    stats = describe(prepared.report, prepared.splits, report)
    if kind == "causal" and len(tokens["train"]):
        from ift.data.collate import packing_efficiency, row_lengths

        # what data.packing: bfd would make of the training split
        stats["packing"] = packing_efficiency(row_lengths(tokens["train"]), recipe.data.max_length)
    if args.json:
        json.dump(stats, sys.stdout, indent=2)
        print()
        return 0
    _print_stats(stats)
    return 0


def _fmt_counts(counts: dict[str, int], limit: int = 6) -> str:
    items = list(counts.items())
    text = ", ".join(f"{k} {v:,}" for k, v in items[:limit])
    return text + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def _fmt_tokens(t: dict) -> str:
    ln = t.get("length") or {}
    text = f"{t.get('tokens', 0):,} tokens ({t.get('loss_tokens', 0):,} with loss)"
    if ln:
        text += f" · length p50 {ln['p50']:g} / p95 {ln['p95']:g} / max {ln['max']}"
    text += f" · truncated {t.get('truncated', 0)} · dropped {t.get('dropped', 0)}"
    if "turns_dropped" in t:
        text += (f" · earliest exchanges dropped in {t['turns_dropped']} conversations"
                 + (f", last reply cut in {t['reply_cut']}" if t.get("reply_cut") else ""))
    if t.get("split_into_windows"):
        text += f" · {t['split_into_windows']} long texts split into {t['windows']} windows"
    return text


def _print_stats(stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    settings = stats.get("tokenization", {})
    if settings:
        console.print("tokenization: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    for split, entry in stats["splits"].items():
        head = f"\n[bold]{split}[/]: {entry['rows']:,} rows"
        if entry.get("tokens"):
            head += " · " + _fmt_tokens(entry["tokens"])
        console.print(head)
        for name, src in entry["sources"].items():
            console.print(f"  [bold]{name}[/]: {src.get('rows', 0):,} rows · leaks removed {src.get('leaks_removed', 0)}"
                          f" · skipped by templates {sum(src.get('skipped', {}).values())}")
            console.print(f"    templates: {_fmt_counts(src.get('templates', {}), 4) or '-'}")
            if src.get("skipped"):
                console.print(f"    skipped:   {_fmt_counts(src['skipped'], 4)}")
            if src.get("labels"):
                console.print(f"    labels:    {_fmt_counts(src['labels'])}")
            if src.get("tokens"):
                console.print(f"    tokens:    {_fmt_tokens(src['tokens'])}")
            if src.get("conversation"):
                c, turns = src["conversation"], src["conversation"].get("turns") or {}
                console.print(f"    chat:      {c['conversations']:,} conversations · turns per conversation "
                              f"p50 {turns.get('p50', 0):g} / max {turns.get('max', 0)} · {c['assistant_turns']:,} "
                              f"assistant turns, {c.get('assistant_tokens') or 0:,} assistant tokens (with loss)")
    if stats.get("packing"):
        p = stats["packing"]
        console.print(f"\n[bold]packing[/] (data.packing: bfd): {p['rows']:,} training rows in {p['bins']:,} bins of "
                      f"{p['capacity']} tokens, {100 * p['efficiency']:.1f}% full")
    mix = stats.get("mixture", {})
    console.print(f"\n[bold]training mixture[/] ({mix.get('strategy')}): {mix.get('total', 0):,} rows")
    table = Table(pad_edge=False, box=None)
    for col in ("source", "weight", "available", "rows", "row share", "token share", "repeated"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for name, m in mix.get("sources", {}).items():
        table.add_row(name, "-" if m.get("weight") is None else f"{m['weight']:.2f}", f"{m['available']:,}",
                      f"{m['rows']:,}", f"{m['row_share']:.3f}",
                      f"{m['token_share']:.3f}" if "token_share" in m else "-",
                      f"×{m['repeated']}" if m.get("repeated") else "-")
    console.print(table)
    leaks = stats.get("leaks", {})
    if leaks.get("checked"):
        console.print(f"\n[bold]leaks[/]: {leaks['train']} training and {leaks['validation']} validation rows removed "
                      "(same prompt and completion as a validation or test row)")
    else:
        console.print("\n[bold]leaks[/]: not checked (data.leak_check: false)")
    for name, info in stats.get("sources", {}).items():
        carved = ", ".join(f"{s} {k:,}" for s, k in info.get("carved", {}).items())
        note = f" (stratified by {info['stratified_by']})" if info.get("stratified_by") else (
            f" (at random: {info['not_stratified']})" if info.get("not_stratified") else "")
        console.print(f"[bold]{name}[/]: {info['path']} · own splits {', '.join(info.get('own', []))}"
                      + (f" · carved {carved}{note}" if carved else ""))
