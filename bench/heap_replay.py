"""Where a CPU run's memory goes, step by step: glibc's heap against the tensors alive in it.

    python bench/heap_replay.py recipes/phrasebank_lora.yaml [KEY=VALUE ...] [--steps 40] [--longest-first] [--peak]
                                [--trim-every N] [--data-map FILE|none]

Sets the recipe's run up as `ift train` does (on the CPU that includes the pass on its longest batch and the
padding of batch lengths: ift/training/allocator.py, ift.data.collate.train_padding), then trains on the first
`--steps` batches of epoch 0 in the run's own order followed by the epoch's longest batch (the batch that, in a
whole run, may come late: step 108 of 117 for PhraseBank). `--longest-first` trains on the longest batch first
too. After every step it prints the peak RSS so far (VmHWM), glibc's heap (`mallinfo2`: arena = bytes the heap
holds from the OS, inuse = bytes of live blocks at the step's end) and, at the end, tokens/s of the steps in
between (real tokens: padding not counted). `--peak` samples `mallinfo2` every 2 ms during each step, which
gives the live bytes at the step's peak (what `ift estimate` estimates) beside the heap's peak (the sampler
slows the steps: leave it off for tokens/s).

KEY=VALUE are recipe overrides (e.g. data.pad_to_multiple_of=null). `--data-map` (default tests/shared_data.yaml,
relative to the repository root) is passed as data.data_map, so a recipe that names Hub datasets reads their local
copies (docs/data.md); a recipe's local sources are read as named; `--data-map none` reads the data as the recipe
names it. Figures: docs/benchmarks.md ("CPU memory").
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
import threading
import time
from pathlib import Path

from train_memory import DATA_MAP, data_map_override  # bench/ is this script's folder

REPO = Path(__file__).resolve().parents[1]


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--longest-first", action="store_true")
    parser.add_argument("--peak", action="store_true")
    parser.add_argument("--trim-every", type=int, default=0, help="malloc_trim(0) after every N steps (0: never)")
    parser.add_argument("--data-map", default=DATA_MAP, help="data map for the recipe's Hub datasets, relative to "
                        f"the repository root (default {DATA_MAP}); none: the data as the recipe names it")
    args = parser.parse_intermixed_args()

    sys.path.insert(0, str(REPO))
    from ift.recipe import load_recipe
    from ift.train import FineTune

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2

    def status() -> dict:
        out = {}
        for line in open("/proc/self/status"):
            if line.startswith(("VmHWM", "VmRSS")):
                out[line.split(":")[0]] = round(int(line.split()[1]) / 1e6, 2)
        m = libc.mallinfo2()
        return {**out, "heap": round((m.arena + m.hblkhd) / 1e9, 2), "inuse": round((m.uordblks + m.hblkhd) / 1e9, 2)}

    work = tempfile.mkdtemp(prefix="ift-heap-")
    recipe = load_recipe(args.recipe, [f"training.output_dir={work}/run", *data_map_override(args.data_map),
                                       *args.overrides])
    ft = FineTune(recipe)
    ft.setup()
    ft.train_dl.set_epoch(0)
    batches = list(ft.train_dl)
    widths = [b["input_ids"].shape[1] for b in batches]
    longest = max(range(len(batches)), key=widths.__getitem__)
    order = [i for i in range(len(batches)) if i != longest][:args.steps] + [longest]
    if args.longest_first:
        order.insert(0, longest)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["attention_mask"].numel() for b in batches)
    print(f"{len(batches)} batches, {len(set(widths))} widths, longest {widths[longest]}, padding "
          f"{100 * (1 - real / padded):.1f}% of the batch tokens; after setup: {status()}", flush=True)

    peak = {"heap": 0, "inuse": 0}
    sampling = args.peak

    def sample() -> None:
        while sampling:
            m = libc.mallinfo2()
            peak["heap"] = max(peak["heap"], m.arena + m.hblkhd)
            peak["inuse"] = max(peak["inuse"], m.uordblks + m.hblkhd)
            time.sleep(0.002)

    if args.peak:
        threading.Thread(target=sample, daemon=True).start()
    ft.loss_model.train()
    seconds = tokens = 0
    for k, i in enumerate(order):
        peak.update(heap=0, inuse=0)
        start = time.perf_counter()
        ft.train_window([batches[i]])
        if args.trim_every and (k + 1) % args.trim_every == 0:
            libc.malloc_trim(0)
        took = time.perf_counter() - start
        if 0 < k < len(order) - 1:
            seconds, tokens = seconds + took, tokens + int(batches[i]["attention_mask"].sum())
        during = f" during: heap {peak['heap'] / 1e9:.2f} GB, live {peak['inuse'] / 1e9:.2f} GB" if args.peak else ""
        print(f"step {k + 1:3d} width {widths[i]:4d} {took:5.1f} s {status()}{during}", flush=True)
    sampling = False
    print(f"tokens/s (steps between the first and the last): {tokens / max(seconds, 1e-9):.1f}; "
          f"peak RSS {status()['VmHWM']} GB")


if __name__ == "__main__":
    main()
