"""The GPU check: one command that proves ift on a CUDA device and measures it against TRL, in one run.

    python bench/gpu_check.py [--device cuda|cpu] [--size full|tiny] [--only correctness,qlora,...]
    bash bench/gpu_check.sh            # the same on a lent GPU machine, installing wheels/ first

Parts (each writes a section of the JSON; a failing part is recorded and the others still run):
  1. correctness  recipes/tiny.yaml end to end (from scratch, bf16 autocast on CUDA): loss falls, validation
                  accuracy above chance, and a stop/resume at a save step ends with the same weights
  2. qlora        a Llama-shaped model (~1B parameters on `full`, random weights, no download) in 4-bit NF4,
                  LoRA on all linear layers, 30 steps: loss falls; peak CUDA memory against `ift estimate`;
                  then a short run whose best validation step is not its last ends with final/, its
                  checkpoints hold the adapter only, and a resume from a cut checkpoint ends with the same adapter
  3. throughput   ift vs TRL's SFTTrainer (completion-only loss; padding-free where TRL supports it; Liger
                  kernels when liger-kernel imports), LoRA and full fine-tuning, SmolLM2-135M's shape and the
                  1B shape, bf16: tokens/s, peak memory, MFU against the measured bf16 matmul peak
  4. packing      the same rows padded (`data.packing: false`), padding-free (`true`) and in best-fit-decreasing
                  bins of max_length tokens (`bfd`), SmolLM2-135M's shape: real (non-padding) tokens/s of
                  ift's loop for each, and each packed batch's loss equal to the padded batch's on the same rows
  5. liger        `model.liger` (liger-kernel's Triton kernels; CUDA only, skipped on --device cpu): on a tiny
                  Llama-style model in bf16 autocast, ift's loss and gradients against Liger's fused linear
                  cross-entropy alone and with its RMSNorm/RoPE/SwiGLU, equal to bf16 tolerance (QLoRA too);
                  then tokens/s and peak memory of ift's loop without and with (`auto`, which must turn on), on
                  SmolLM2-135M's shape with its 49,152-token vocabulary; rows as raw text, every token carrying
                  loss (where a fused loss matters). Each side in a fresh process: Liger patches transformers'
                  Llama module for the whole process
  6. eval         rank classification and greedy generation, examples/s, on the 1B shape
  7. fsdp         recipes/tiny.yaml under `accelerate launch` with FSDP2 (every GPU of the machine; one on the
                  H200) and accuracy evaluation during training: Accelerate runs FSDP only on CUDA (on CPU it
                  falls back to DDP), so this is where ift's sharded evaluation path (ift.train.full_weights)
                  runs under Accelerate itself, with recipes/accelerate/fsdp_2gpu.yaml's settings (tied head,
                  cpu_ram_efficient_loading): one unit per decoder layer, the head tied; on --device cpu it is
                  recorded as skipped (tests/test_train.py runs that preparation on one gloo process)
  8. deepspeed    recipes/tiny.yaml under ZeRO-2 and ZeRO-3 (one process per GPU) with max_grad_norm 0.5:
                  final/ written and loss falls; skipped on --device cpu or where deepspeed does not import

The other parts' ift runs keep the recipe default `model.liger: auto`: where liger-kernel is installed (`--prepare`
carries it) they train with Liger's kernels on CUDA, as TRL's side does, and the FSDP and ZeRO-2 runs test them under
sharding (ZeRO-3 turns them off).

`--device cpu --size tiny` runs every part at toy sizes in a few minutes (tests/test_gpu_check.py does), so
GPU minutes go to measuring, not debugging. Output: gpu_check.json and gpu_check.log under $OUT when set,
else bench/out/.

Shapes are built from configs with random weights (no network); rows are synthetic classification prompts
from a fixed seed, the same for every configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARTS = ("correctness", "qlora", "throughput", "packing", "liger", "eval", "fsdp", "deepspeed")
SHAPES = {  # Llama-family configs: SmolLM2-135M's and a ~1B one (Llama-3.2-1B-like, smaller vocabulary)
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
}
WORDS = ("alpha beta gamma delta market shares profit loss revenue quarter growth decline bank stock bond "
         "rate inflation outlook guidance merger dividend earnings forecast").split()
LABELS = ("negative", "neutral", "positive")
TEMPLATES = """dataset: gpu_check
templates:
  0e4b1c6a-1111-4b8e-9a51-7d3f2b1c0e01: !Template
    answer_choices: negative ||| neutral ||| positive
    id: 0e4b1c6a-1111-4b8e-9a51-7d3f2b1c0e01
    jinja: "Text: {{text}}\\nIs the sentiment negative, neutral or positive? ||| {{answer_choices[label]}}"
    metadata: !TemplateMetadata
      choices_in_prompt: true
      languages: [en]
      metrics: [Accuracy]
      original_task: true
    name: sentiment
    reference: ''
