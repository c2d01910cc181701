"""Fit advice: the cheapest change (batch, checkpointing, LoRA, QLoRA, FSDP) that makes a plan fit a budget."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ift.estimate.memory import USABLE_FRACTION, memory
from ift.estimate.model import ModelInfo
from ift.estimate.plan import Setup

FSDP_GPU_OPTIONS = (2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Advice:
    changes: tuple[str, ...]  # what to change, in words
    overrides: tuple[str, ...]  # the same as recipe overrides where one exists
    setup: Setup
    peak: int


def fits(info: ModelInfo, setup: Setup, budget: int) -> bool:
    return memory(info, setup).peak <= USABLE_FRACTION * budget


def _batch_options(setup: Setup, largest: int) -> list[Setup]:
    """Per-device batches up to `largest` that divide the effective batch, accumulation raised to keep it."""
    effective = setup.batch_size * setup.grad_accum
    return [replace(setup, batch_size=bs, grad_accum=effective // bs)
            for bs in range(min(largest, effective), 0, -1) if effective % bs == 0]


def _smaller_batch(info: ModelInfo, setup: Setup, budget: int) -> Setup | None:
    """The largest smaller per-device batch that fits with the same effective batch."""
    return next((c for c in _batch_options(setup, setup.batch_size - 1) if fits(info, c, budget)), None)


def _options(setup: Setup) -> list[str]:
    """Changes from cheapest to dearest: batch (same optimisation, more steps), checkpointing (~+33% compute),
    LoRA (fewer trainable weights), QLoRA (4-bit base), more GPUs with FSDP (more hardware)."""
    out = ["batch"] if setup.batch_size > 1 else []
    out += [] if setup.gradient_checkpointing else ["checkpointing"]
    out += ["lora"] if setup.method == "none" else []
    out += ["qlora"] if setup.method != "qlora" else []
    return out + ["fsdp"]


def _apply(kind: str, info: ModelInfo, setup: Setup, budget: int) -> Setup | None:
    """One option applied to `setup`; for batch and FSDP the smallest change that fits (None if none does)."""
    if kind == "batch":
        return _smaller_batch(info, setup, budget)
    if kind == "checkpointing":
        return replace(setup, gradient_checkpointing=True)
    if kind == "lora":
        return replace(setup, method="lora", weight_dtype=setup.loaded_dtype)  # the frozen base as loaded
    if kind == "qlora":
        return replace(setup, method="qlora", weight_dtype="float32")  # as prepare_model_for_kbit_training leaves it
    for n in FSDP_GPU_OPTIONS:
        candidate = replace(setup, fsdp=n, gpus=max(setup.gpus, n))
        if n > setup.fsdp and fits(info, candidate, budget):
            return candidate
    return None


def fit_advice(info: ModelInfo, setup: Setup, budget: int) -> Advice | None:
    """The cheapest change that makes `setup` fit: each option alone, in order; else options stacked in order
    (batch 1, checkpointing, LoRA, QLoRA, FSDP) until it fits. None when it already fits or nothing helps."""
    if fits(info, setup, budget):
        return None
    for kind in _options(setup):
        candidate = _apply(kind, info, setup, budget)
        if candidate is not None and fits(info, candidate, budget):
            return _advice(info, setup, candidate)
    stacked = setup
    for kind in _options(setup):
        if kind == "batch":
            stacked = replace(stacked, batch_size=1, grad_accum=stacked.batch_size * stacked.grad_accum)
        else:
            candidate = _apply(kind, info, stacked, budget)
            if candidate is None:
                continue
            stacked = candidate
        if fits(info, stacked, budget):
            if stacked.batch_size == 1 and setup.batch_size > 1:  # give back as much batch as still fits
                stacked = _largest_batch(info, stacked, setup, budget)
            return _advice(info, setup, stacked)
    return None


def _largest_batch(info: ModelInfo, stacked: Setup, original: Setup, budget: int) -> Setup:
    return next((c for c in _batch_options(stacked, original.batch_size) if fits(info, c, budget)), stacked)


def _advice(info: ModelInfo, old: Setup, new: Setup) -> Advice:
    changes, overrides = [], []
    if (new.batch_size, new.grad_accum) != (old.batch_size, old.grad_accum):
        changes.append(f"per-device batch {old.batch_size} -> {new.batch_size} with gradient accumulation "
                       f"{old.grad_accum} -> {new.grad_accum} (same effective batch)")
        overrides += [f"training.per_device_train_batch_size={new.batch_size}",
                      f"training.gradient_accumulation_steps={new.grad_accum}"]
    if new.gradient_checkpointing and not old.gradient_checkpointing:
        changes.append("gradient checkpointing (recomputes each block in backward: about a third more compute)")
        overrides.append("training.gradient_checkpointing=true")
    if new.method != old.method:
        changes.append({"lora": "LoRA adapters on a frozen base", "qlora": "QLoRA: LoRA on a 4-bit base"}[new.method])
        overrides.append(f"adapter.method={new.method}")
    if new.fsdp != old.fsdp:
        changes.append(f"FSDP full sharding over {new.fsdp} GPUs (accelerate config: FSDP, FULL_SHARD)")
    return Advice(tuple(changes), tuple(overrides), new, memory(info, new).peak)
