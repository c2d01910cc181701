"""Peak RSS of a CPU training run under allocator settings and batch-length bucketing, against `ift estimate`.

    python bench/train_memory.py recipes/phrasebank_lora.yaml [--steps 25] [--variants default glibc pad64 mmap4 trim]
                                 [--data-map FILE|none]

Each variant trains the recipe for `--steps` optimizer steps in a fresh subprocess (validation loss only at the
last step, no test, no base comparison) and reports its peak RSS (ru_maxrss) and median logged tokens/s:

  default  ift as it ships (on CPU it fixes glibc's mmap threshold at 16 MiB: ift/training/allocator.py)
  glibc    glibc's malloc as it comes (ift's setting switched off; the threshold grows to 32 MB, so freed
           activations stay in arenas)
  padN     batches padded to a multiple of N tokens: fewer distinct tensor shapes for glibc to fit
  mmapN    mallopt(M_MMAP_THRESHOLD, N MiB): blocks of N MiB and more are mmapped and returned on free
  trim     malloc_trim(0) after every optimizer step
  arenaN   mallopt(M_ARENA_MAX, N): at most N malloc arenas (freed blocks of one thread's arena serve the others)
  keepgrad gradients kept allocated between steps and zeroed in place (zero_grad(set_to_none=False)) instead of
           allocated afresh in every backward, scattered among the activations

Variants combine with "+" (e.g. mmap16+arena1); each part starts from glibc as it comes.

`--data-map` (default tests/shared_data.yaml, relative to the repository root) is passed as data.data_map to the
runs and to `ift estimate`, so a recipe that names Hub datasets reads their local copies (docs/data.md); a
recipe's local sources are read as named; `--data-map none` reads the data as the recipe names it.

Figures and what was chosen: docs/benchmarks.md ("CPU memory").
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8  # glibc's malloc.h
DATA_MAP = "tests/shared_data.yaml"  # the shipped recipes' Hub datasets -> the copies in ../shared/data


def data_map_override(data_map: str) -> list[str]:
    """The recipe override that reads local copies of Hub datasets (none for `none`); a relative map is taken
    from the repository root, wherever the bench runs from."""
    if data_map.lower() == "none":
        return []
    path = Path(data_map).expanduser()
    return [f"data.data_map={path if path.is_absolute() else REPO / path}"]


def apply(part: str, libc) -> None:
    import ift.data.collate as collate

    if part.startswith("pad"):
        multiple, init = int(part[3:]), collate.Collator.__init__

        def padded(self, *args, **kwargs):
            init(self, *args, **{**kwargs, "pad_to_multiple_of": multiple})

        collate.Collator.__init__ = padded
    elif part.startswith("mmap"):
        assert libc.mallopt(M_MMAP_THRESHOLD, int(part[4:]) << 20), part
    elif part.startswith("arena"):
        assert libc.mallopt(M_ARENA_MAX, int(part[5:])), part
    elif part == "trim":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda *a: libc.malloc_trim(0))
    elif part == "keepgrad":
        import torch

        zero_grad = torch.optim.Optimizer.zero_grad
        torch.optim.Optimizer.zero_grad = lambda self, set_to_none=True: zero_grad(self, set_to_none=False)
    elif part not in ("default", "glibc"):
        raise SystemExit(f"unknown variant part {part!r}")


def child(recipe: str, variant: str, steps: int, out: str, data_map: str) -> None:
    sys.path.insert(0, str(REPO))
    from ift.recipe import load_recipe
    from ift.train import train

    libc = ctypes.CDLL("libc.so.6")
    if variant != "default":  # every other variant starts from glibc as it comes
        import ift.training.allocator as allocator

        allocator.return_large_blocks = lambda *a, **k: False
    for part in variant.split("+"):
        apply(part, libc)
    work = tempfile.mkdtemp(prefix=f"ift-mem-{variant}-")
    run = train(load_recipe(Path(recipe), [
        f"training.max_steps={steps}", f"training.output_dir={work}/run", "training.overwrite_output_dir=true",
        "training.eval_steps=100000", "training.save_steps=100000", "training.logging_steps=1",
        "evaluation.metrics=[loss]", "training.metric_for_best_model=loss", "evaluation.test=false",
        "evaluation.compare_base=false", *data_map_override(data_map)]))
    history = json.loads((run / "metrics.json").read_text())["history"]
    rates = [h["tokens_per_second"] for h in history if "tokens_per_second" in h][2:]
    Path(out).write_text(json.dumps({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                                     "tokens_per_second": statistics.median(rates) if rates else None}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--variants", nargs="+", default=["default", "glibc", "pad64", "mmap4", "trim"])
    parser.add_argument("--data-map", default=DATA_MAP, help="data map for the recipe's Hub datasets, relative to "
                        f"the repository root (default {DATA_MAP}); none: the data as the recipe names it")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.recipe, args.child[0], args.steps, args.child[2], args.data_map)
        return 0
    # the run below is on this CPU: estimate that run (fp32 where this CPU has no native bf16)
    estimate = subprocess.run([sys.executable, "-m", "ift", "estimate", args.recipe,
                               *data_map_override(args.data_map), "--device", "cpu"],
                              capture_output=True, text=True, cwd=REPO)
    peak_line = next((line for line in estimate.stdout.splitlines() if "peak" in line.lower()), "(no peak line)")
    print(f"ift estimate: {peak_line.strip()}")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    print("| variant | peak RSS GB | tokens/s (median of logged steps) |\n|---|---:|---:|")
    for variant in args.variants:
        out = tempfile.mktemp(suffix=".json")
        subprocess.run([sys.executable, __file__, args.recipe, "--steps", str(args.steps),
                        "--data-map", args.data_map, "--child", variant, "_", out], check=True, cwd=REPO, env=env,
                       stdout=subprocess.DEVNULL)
        r = json.loads(Path(out).read_text())
        print(f"| {variant} | {r['peak_rss_gb']:.2f} | {r['tokens_per_second']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