"""


class Log:
    def __init__(self, path: Path):
        self.file = path.open("w")

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


# ---------------------------------------------------------------- shared pieces


def sizes(args) -> dict:
    tiny = args.size == "tiny"
    return dict(rows=64 if tiny else 2048, words=12 if tiny else 160, steps=4 if tiny else 30,
                batch=4 if tiny else 16, bench_steps=3 if tiny else 20, warmup=1 if tiny else 5,
                eval_rows=16 if tiny else 512, shapes=["tiny"] if tiny else ["135m", "1b"],
                qlora_shape="tiny" if tiny else "1b", gen_tokens=8 if tiny else 64)


def write_data(work: Path, n: int, words: int, seed: int = 0) -> tuple[Path, Path]:
    """Synthetic rows whose label is a function of their words (learnable), split train/validation/test."""
    rng = random.Random(seed)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", n), ("validation", max(8, n // 8)), ("test", max(8, n // 8))):
        with (data / f"{split}.jsonl").open("w") as fh:
            for _ in range(rows):
                label = rng.randrange(3)
                text = " ".join(rng.choice(WORDS) for _ in range(words)) + f" {('down', 'flat', 'up')[label]}"
                fh.write(json.dumps({"text": text, "label": label}) + "\n")
    templates = work / "templates" / "gpu_check"
    templates.mkdir(parents=True, exist_ok=True)
    (templates / "templates.yaml").write_text(TEMPLATES)
    return data, work / "templates"


def tokenizer_folder(work: Path, data: Path) -> Path:
    """A BPE tokenizer trained on the synthetic rows (the shapes' vocabulary is set from it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = work / "tokenizer"
    if folder.is_dir():
        return folder
    texts = [json.loads(line)["text"] for line in (data / "train.jsonl").read_text().splitlines()]
    texts += [f"Is the sentiment negative, neutral or positive? {x}" for x in LABELS]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2048, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


def base_model(work: Path, shape: str, tokenizer: Path, dtype: str = "bfloat16", vocab: int | None = None) -> Path:
    """A 'pretrained' Llama of the given shape with random weights, saved like a Hub checkpoint; `vocab` rows of
    embeddings (default: the tokenizer's; more stand for a real model's vocabulary, the extra rows never seen)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = work / (f"base-{shape}" + (f"-v{vocab}" if vocab else ""))
    if folder.is_dir():
        return folder
    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=max(vocab or 0, len(tok)), pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPES[shape])
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def recipe(work: Path, data: Path, templates: Path, name: str, *, model: dict, adapter: dict | None = None,
           **training):
    from ift.recipe import Recipe

    t = {"output_dir": str(work / "runs" / name), "seed": 7, "per_device_train_batch_size": 4,
         "per_device_eval_batch_size": 16, "learning_rate": 2e-4, "lr_scheduler_type": "constant",
         "logging_steps": 1, "report_to": ["none"], "overwrite_output_dir": True, **training}
    evaluation = t.pop("evaluation", {"metrics": ["loss"], "test": False})
    packing = t.pop("packing", False)
    # text: the rows' text as raw text, loss on every token (long completions), not the classification template
    source = {"name": "synthetic", "path": str(data), "format": "text"} if t.pop("text", False) else \
        {"name": "synthetic", "path": str(data), "templates": ["gpu_check/sentiment"]}
    return Recipe.model_validate({
        "model": model, "adapter": adapter or {"method": "none"},
        "data": {"sources": [source],
                 "templates_dir": [str(templates)], "max_length": 512, "seed": 1, "packing": packing},
        "training": t, "evaluation": evaluation,
    })


def peak_memory(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def losses(run: Path) -> list[float]:
    history = json.loads((run / "metrics.json").read_text())["history"]
    return [h["train_loss"] for h in history if "train_loss" in h]


def fresh_accelerate() -> None:
    """Several in-process runs: each starts from a clean Accelerate state."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def train(r) -> Path:
    from ift.train import train as ift_train

    fresh_accelerate()
    try:
        return ift_train(r)
    finally:
        fresh_accelerate()


class StepTimer:
    """Timestamps every optimizer step (any optimizer: ift's and TRL's alike)."""

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.times: list[float] = []
        self.handle = register_optimizer_step_post_hook(lambda *a: self.times.append(time.perf_counter()))
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def step_seconds(self, warmup: int) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])][warmup:]
        return sorted(gaps)[len(gaps) // 2] if gaps else float("nan")


def matmul_peak(device: str, dtype: str) -> float:
    """Best FLOP/s of large square matmuls: the MFU denominator."""
    import torch

    n = 4096 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    best = 0.0
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 10 * 2 * n**3 / (time.perf_counter() - t0))
    return best


