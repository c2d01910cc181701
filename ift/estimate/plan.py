"""The training plan being estimated (Setup): what the memory figure depends on, read from the recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ift.estimate.model import ModelInfo


@dataclass(frozen=True)
class Setup:
    """Everything the memory figure depends on; the fit advice changes one field at a time."""

    method: str  # none | lora | qlora
    batch_size: int
    grad_accum: int
    seq_len: int  # longest sequence of a batch (the encoder's for seq2seq)
    loss_tokens: int  # most loss-carrying tokens of one sequence (rows through the LM head); decoder length for seq2seq
    gradient_checkpointing: bool
    weight_dtype: str  # dtype of the base weights (the non-quantized ones under QLoRA)
    mixed_precision: str  # no | bf16 | fp16 (autocast)
    lora_r: int
    lora_dropout: float
    double_quant: bool = True
    compute_dtype: str = "bfloat16"  # QLoRA's 4-bit matmuls
    padded: bool = True  # batches carry a padding mask (no packing)
    gpus: int = 1  # data-parallel processes (compute time, steps)
    fsdp: int = 1  # FSDP FULL_SHARD: weights, gradients and optimizer states split over this many devices
    device: str = "cuda"  # CUDA's dropout keeps a bool mask, PyTorch's CPU dropout a float one
    fused_adamw: bool = True  # training.optim adamw_torch_fused (not under FSDP): on CUDA no step temporaries
    loaded_dtype: str = "float32"  # the checkpoint as loaded: what LoRA's frozen base would be held in


def model_weight_dtype(model_cfg: Any, method: str, config_dtype: str | None) -> str:
    """What the base weights are held in while training: model.dtype; under 'auto' the checkpoint's dtype
    (float32 when the config names none: GGUF conversions, scratch models). Under QLoRA peft's
    prepare_model_for_kbit_training makes every weight that is not 4-bit float32; a full fine-tune trains
    float32 master weights whatever the checkpoint's dtype (ift/train.py: AdamW on bf16 weights rounds small
    updates away; FSDP2 upcasts them too), with half-precision compute under autocast."""
    if method in ("qlora", "none"):
        return "float32"
    if model_cfg.dtype != "auto":
        return model_cfg.dtype
    if model_cfg.init == "scratch":
        return "float32"
    return config_dtype or "float32"


def setup_from_recipe(recipe: Any, info: ModelInfo, *, seq_len: int | None = None, loss_tokens: int | None = None,
                      gpus: int = 1, device: str = "cuda") -> Setup:
    t, a, d = recipe.training, recipe.adapter, recipe.data
    seq = min(seq_len or d.max_length, d.max_length)
    return Setup(method=a.method, batch_size=t.per_device_train_batch_size, grad_accum=t.gradient_accumulation_steps,
                 seq_len=seq, loss_tokens=min(loss_tokens or seq, seq),
                 gradient_checkpointing=t.gradient_checkpointing,
                 weight_dtype=model_weight_dtype(recipe.model, a.method, info.config_dtype),
                 mixed_precision=t.mixed_precision, lora_r=a.r, lora_dropout=a.dropout, double_quant=a.double_quant,
                 compute_dtype=a.compute_dtype,
                 padded=not d.packing, gpus=gpus, device=device, fused_adamw=t.optim == "adamw_torch_fused",
                 loaded_dtype=model_weight_dtype(recipe.model, "lora", info.config_dtype))
