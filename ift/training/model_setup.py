"""The loaded model made ready to train, in order: its dtype pinned in the recipe, float32 master weights,
NEFTune, LoRA's frozen base in the autocast dtype, the attention kernel, Liger's kernels."""

from __future__ import annotations

from typing import Callable

from ift.modeling.attention import use_training_attention
from ift.recipe import Recipe
from ift.training.distributed import shards_parameters
from ift.training.liger import LigerChoice, apply_liger
from ift.training.master_weights import fp32_master_weights, frozen_base_in_compute_dtype
from ift.training.neftune import add_neftune


def pin_loaded_dtype(model, recipe: Recipe) -> Recipe:
    """`model.dtype: auto` pinned to the dtype the weights loaded in: `ift eval/chat/generate` then load the
    run's weights as training did (not under fp16 autocast on bf16 weights, which training casts)."""
    loaded = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    if recipe.model.dtype != "auto" or (recipe.training.mixed_precision == "fp16" and loaded == "bfloat16"):
        return recipe
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": loaded})})


def ready_to_train(model, recipe: Recipe, kind: str, accelerator, liger: LigerChoice,
                   say: Callable[[str], None]) -> Recipe:
    """Everything done to the loaded model before `accelerator.prepare`; returns the recipe with what ran pinned."""
    t = recipe.training
    recipe = pin_loaded_dtype(model, recipe)
    line = fp32_master_weights(model)
    if line:
        say(line)
    if t.neftune_noise_alpha:
        add_neftune(model, t.neftune_noise_alpha)
    frozen_base_in_compute_dtype(model, t.mixed_precision, shards_parameters(accelerator), say)
    line = use_training_attention(model, recipe, accelerator.device.type, kind)
    if line:
        say(line)
    return apply_liger(model, recipe, liger, say)