# ---------------------------------------------------------------- the parts


def part_correctness(args, work: Path, log: Log) -> dict:
    from safetensors.torch import load_file

    from ift.recipe import load_recipe

    s = sizes(args)
    steps = 40 if args.size == "full" else 8
    bf16 = ["training.mixed_precision=bf16"] if args.device == "cuda" else []
    common = [f"training.max_steps={steps}", f"training.save_steps={steps // 2}", f"training.eval_steps={steps}",
              "training.report_to=[none]", "training.warmup_ratio=0.0", "training.logging_steps=1", *bf16]
    if args.size == "tiny":
        common += ["model.config.hidden_size=32", "model.config.intermediate_size=64", "model.vocab_size=300"]
    a = train(load_recipe(REPO / "recipes" / "tiny.yaml", [f"training.output_dir={work / 'tiny-a'}", *common]))
    b_recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"training.output_dir={work / 'tiny-b'}", *common])
    b = train(b_recipe)
    shutil.rmtree(b / "checkpoints" / f"step-{steps}")
    shutil.rmtree(b / "final")
    from ift.train import train as ift_train

    fresh_accelerate()
    ift_train(b_recipe, resume="auto")
    fresh_accelerate()
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    resume_exact = wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)
    metrics = json.loads((a / "metrics.json").read_text())
    curve = losses(a)
    accuracy = metrics.get("test", {}).get("accuracy")
    out = {"first_loss": curve[0], "last_loss": curve[-1], "loss_falls": curve[-1] < curve[0],
           "test_accuracy": accuracy, "chance": 1 / 3, "resume_exact": resume_exact, "steps": steps,
           "bf16": bool(bf16)}
    # accuracy above chance is asked of the real run; a few toy steps on CPU only prove the path works
    out["ok"] = out["loss_falls"] and resume_exact and (args.size == "tiny" or (accuracy or 0) > 1 / 3)
    log("correctness:", json.dumps(out))
    del s
    return out


def part_qlora(args, work: Path, log: Log, data: Path, templates: Path) -> dict:
    from ift.estimate.report import estimate

    s = sizes(args)
    base = base_model(work, s["qlora_shape"], tokenizer_folder(work, data))
    r = recipe(work, data, templates, "qlora", model={"name_or_path": str(base), "dtype": "bfloat16"},
               adapter={"method": "qlora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear",
                        "compute_dtype": "bfloat16"},
               max_steps=s["steps"], save_steps=10_000, eval_steps=10_000, per_device_train_batch_size=s["batch"],
               learning_rate=2e-4 if args.size == "full" else 2e-3,
               mixed_precision="bf16" if args.device == "cuda" else "no", gradient_checkpointing=args.size == "full")
    reset_peak(args.device)
    run = train(r)
    peak = peak_memory(args.device)
    est = estimate(r, with_data=True, cache_dir=work / "estimate", device=args.device)
    curve = losses(run)
    out = {"shape": s["qlora_shape"], "steps": s["steps"], "first_loss": curve[0], "last_loss": curve[-1],
           "loss_falls": curve[-1] < curve[0], "peak_memory": peak, "estimate_peak": est.memory.peak,
           "peak_over_estimate": peak / est.memory.peak if est.memory.peak else None,
           "memory_kind": "cuda max_memory_allocated" if args.device == "cuda" else "process peak RSS"}
    out.update(_qlora_best_and_resume(args, work, base, data, templates))
    out["ok"] = out["loss_falls"] and out["best_final"] and out["adapter_only_checkpoints"] and out["resume_exact"]
    log("qlora:", json.dumps(out))
    return out


