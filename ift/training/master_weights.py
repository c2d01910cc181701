"""The weights' dtypes while training: float32 master copies of half-precision trainable weights, and LoRA's
frozen base held in the autocast dtype."""

from __future__ import annotations

from typing import Callable

from ift.modeling.compute import frozen_linears_in


def fp32_master_weights(model) -> str | None:
    """Trainable weights in float32: AdamW on bf16/fp16 weights rounds small updates away.

    A half-precision checkpoint loaded with dtype auto is trained on a float32 copy of its trainable weights
    (compute stays in half precision under mixed_precision); frozen weights (LoRA's base) keep their dtype.
    Returns what it did, for the log (None: nothing to do)."""
    import torch

    half = [p for p in model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
    if not half:
        return None
    dtype = half[0].dtype
    for p in half:
        p.data = p.data.float()
    return (f"training {sum(p.numel() for p in half):,} {str(dtype).removeprefix('torch.')} weights as float32 "
            "master weights (set training.mixed_precision for half-precision compute)")


def frozen_base_in_compute_dtype(model, mixed_precision: str, sharded: bool, say: Callable[[str], None]) -> None:
    """Under bf16/fp16 autocast, LoRA's frozen float32 Linear weights held in the autocast dtype: the same
    forward and backward (autocast rounds them identically, at every step), without the per-step casts and with
    half the base's memory (ift/modeling/compute.py). Not when `sharded` (FSDP, DeepSpeed: they shard flat
    parameters of one dtype)."""
    import torch

    if mixed_precision not in ("bf16", "fp16") or not hasattr(model, "peft_config") or sharded:
        return
    saved = frozen_linears_in(model, torch.bfloat16 if mixed_precision == "bf16" else torch.float16)
    if saved:
        say(f"frozen base weights held in {mixed_precision} for autocast: {saved / 2**20:,.0f} MiB less, "
            "no per-step casts")
