"""Which attention kernel a training run uses: one rule for `ift train` and `ift estimate`.

`model.attn_implementation: auto` keeps transformers' default (sdpa) except in one measured case: causal training
on the CPU under bf16 autocast with sequences of at most EAGER_MAX_LENGTH tokens, where torch's CPU
flash-attention backward is the slowest op after the matmuls (16% of a full SmolLM2 step, its forward 6%) and
eager attention's plain matmuls and softmax are faster. `python bench/lora_step.py [--full]`, SmolLM2-135M at
8 x 180 tokens: bf16 LoRA 3.75 -> 3.50 s per step, bf16 full fine-tuning 4.32 -> 3.68 s; at 8 x 512 tokens eager was
5% slower (docs/benchmarks.md). Eager keeps each layer's attention scores for backward (batch x heads x length^2,
the fp32 softmax and its bf16 copy), which grows with the square of the length: 0.42 GB at 8 x 180 for SmolLM2;
`ift estimate` counts it, and `model.attn_implementation: sdpa` gives it back. In fp32 the CPU's sdpa kernel is as
fast (6.64 vs 6.62 s for the full step), so it stays.
"""

from __future__ import annotations

from typing import Any

from ift.recipe import Recipe

EAGER_MAX_LENGTH = 256


def training_attention(recipe: Recipe, device_type: str, kind: str) -> str | None:
    """The attention implementation a training run of `recipe` on `device_type` sets on a `kind` model; None
    leaves the model's own (transformers' default, or the one the recipe loaded it with)."""
    chosen = recipe.model.attn_implementation
    if chosen != "auto":
        return chosen
    if (device_type == "cpu" and kind == "causal" and recipe.training.mixed_precision == "bf16"
            and recipe.data.max_length <= EAGER_MAX_LENGTH):
        return "eager"
    return None


def set_attention(net: Any, implementation: str) -> bool:
    """Switch a loaded model (or the base under a peft adapter) to `implementation`; True if it changed."""
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    if base.config._attn_implementation == implementation:
        return False
    base.set_attn_implementation(implementation)
    return base.config._attn_implementation == implementation


def use_training_attention(net: Any, recipe: Recipe, device_type: str, kind: str) -> str | None:
    """Set the attention kernel `training_attention` picks; returns a line for the log when `auto` chose one."""
    chosen = training_attention(recipe, device_type, kind)
    if chosen is not None and set_attention(net, chosen) and recipe.model.attn_implementation == "auto":
        return (f"attention: {chosen} (faster than sdpa for sequences of at most {recipe.data.max_length} tokens in "
                "bf16 on the CPU; model.attn_implementation: sdpa keeps sdpa)")
    return None