def _qlora_best_and_resume(args, work: Path, base: Path, data: Path, templates: Path) -> dict:
    """Best step not the last (loss, greater is better: the first evaluation wins) -> final/ from it; then the run
    cut back to its second checkpoint and resumed ends with the same adapter."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ift.train import train as ift_train

    steps = 8 if args.size == "full" else 4
    r = recipe(work, data, templates, "qlora-best", model={"name_or_path": str(base), "dtype": "bfloat16"},
               adapter={"method": "qlora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear",
                        "compute_dtype": "bfloat16"},
               max_steps=steps, save_steps=2, eval_steps=2, save_total_limit=10, metric_for_best_model="loss",
               greater_is_better=True, per_device_train_batch_size=4, learning_rate=2e-3,
               mixed_precision="bf16" if args.device == "cuda" else "no")
    run = train(r)
    best = json.loads((run / "metrics.json").read_text()).get("best") or {}
    first = load_file(run / "final" / "adapter_model.safetensors")
    with safe_open(str(run / "checkpoints" / "step-2" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    for step in range(4, steps + 1, 2):
        shutil.rmtree(run / "checkpoints" / f"step-{step}", ignore_errors=True)
    shutil.rmtree(run / "final")
    fresh_accelerate()
    try:
        ift_train(r, resume="auto")
    finally:
        fresh_accelerate()
    again = load_file(run / "final" / "adapter_model.safetensors")
    return {"best_step": best.get("step"), "best_final": best.get("step") == 2 and bool(first),
            "adapter_only_checkpoints": bool(keys) and all("lora_" in k for k in keys),
            "checkpoint_bytes": (run / "checkpoints" / "step-2" / "model.safetensors").stat().st_size,
            "resume_exact": first.keys() == again.keys() and all(bool((first[k] == again[k]).all()) for k in first)}


def _trl_run(args, work: Path, base: Path, data: Path, method: str, s: dict) -> dict:
    """TRL's SFTTrainer, tuned the way an expert would: completion-only loss, padding-free where supported,
    Liger kernels when installed, bf16 on CUDA, fused AdamW."""
    import importlib.util

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = load_dataset("json", data_files=str(data / "train.jsonl"), split="train")
    prompts = rows.map(lambda r: {"prompt": f"Text: {r['text']}\nIs the sentiment negative, neutral or positive?",
                                  "completion": " " + LABELS[r["label"]]}, remove_columns=rows.column_names)
    cuda = args.device == "cuda"
    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    config = SFTConfig(output_dir=str(work / f"trl-{method}"), per_device_train_batch_size=s["batch"],
                       max_steps=s["bench_steps"] + s["warmup"] + 1, learning_rate=2e-4, lr_scheduler_type="constant",
                       logging_steps=1000, save_strategy="no", report_to=[], bf16=cuda, use_cpu=not cuda,
                       completion_only_loss=True, padding_free=cuda, use_liger_kernel=liger, optim="adamw_torch_fused",
                       dataloader_num_workers=0, seed=7, max_length=512)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                 attn_implementation="flash_attention_2" if cuda and config.padding_free
                                                 and importlib.util.find_spec("flash_attn") else None)
    peft_config = None
    if method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=prompts, peft_config=peft_config,
                         processing_class=AutoTokenizer.from_pretrained(base))
    reset_peak(args.device)
    with StepTimer() as timer:
        trainer.train()
    return {"step_seconds": timer.step_seconds(s["warmup"]), "peak_memory": peak_memory(args.device),
            "liger": liger, "padding_free": config.padding_free}


def _ift_run(args, work: Path, base: Path, data: Path, templates: Path, method: str, s: dict) -> dict:
    adapter = {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"} \
        if method == "lora" else None
    r = recipe(work, data, templates, f"ift-{method}", model={"name_or_path": str(base), "dtype": "float32"},
               adapter=adapter, max_steps=s["bench_steps"] + s["warmup"] + 1, save_steps=10_000, eval_steps=10_000,
               per_device_train_batch_size=s["batch"], mixed_precision="bf16" if args.device == "cuda" else "no")
    reset_peak(args.device)
    with StepTimer() as timer:
        train(r)
    return {"step_seconds": timer.step_seconds(s["warmup"]), "peak_memory": peak_memory(args.device)}


def part_throughput(args, work: Path, log: Log, data: Path, templates: Path) -> dict:
    from transformers import AutoConfig

    s = sizes(args)
    tokens_per_row = _mean_tokens(work, data)
    peak = matmul_peak(args.device, "bfloat16" if args.device == "cuda" else "float32")
    out: dict = {"matmul_peak_flops": peak, "tokens_per_row": tokens_per_row, "configs": {}}
    for shape in s["shapes"]:
        base = base_model(work, shape, tokenizer_folder(work, data))
        n = _parameters(AutoConfig.from_pretrained(base))
        for method in ("lora", "full"):
            name = f"{shape}-{method}"
            ift = _ift_run(args, work, base, data, templates, method, s)
            trl = _trl_run(args, work, base, data, method, s)
            tok = s["batch"] * tokens_per_row
            k = 4 if method == "lora" else 6  # LoRA: no weight-gradient matmuls on the frozen base
            entry = {side: {**res, "tokens_per_second": tok / res["step_seconds"],
                            "mfu": tok / res["step_seconds"] * k * n / peak}
                     for side, res in (("ift", ift), ("trl", trl))}
            entry["ift_over_trl"] = entry["ift"]["tokens_per_second"] / entry["trl"]["tokens_per_second"]
            entry["memory_ratio"] = entry["ift"]["peak_memory"] / max(entry["trl"]["peak_memory"], 1)
            out["configs"][name] = entry
            log(f"throughput {name}:", json.dumps(entry))
    out["ok"] = all(math.isfinite(c["ift"]["tokens_per_second"]) for c in out["configs"].values())
    return out


def part_packing(args, work: Path, log: Log, data: Path, templates: Path) -> dict:
    import torch

    from ift.data.collate import FEATURES, Collator, pack_bins

    s = sizes(args)
    shape = s["shapes"][0]
    base = base_model(work, shape, tokenizer_folder(work, data))
    out: dict = {"shape": shape, "batch": s["batch"], "modes": {}}
    for packing in ("false", "true", "bfd"):
        r = recipe(work, data, templates, f"packing-{packing}", model={"name_or_path": str(base), "dtype": "float32"},
                   max_steps=10_000, save_steps=10_000, eval_steps=10_000, per_device_train_batch_size=s["batch"],
                   packing={"false": False, "true": True, "bfd": "bfd"}[packing],
                   mixed_precision="bf16" if args.device == "cuda" else "no")
        with ift_run(r) as run:
            out["modes"][packing] = timed_steps(run, s["bench_steps"], s["warmup"])
            if packing == "false":
                # the same rows three ways, one model: each example is scored as in the padded batch
                rows = [run.tokens["train"][i] for i in range(2 * s["batch"])]
                rows = [{k: row[k] for k in FEATURES if k in row} for row in rows]
                bins = [[rows[i] for i in b] for b in pack_bins([len(x["input_ids"]) for x in rows], 512)]
                batches = {"false": Collator(run.tokenizer, "causal")(rows),
                           "true": Collator(run.tokenizer, "causal", packing=True)(rows),
                           "bfd": Collator(run.tokenizer, "causal", packing="bfd")(bins)}
                run.loss_model.eval()
                means = {}
                with torch.no_grad(), run.accelerator.autocast():
                    for mode, batch in batches.items():
                        total, count = run.loss_model(**{k: v.to(run.accelerator.device) for k, v in batch.items()})
                        means[mode] = float(total) / float(count)
                out["mean_loss"] = means
    padded = out["modes"]["false"]["tokens_per_second"]
    for packing in ("true", "bfd"):
        out["modes"][packing]["over_padded"] = out["modes"][packing]["tokens_per_second"] / padded
    out["loss_difference"] = max(abs(out["mean_loss"][m] - out["mean_loss"]["false"]) for m in ("true", "bfd"))
    # bf16 autocast on CUDA rounds the padded and packed matmuls differently; fp32 on the CPU agrees closely
    out["ok"] = out["loss_difference"] < (2e-2 if args.device == "cuda" else 1e-3)
    log("packing:", json.dumps(out))
    return out


@contextlib.contextmanager
def ift_run(r):
    """ift's training run set up (data, model, loaders, optimizer) without training: its steps are timed here."""
    from ift.train import FineTune

    fresh_accelerate()
    run = FineTune(r)
    try:
        run.setup()
        yield run
    finally:
        run.cleanup()
        fresh_accelerate()


