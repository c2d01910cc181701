"""Padded batches against best-fit-decreasing bins (`data.packing: bfd`): how full the tensors are, and tokens/s.

    python bench/packing.py [--recipes recipes/dialogsum.yaml recipes/alpaca.yaml] [--rows 800] [--steps 6]
                            [--data-map FILE|none] [--json F]

For each recipe, two runs of ift's own loop (`ift.train.FineTune`), one after the other in this process, on the
same first `--rows` training rows (the recipe's own model, LoRA, batch size and max_length):
  padded   data.packing: false, each batch padded to its longest row (on the CPU to a multiple of 16)
  bfd      data.packing: bfd, batches of per_device_train_batch_size bins of at most max_length tokens
           (group_by_length off: bins are not grouped)
Reported: fill (the training split's tokens / the tokens of every batch tensor of one epoch, from the loader
alone), and the median tokens/s (real tokens, not padding) of `--steps` optimizer steps after the first.
The recipes name Hub datasets; `--data-map` (default tests/shared_data.yaml) reads their local copies.
Figures: docs/benchmarks.md ("Packing").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train_memory import DATA_MAP, data_map_override  # noqa: E402  (bench/ is this script's folder)


def fresh_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def measure(recipe_path: str, packing: str, rows: int, steps: int, data_map: str, work: Path) -> dict:
    from ift.data.collate import row_lengths
    from ift.recipe import load_recipe
    from ift.train import FineTune

    recipe = load_recipe(recipe_path, [
        *data_map_override(data_map), f"data.packing={packing}", f"data.sources.0.max_rows={rows}",
        *(["data.group_by_length=false"] if packing == "bfd" else []),
        f"training.output_dir={work / Path(recipe_path).stem / packing}", "training.overwrite_output_dir=true",
        "training.report_to=[none]", "training.gradient_accumulation_steps=1", "evaluation.compare_base=false"])
    fresh_accelerate()
    run = FineTune(recipe)
    try:
        run.setup()
        real = sum(row_lengths(run.tokens["train"]))
        tensor = sum(batch["input_ids"].numel() for batch in run.train_dl)
        seconds, tokens = [], []
        batches = iter(run.train_dl)
        run.loss_model.train()
        for _ in range(steps + 1):
            batch = next(batches)
            started = time.perf_counter()
            done = run.train_window([batch])
            seconds.append(time.perf_counter() - started)
            tokens.append(done.seq_tokens if packing == "false" else _real_tokens(batch, run.tokenizer))
        rates = [t / s for t, s in zip(tokens[1:], seconds[1:])]
        return {"recipe": recipe_path, "packing": packing, "rows": len(run.tokens["train"]),
                "batches": len(run.train_dl), "batch_size": recipe.training.per_device_train_batch_size,
                "max_length": recipe.data.max_length, "fill": real / tensor,
                "tokens_per_second": statistics.median(rates), "steps": steps}
    finally:
        run.cleanup()
        fresh_accelerate()


def _real_tokens(batch: dict, tokenizer) -> int:
    """Tokens of a packed batch that are not the padding pseudo-example at the end of a row."""
    import torch

    ids, positions = batch["input_ids"], batch["position_ids"]
    # the padding pseudo-example is the row's last run of pad ids whose positions restart at 0
    total = 0
    for row_ids, row_pos in zip(ids, positions):
        starts = (row_pos == 0).nonzero().flatten().tolist()
        last = starts[-1]
        tail = row_ids[last:]
        pad = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else -1
        total += len(row_ids) - (len(tail) if bool(torch.all(tail == pad)) and last > 0 else 0)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["recipes/dialogsum.yaml", "recipes/alpaca.yaml"])
    parser.add_argument("--rows", type=int, default=800, help="training rows of each recipe's first source")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after one untimed)")
    parser.add_argument("--data-map", default=DATA_MAP, help=f"data map (default {DATA_MAP}); none: as named")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="packing-"))
    results = []
    for recipe in args.recipes:
        for packing in ("false", "bfd"):
            r = measure(str(REPO / recipe) if not Path(recipe).is_absolute() else recipe, packing, args.rows,
                        args.steps, args.data_map, work)
            results.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n| recipe | packing | rows | batches/epoch | fill | tokens/s |\n|---|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {Path(r['recipe']).stem} | {r['packing']} | {r['rows']} | {r['batches']} | {100 * r['fill']:.1f}% "
              f"| {r['tokens_per_second']:.0f} |")
    for recipe in args.recipes:
        pad, bfd = (r for r in results if r["recipe"].endswith(Path(recipe).name))
        print(f"{Path(recipe).stem}: bfd / padded tokens/s {bfd['tokens_per_second'] / pad['tokens_per_second']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
