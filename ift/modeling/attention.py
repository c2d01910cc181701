"""Which attention kernel a training run uses: one rule for `ift train` and `ift estimate`.

`model.attn_implementation: auto` keeps transformers' default (sdpa) except in one measured case: causal training
on the CPU under bf16 autocast with sequences of at most EAGER_MAX_LENGTH tokens, where torch's CPU
flash-attention backward is the slowest op after the matmuls (22% of a SmolLM2 step) and eager attention's
plain matmuls and softmax are faster: a bf16 step of SmolLM2-135M at 8 x 180 tokens, 4.32 -> 3.59 s with LoRA and
5.45 -> 4.71 s fully fine-tuned (docs/benchmarks.md). Eager keeps each layer's attention scores for backward
(batch x heads x length^2, fp32 softmax and its bf16 copy), which grows with the square of the length; up to
EAGER_MAX_LENGTH tokens that is a fraction of the block's other activations, and `ift estimate` counts it. In fp32
the CPU's sdpa kernel is as fast or faster (full SmolLM2 step 6.71 s sdpa vs 7.30 s eager), so it stays.
"""

from __future__ import annotations

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