def timed_steps(run, steps: int, warmup: int) -> dict:
    """`steps` optimizer steps of one micro-batch after `warmup` untimed ones (cycling through the epoch): real
    tokens/s (padding and packing's padding pseudo-example not counted), median seconds per step, peak memory."""
    import torch

    cuda = run.accelerator.device.type == "cuda"
    pad = run.tokenizer.pad_token_id
    batches = list(run.train_dl)
    seconds, tokens = [], []
    run.loss_model.train()
    reset_peak("cuda" if cuda else "cpu")
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        run.train_window([batch])
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            seconds.append(time.perf_counter() - started)
            tokens.append(real_tokens(batch, pad))
    return {"tokens_per_second": sum(tokens) / sum(seconds), "step_seconds": sorted(seconds)[len(seconds) // 2],
            "tokens_per_step": sum(tokens) / len(tokens), "batches_per_epoch": len(batches),
            "peak_memory": peak_memory("cuda" if cuda else "cpu")}


def real_tokens(batch: dict, pad_id: int | None) -> int:
    """Tokens of a batch that are not padding: a padded batch's attention mask; in a packed row, all but the
    padding pseudo-example at its end (its ids all pad, its positions restarting)."""
    import torch

    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    total = 0
    for ids, positions in zip(batch["input_ids"], batch["position_ids"]):
        last = int((positions == 0).nonzero().flatten()[-1])
        tail = ids[last:]
        padded = last > 0 and pad_id is not None and bool(torch.all(tail == pad_id))
        total += len(ids) - (len(tail) if padded else 0)
    return total


def part_liger(args, work: Path, log: Log, data: Path, templates: Path) -> dict:
    import importlib.util
    import multiprocessing

    if args.device != "cuda":
        out = {"ok": True, "skipped": "Liger's kernels are Triton kernels that run only on CUDA; tests/test_liger.py "
                                      "checks model.liger's decision and refusals on the CPU"}
        log("liger:", json.dumps(out))
        return out
    if importlib.util.find_spec("liger_kernel") is None:
        out = {"ok": False, "error": "liger-kernel is not installed: `bash bench/gpu_check.sh --prepare` carries its "
                                     "wheel in bench/wheels"}
        log("liger:", json.dumps(out))
        return out
    s = sizes(args)
    tok = tokenizer_folder(work, data)
    tiny = base_model(work, "tiny", tok, vocab=49152)
    speed = base_model(work, s["shapes"][0], tok, vocab=49152)
    jobs = [("equal", "none", tiny), ("equal", "qlora", tiny), ("off", "none", speed), ("auto", "none", speed)]
    results = {}
    # each in a fresh interpreter: Liger replaces transformers' Llama functions and classes for the whole process
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for mode, adapter, base in jobs:
            results[f"{mode}-{adapter}"] = pool.apply(liger_child, (mode, adapter, str(base), str(work), str(data),
                                                                    str(templates), args.size))
    out = {"equal": results["equal-none"], "equal_qlora": results["equal-qlora"], "without": results["off-none"],
           "with": results["auto-none"]}
    out["with_over_without"] = out["with"]["tokens_per_second"] / out["without"]["tokens_per_second"]
    out["memory_ratio"] = out["with"]["peak_memory"] / max(out["without"]["peak_memory"], 1)
    out["ok"] = (out["equal"]["ok"] and out["equal_qlora"]["ok"] and out["with"]["liger"] is True
                 and out["without"]["liger"] is False)
    log("liger:", json.dumps(out))
    return out


def liger_child(mode: str, adapter: str, base: str, work: str, data: str, templates: str, size: str) -> dict:
    """One side of the liger part, in its own process. `equal`: one batch's summed loss and gradients with ift's
    head, with Liger's fused linear cross-entropy alone, then with Liger's kernels applied too; `off`/`auto`: ift's
    loop timed with model.liger false / auto."""
    import torch

    from ift.training.liger import LigerChoice, apply_liger
    from ift.training.loss import CompletionLoss

    class Args:
        device = "cuda"

    Args.size = size
    s = sizes(Args)
    lora = {"method": "qlora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear",
            "compute_dtype": "bfloat16"} if adapter == "qlora" else None
    r = recipe(Path(work), Path(data), Path(templates), f"liger-{mode}-{adapter}",
               model={"name_or_path": base, "dtype": "bfloat16" if lora else "float32",
                      "liger": "auto" if mode == "auto" else False},
               adapter=lora, max_steps=10_000, save_steps=10_000, eval_steps=10_000, text=True,
               per_device_train_batch_size=s["batch"], mixed_precision="bf16")
    with ift_run(r) as run:
        if mode != "equal":
            return {**timed_steps(run, s["bench_steps"], s["warmup"]), "liger": run.recipe.model.liger}
        acc = run.accelerator
        model = acc.unwrap_model(run.loss_model).model
        batch = {k: v.to(acc.device) for k, v in next(iter(run.train_dl)).items()}
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_and_grads(fused: bool) -> tuple[float, torch.Tensor]:
            model.zero_grad(set_to_none=True)
            with acc.autocast():
                total, count = CompletionLoss(model, "causal", fused_loss=fused)(**batch)
            (total / count).backward()
            grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten()
                               for p in params])
            return float(total.detach()) / float(count), grads

        model.train()
        ift_loss, ift_grads = loss_and_grads(False)
        fused_loss, fused_grads = loss_and_grads(True)  # Liger's fused head and loss on ift's loss positions
        liger_recipe = run.recipe.model_copy(update={"model": run.recipe.model.model_copy(update={"liger": True})})
        apply_liger(model, liger_recipe, LigerChoice(True, "gpu check"), print)
        liger_loss, liger_grads = loss_and_grads(True)  # and RMSNorm/RoPE/SwiGLU

        def rel(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a - b).norm() / b.norm().clamp(min=1e-12))

        out = {"adapter": adapter, "loss_tokens": int((batch["labels"][:, 1:] != -100).sum()), "ift_loss": ift_loss,
               "fused_loss": fused_loss, "liger_loss": liger_loss,
               "fused_loss_rel": abs(fused_loss - ift_loss) / ift_loss,
               "liger_loss_rel": abs(liger_loss - ift_loss) / ift_loss,
               "fused_grad_rel": rel(fused_grads, ift_grads), "liger_grad_rel": rel(liger_grads, ift_grads)}
        # bf16's relative tolerance (torch.testing's 1.6e-2) on the loss; gradients as a whole within 5%
        out["ok"] = (out["fused_loss_rel"] < 1.6e-2 and out["liger_loss_rel"] < 1.6e-2 and out["fused_grad_rel"] < 5e-2
                     and out["liger_grad_rel"] < 5e-2)
        return out


