"""`ift estimate RECIPE`: parameters, memory per device, data, compute and scale before training."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ift.errors import IftError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="memory per device, FLOPs, time and tokens for a recipe, before training",
                       description="Estimate parameters, memory per device, data size, compute and time for a "
                                   "recipe from the model's config alone (no weights are downloaded).")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys")
    p.add_argument("--gpu-memory", metavar="SIZE",
                   help="memory of one device, e.g. 24GB or 80GiB (default: the local GPU's, if any)")
    p.add_argument("--gpus", default="1", metavar="N", help="data-parallel devices (default 1)")
    p.add_argument("--peak-tflops", metavar="X",
                   help="peak TFLOPS of one device in the training precision (e.g. 312 for an A100 in bf16)")
    p.add_argument("--mfu", default="0.4", metavar="U", help="model FLOPs utilisation for the time (default 0.4)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="where training runs (CPU dropout keeps float masks, its AdamW no foreach buffer)")
    p.add_argument("--no-data", action="store_true", help="skip tokenizing the training split (memory at max_length)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=run)


def _number(text: str, flag: str, kind: type, low: float, high: float = math.inf) -> Any:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not low <= value <= high:
        span = f"between {low} and {high}" if high != math.inf else f"at least {low}"
        raise IftError(f"invalid value '{text}'", flag, f"give a {'whole ' if kind is int else ''}number {span}")
    return value


def _local_gpu_memory() -> int | None:
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def run(args: argparse.Namespace) -> int:
    from ift.estimate.memory import parse_memory
    from ift.estimate.report import estimate, to_dict
    from ift.recipe import load_recipe
    from ift.training.precision import runnable_precision

    budget = parse_memory(args.gpu_memory) if args.gpu_memory else None
    gpus = _number(args.gpus, "--gpus", int, 1, 4096)
    peak = _number(args.peak_tflops, "--peak-tflops", float, 1e-3) if args.peak_tflops else None
    mfu = _number(args.mfu, "--mfu", float, 0.01, 1.0)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.device == "cpu":
        recipe, why = runnable_precision(recipe, "cpu")
        if why:  # stderr: --json output stays one JSON document
            print(f"note: {why}: ift train runs such a recipe in fp32 here, and this estimate is for that run "
                  "(training.mixed_precision: no)", file=sys.stderr)
    if budget is None and args.device == "cuda":
        budget = _local_gpu_memory()
    cache = Path(recipe.model.cache_dir).expanduser() if recipe.model.cache_dir else Path.home() / ".cache" / "ift"
    est = estimate(recipe, gpu_memory=budget, gpus=gpus, peak_tflops=peak, mfu=mfu, with_data=not args.no_data,
                   cache_dir=cache / "estimate", device=args.device)
    if args.json:
        print(json.dumps(to_dict(est), indent=2))
    else:
        _show(est)
    return 0


# ---------------------------------------------------------------- the readable report


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _show(est: Any) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    _show_model(console, est)
    _show_memory(console, est)
    _show_data(console, est)
    _show_compute(console, est)


def _show_model(console: Any, est: Any) -> None:
    info, s, pc, a = est.info, est.setup, est.info.params, est.info.arch
    layers = f"{a.layers}+{a.decoder_layers}" if a.kind == "seq2seq" else str(a.layers)
    console.print(f"[bold]model[/bold]  {info.source} ({a.kind}): {layers} layers, hidden {a.hidden}, "
                  f"{a.heads} heads / {a.kv_heads} kv, MLP {a.intermediate}{' gated' if a.gated_mlp else ''}, "
                  f"vocabulary {a.vocab}")
    trainable = pc.total if s.method == "none" else info.lora_params(s.lora_r)
    what = "full fine-tuning" if s.method == "none" else (
        f"{'QLoRA' if s.method == 'qlora' else 'LoRA'} r={s.lora_r} on {', '.join(pc.lora_targets)} "
        f"({pc.lora_modules} modules)")
    console.print(f"[bold]parameters[/bold]  {_count(pc.total)} total, {_count(trainable)} trainable "
                  f"({100 * trainable / max(pc.total, 1):.2f}%): {what}")
    precision = s.weight_dtype + (f" + {s.mixed_precision} autocast" if s.mixed_precision != "no" else "")
    if s.method == "qlora":
        precision = f"4-bit base ({'double-quantized ' if s.double_quant else ''}NF4/FP4), the rest {precision}"
    console.print(f"[bold]setup[/bold]  batch {s.batch_size} × accumulation {s.grad_accum} × {s.gpus} device(s); "
                  f"sequences up to {s.seq_len} tokens (≤ {s.loss_tokens} carrying loss); {precision}; "
                  f"checkpointing {'on' if s.gradient_checkpointing else 'off'}")


def _show_memory(console: Any, est: Any) -> None:
    from rich.table import Table

    from ift.estimate.memory import USABLE_FRACTION, human_bytes

    m, s = est.memory, est.setup
    table = Table(title="memory per device", title_justify="left", show_edge=False)
    table.add_column("component")
    table.add_column("bytes", justify="right")
    table.add_column("note")
    base = "4-bit linears + the rest" if s.method == "qlora" else s.weight_dtype
    rows = [("weights", m.weights, base + (" (the fp32 master copy under autocast)"
                                            if s.mixed_precision != "no" and s.weight_dtype == "float32" else "")),
            ("LoRA adapter", m.adapter, "fp32"),
            ("gradients", m.gradients, "of the trainable weights"),
            ("AdamW states", m.optimizer, "two moments per trainable weight"),
            ("autocast weight copies", m.autocast_copies, f"{s.mixed_precision} copies kept from forward to backward"),
            ("FSDP buffers", m.fsdp_buffers, "gathered blocks"),
            ("activations", m.activations,
             f"batch {s.batch_size} × {s.seq_len}; {human_bytes(m.activations_full)} without / "
             f"{human_bytes(m.activations_checkpointed)} with checkpointing"),
            ("optimizer step temporaries", m.optimizer_step, "only during optimizer.step()")]
    for name, value, note in rows:
        if value:
            table.add_row(name, human_bytes(value), note)
    phase = "forward/backward" if m.train_peak >= m.step_peak else "optimizer step"
    table.add_row("[bold]peak[/bold]", f"[bold]{human_bytes(m.peak)}[/bold]", f"during {phase}")
    console.print()
    console.print(table)
    methods = Table(title="peak by method", title_justify="left", show_edge=False)
    methods.add_column("method")
    methods.add_column("no checkpointing", justify="right")
    methods.add_column("checkpointing", justify="right")
    for method, label in (("none", "full"), ("lora", "LoRA"), ("qlora", "QLoRA (4-bit base)")):
        figures = est.methods[method]
        methods.add_row(label, human_bytes(figures["no_checkpointing"]), human_bytes(figures["checkpointing"]))
    console.print(methods)
    if est.budget is None:
        console.print("no device memory given: pass --gpu-memory (e.g. 24GB) for a fit check and advice")
        return
    usable = USABLE_FRACTION * est.budget
    if est.fits:
        console.print(f"[green]fits[/green] in {human_bytes(est.budget)} "
                      f"({human_bytes(usable)} usable after ~10% for the CUDA context and fragmentation)")
        return
    console.print(f"[red]does not fit[/red] in {human_bytes(est.budget)} ({human_bytes(usable)} usable)")
    if est.advice is None:
        console.print("no change tried here makes it fit (down to batch 1, checkpointing, QLoRA, FSDP over 64 GPUs)")
        return
    console.print(f"cheapest change that fits (peak {human_bytes(est.advice.peak)}):")
    for change in est.advice.changes:
        console.print(f"  - {change}")
    if est.advice.overrides:
        console.print(f"  overrides: {' '.join(est.advice.overrides)}")


def _show_data(console: Any, est: Any) -> None:
    console.print()
    if est.data is None:
        reason = f" ({est.data_error})" if est.data_error else " (--no-data)"
        console.print(f"[bold]data[/bold]  not counted{reason}; memory assumes full-length sequences")
        return
    d = est.data
    console.print(f"[bold]data[/bold]  {d.rows:,} training rows, {d.tokens:,} tokens per epoch "
                  f"({d.loss_tokens:,} with loss), longest row {d.max_tokens} tokens; "
                  f"{est.steps_per_epoch:,} optimizer steps per epoch, {est.total_steps:,} in the run")


def _show_compute(console: Any, est: Any) -> None:
    from ift.estimate.report import scale

    c, s = est.compute, est.setup
    per = "the run" if c.per == "run" else "one optimizer step"
    rule = "6·N·D" if s.method == "none" else "4·N·D (frozen base)"
    console.print(f"[bold]compute[/bold]  {c.flops:.3g} FLOPs for {per} ({rule} = {c.rule_of_thumb:.3g}; "
                  f"attention {c.attention_flops:.3g}{'; checkpointing recomputes the forward' if s.gradient_checkpointing else ''})")
    if c.seconds is not None:
        console.print(f"[bold]time[/bold]  {_duration(c.seconds)} for {per} on {c.gpus} device(s) at "
                      f"{c.peak_tflops:g} TFLOPS × {c.mfu:.0%} utilisation")
    else:
        console.print("[bold]time[/bold]  pass --peak-tflops (e.g. 312 for an A100, 989 for an H100 SXM, dense bf16) "
                      "for a time estimate")
    sc = scale(est)
    if sc:
        console.print(f"[bold]scale[/bold]  {sc['tokens_per_parameter']:.3g} training tokens per parameter; "
                      f"compute-optimal pretraining (Chinchilla) is ~{sc['chinchilla_tokens_per_parameter']} "
                      f"({_count(sc['chinchilla_optimal_tokens'])} tokens for this model)")
