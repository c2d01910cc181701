"""The whole estimate `ift estimate` prints: model, plan, memory, fit advice, data and compute, and its JSON form."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ift.errors import IftError
from ift.estimate.advice import Advice, fit_advice, fits
from ift.estimate.compute import Compute, compute
from ift.estimate.memory import USABLE_FRACTION, Memory, memory
from ift.estimate.model import ModelInfo, load_model_info
from ift.estimate.plan import Setup, model_weight_dtype, setup_from_recipe
from ift.estimate.tokens import TokenCount, count_tokens
from ift.modeling.attention import training_attention

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal pretraining, ~20 tokens/parameter


@dataclass(frozen=True)
class Estimate:
    info: ModelInfo
    setup: Setup
    memory: Memory
    methods: dict[str, dict[str, int]]  # method -> {"no_checkpointing": peak, "checkpointing": peak}
    budget: int | None
    fits: bool | None
    advice: Advice | None
    data: TokenCount | None
    data_error: str | None
    steps_per_epoch: int | None
    total_steps: int | None
    train_tokens: float | None  # over the whole run
    compute: Compute


def estimate(recipe: Any, *, gpu_memory: int | None = None, gpus: int = 1, peak_tflops: float | None = None,
             mfu: float = 0.4, with_data: bool = True, cache_dir: Path | None = None,
             device: str = "cuda") -> Estimate:
    """Everything `ift estimate` prints, from the recipe alone."""
    info = load_model_info(recipe.model, recipe.adapter)
    attention = training_attention(recipe, device, info.arch.kind)
    if attention is not None and info.arch.attention != "math":  # the kernel the run will use (ift/modeling/attention.py)
        info = replace(info, arch=replace(info.arch, attention="eager" if attention == "eager" else "fused"))
    data, error = None, None
    if with_data:
        try:
            data = count_tokens(recipe, info.arch.kind, cache_dir)
        except IftError as err:
            error = err.line()
    seq_len = None
    if data:  # the longest batch as the run pads it (ift.data.collate.train_padding)
        from ift.data.collate import padded_length, train_padding

        seq_len = padded_length(data.max_tokens, *train_padding(recipe.data.pad_to_multiple_of, device, data.max_tokens))
    setup = setup_from_recipe(recipe, info, seq_len=seq_len,
                              loss_tokens=data.max_loss_tokens if data else None, gpus=gpus, device=device)
    mem = memory(info, setup)
    methods = {}
    for method in ("none", "lora", "qlora"):
        alt = replace(setup, method=method, weight_dtype=model_weight_dtype(recipe.model, method, info.config_dtype))
        methods[method] = {"no_checkpointing": memory(info, replace(alt, gradient_checkpointing=False)).peak,
                           "checkpointing": memory(info, replace(alt, gradient_checkpointing=True)).peak}
    ok = fits(info, setup, gpu_memory) if gpu_memory else None
    advice = fit_advice(info, setup, gpu_memory) if gpu_memory and not ok else None
    t = recipe.training
    if data is not None and data.rows:
        batches = math.ceil(data.rows / (setup.batch_size * gpus))
        steps = math.ceil(batches / setup.grad_accum)
        total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps)
        fraction = total / steps  # epochs actually run
        mean = data.tokens / data.rows
        comp = compute(info, setup, data.tokens * fraction, data.loss_tokens * fraction, mean,
                       decoder_tokens=data.loss_tokens * fraction, peak_tflops=peak_tflops, mfu=mfu)
        train_tokens = (data.tokens + (data.loss_tokens if info.arch.kind == "seq2seq" else 0)) * fraction
        return Estimate(info, setup, mem, methods, gpu_memory, ok, advice, data, error, steps, total,
                        train_tokens, comp)
    # no data: one optimizer step at full length
    per_step = setup.batch_size * setup.grad_accum * gpus
    comp = compute(info, setup, per_step * setup.seq_len, per_step * setup.loss_tokens, setup.seq_len,
                   decoder_tokens=per_step * setup.loss_tokens, peak_tflops=peak_tflops, mfu=mfu, per="step")
    return Estimate(info, setup, mem, methods, gpu_memory, ok, advice, None, error, None, None, None, comp)


def to_dict(est: Estimate) -> dict[str, Any]:
    """The JSON form of an estimate (bytes, FLOPs and seconds as numbers)."""
    info, mem, pc = est.info, est.memory, est.info.params
    trainable = pc.total if est.setup.method == "none" else info.lora_params(est.setup.lora_r)
    out: dict[str, Any] = {
        "model": {"source": info.source, **asdict(info.arch)},
        "parameters": {"total": pc.total, "trainable": trainable, "method": est.setup.method,
                       "embedding": pc.embedding, "linear": pc.linear, "head": pc.head, "head_tied": pc.head_tied,
                       "lora": {"r": est.setup.lora_r, "targets": list(pc.lora_targets), "modules": pc.lora_modules,
                                "parameters": info.lora_params(est.setup.lora_r)}},
        "setup": asdict(est.setup),
        "memory": {**{k: v for k, v in asdict(mem).items()}, "peak": mem.peak,
                   "by_method": est.methods, "gpu_memory": est.budget,
                   "usable": int(USABLE_FRACTION * est.budget) if est.budget else None, "fits": est.fits,
                   "advice": None if est.advice is None else {
                       "changes": list(est.advice.changes), "overrides": list(est.advice.overrides),
                       "peak": est.advice.peak, "setup": asdict(est.advice.setup)}},
        "data": None if est.data is None else {**asdict(est.data), "steps_per_epoch": est.steps_per_epoch,
                                               "total_steps": est.total_steps, "train_tokens": est.train_tokens},
        "data_error": est.data_error,
        "compute": asdict(est.compute),
        "scale": scale(est),
    }
    return out


def scale(est: Estimate) -> dict[str, Any] | None:
    """Training tokens per parameter against Chinchilla's compute-optimal ~20 (for pretraining decisions)."""
    if not est.train_tokens:
        return None
    n = est.info.params.total
    return {"tokens_per_parameter": est.train_tokens / n, "chinchilla_tokens_per_parameter": CHINCHILLA_TOKENS_PER_PARAM,
            "chinchilla_optimal_tokens": CHINCHILLA_TOKENS_PER_PARAM * n}