def part_eval(args, work: Path, log: Log, data: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ift.evaluation.decoding import generate
    from ift.evaluation.scoring import score_choices

    s = sizes(args)
    base = base_model(work, s["qlora_shape"], tokenizer_folder(work, data))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    prompts = [f"Text: {r['text']}\nIs the sentiment negative, neutral or positive?" for r in rows]
    prompts = (prompts * math.ceil(s["eval_rows"] / len(prompts)))[: s["eval_rows"]]
    t0 = time.perf_counter()
    scores = score_choices(model, tok, "causal", prompts, [list(LABELS)] * len(prompts), batch_size=s["batch"] * 4)
    rank_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    texts = generate(model, tok, "causal", prompts[: max(8, len(prompts) // 4)], max_new_tokens=s["gen_tokens"],
                     batch_size=s["batch"] * 4)
    gen_s = time.perf_counter() - t0
    out = {"shape": s["qlora_shape"], "rank_rows": len(prompts), "rank_rows_per_second": len(prompts) / rank_s,
           "generate_rows": len(texts), "generate_rows_per_second": len(texts) / gen_s,
           "max_new_tokens": s["gen_tokens"], "ok": len(scores) == len(prompts) and len(texts) > 0}
    log("eval:", json.dumps(out))
    return out


FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: {n}
machine_rank: 0
mixed_precision: bf16
use_cpu: false
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: true
  fsdp_offload_params: false
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
"""


def part_fsdp(args, work: Path, log: Log) -> dict:
    import subprocess

    import torch

    if args.device != "cuda":
        out = {"ok": True, "skipped": "Accelerate runs FSDP only on CUDA; tests/test_train.py covers the sharded "
                                      "evaluation with torch's fully_shard over gloo"}
        log("fsdp:", json.dumps(out))
        return out
    n = torch.cuda.device_count()
    config = work / "fsdp.yaml"
    config.write_text(FSDP_CONFIG.format(n=n))
    run = work / "fsdp-run"
    proc = subprocess.run(["accelerate", "launch", "--config_file", str(config), str(REPO / "ift" / "train.py"),
                           str(REPO / "recipes" / "tiny.yaml"), f"training.output_dir={run}", "training.max_steps=40",
                           "training.eval_steps=20", "training.save_steps=20", "training.report_to=[none]",
                           "training.mixed_precision=bf16"], capture_output=True, text=True, timeout=600)
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    evals = [h["validation"] for h in metrics.get("history", []) if "validation" in h]
    final = run / "final" / "model.safetensors"
    saved = []
    if final.exists():
        from safetensors import safe_open

        with safe_open(str(final), framework="pt") as f:
            saved = list(f.keys())
    # tiny.yaml ties its head: final/ holds the embedding once (a head saved apart would mean it came untied)
    out = {"processes": n, "returncode": proc.returncode, "validation": evals, "test": metrics.get("test"),
           "head_saved_apart": "lm_head.weight" in saved,
           "ok": proc.returncode == 0 and bool(evals) and "accuracy" in evals[-1] and "lm_head.weight" not in saved}
    if not out["ok"]:
        out["output_tail"] = (proc.stdout + proc.stderr)[-4000:]
    log("fsdp:", json.dumps({k: v for k, v in out.items() if k != "output_tail"}))
    return out


DEEPSPEED_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: {n}
machine_rank: 0
mixed_precision: bf16
use_cpu: false
deepspeed_config:
  zero_stage: {stage}
  gradient_accumulation_steps: 1
  gradient_clipping: auto
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
  zero3_save_16bit_model: true
"""


def part_deepspeed(args, work: Path, log: Log) -> dict:
    import importlib.util
    import subprocess

    if args.device != "cuda" or importlib.util.find_spec("deepspeed") is None:
        out = {"ok": True, "skipped": "DeepSpeed needs CUDA and the deepspeed package; tests/test_zero.py checks the "
                                      "config rules on the CPU"}
        log("deepspeed:", json.dumps(out))
        return out
    import torch

    n = torch.cuda.device_count()
    out: dict = {"processes": n}
    for stage in (2, 3):
        config = work / f"zero{stage}.yaml"
        config.write_text(DEEPSPEED_CONFIG.format(n=n, stage=stage))
        run = work / f"zero{stage}-run"
        proc = subprocess.run(["accelerate", "launch", "--config_file", str(config), str(REPO / "ift" / "train.py"),
                               str(REPO / "recipes" / "tiny.yaml"), f"training.output_dir={run}",
                               "training.max_steps=20", "training.save_steps=10", "training.eval_steps=20",
                               "training.max_grad_norm=0.5", "training.report_to=[none]", "evaluation.metrics=[loss]",
                               "training.mixed_precision=bf16"], capture_output=True, text=True, timeout=600)
        curve = losses(run) if (run / "metrics.json").exists() else []
        part = {"returncode": proc.returncode, "final": (run / "final").is_dir(),
                "loss_falls": bool(curve) and curve[-1] < curve[0]}
        part["ok"] = proc.returncode == 0 and part["final"] and part["loss_falls"]
        if not part["ok"]:
            part["output_tail"] = (proc.stdout + proc.stderr)[-4000:]
        out[f"zero{stage}"] = part
    out["ok"] = all(out[f"zero{stage}"]["ok"] for stage in (2, 3))
    log("deepspeed:", json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "output_tail"}
                                       if isinstance(v, dict) else v) for k, v in out.items()}))
    return out


def _mean_tokens(work: Path, data: Path) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_folder(work, data))
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()[:200]]
    texts = [f"Text: {r['text']}\nIs the sentiment negative, neutral or positive? {LABELS[r['label']]}" for r in rows]
    return sum(len(ids) + 1 for ids in tok(texts)["input_ids"]) / len(texts)


def _parameters(config) -> int:
    from transformers import AutoModelForCausalLM

    with contextlib.suppress(Exception):
        import torch

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters())
    return 0


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=["full", "tiny"], default=None, help="default: full on cuda, tiny on cpu")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    args.size = args.size or ("full" if args.device == "cuda" else "tiny")
    out_dir = Path(os.environ.get("OUT") or REPO / "bench" / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    log = Log(out_dir / "gpu_check.log")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            log("error: --device cuda but torch sees no CUDA device — run with --device cpu")
            return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    s = sizes(args)
    data, templates = write_data(work, s["rows"], s["words"])
    report: dict = {"device": args.device, "size": args.size, "environment": _environment(args.device), "parts": {}}
    for part in [p for p in args.only.split(",") if p]:
        started = time.perf_counter()
        log(f"--- {part}")
        try:
            if part == "correctness":
                result = part_correctness(args, work, log)
            elif part == "qlora":
                result = part_qlora(args, work, log, data, templates)
            elif part == "throughput":
                result = part_throughput(args, work, log, data, templates)
            elif part == "packing":
                result = part_packing(args, work, log, data, templates)
            elif part == "liger":
                result = part_liger(args, work, log, data, templates)
            elif part == "eval":
                result = part_eval(args, work, log, data)
            elif part == "fsdp":
                result = part_fsdp(args, work, log)
            elif part == "deepspeed":
                result = part_deepspeed(args, work, log)
            else:
                raise ValueError(f"unknown part {part!r}: use {', '.join(PARTS)}")
        except Exception as err:  # noqa: BLE001 - one broken part must not cost the others their GPU minutes
            result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            log(result["traceback"])
        result["seconds"] = time.perf_counter() - started
        report["parts"][part] = result
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    ok = all(r.get("ok") for r in report["parts"].values())
    log(f"done: {'all parts ok' if ok else 'some parts failed'}; {out_dir / 'gpu_check.json'}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def _environment(device: str) -> dict:
    import platform

    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    with contextlib.suppress(Exception):
        import trl

        env["trl"] = trl.__version__
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


if __name__ == "__main__":
    raise SystemExit(main())
