"""Liger kernels (`model.liger`): liger-kernel's fused Triton kernels on the model a run trains, and its fused
linear cross-entropy on ift's loss positions.

Where they run, the decoder's RMSNorm, RoPE and SwiGLU become Liger's (its per-architecture
`apply_liger_kernel_to_*`, called on the loaded instance through transformers' `apply_liger_kernel`), and
`CompletionLoss(fused_loss=True)` hands the hidden states at the positions whose next token carries loss, with
the output layer's weight, to Liger's fused linear cross-entropy, summed: the logits of those positions are never
materialised, and the loop divides the sum by the window's loss tokens exactly as before.

`auto` turns them on when the run is on CUDA, the architecture is one that both Liger patches and ift's selective
head covers (FUSED_HEADS), liger-kernel imports and the output layer is a plain Linear (an adapter on it would be
left out of its bare weight); otherwise off, and the run says why in one line. `true` where they cannot run is one
IftError naming model.liger: the device, the architecture and the package are checked before any data or weights
load (`liger_choice`), the output layer once the model is built. The saved recipe pins what ran (true or false).

The equality with ift's own loss (bf16, on CUDA) and the speed with and without are measured by the GPU check
(`bench/gpu_check.py`, part `liger`): Triton kernels do not run on the CPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ift.errors import IftError
from ift.recipe import ModelConfig, Recipe


def _plain(config: Any) -> tuple[float, float | None]:
    return 1.0, None


# model_type -> (factor on the hidden states, soft cap) that make Liger's fused head equal the model's own logits
# (the head's output transformed as ift.training.loss.LOGIT_TRANSFORMS says). Only these architectures get Liger.
FUSED_HEADS: dict[str, Callable[[Any], tuple[float, float | None]]] = {
    "llama": _plain, "mistral": _plain, "qwen2": _plain, "qwen3": _plain, "phi3": _plain, "gemma": _plain,
    "gemma2": lambda config: (1.0, config.final_logit_softcapping or None),
    "granite": lambda config: (1.0 / config.logits_scaling, None),  # z / s = (h / s) W: no bias on its head
}
FIX = "set model.liger: auto (on where it can run) or false"


@dataclass(frozen=True)
class LigerChoice:
    on: bool
    why: str  # one line: what runs, or why not


def choose_liger(model: ModelConfig, accelerator: Any) -> LigerChoice:
    """`liger_choice` for the run Accelerate set up (its device and DeepSpeed ZeRO stage)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return liger_choice(model, accelerator.device.type, int(getattr(plugin, "zero_stage", 0) or 0))


def liger_choice(model: ModelConfig, device_type: str, zero_stage: int = 0) -> LigerChoice:
    """Whether a training run on `device_type` uses Liger; model.liger: true that cannot run raises IftError.
    Cheapest checks first: auto on the CPU reads neither the model's config nor the package."""
    if model.liger is False:
        return LigerChoice(False, "model.liger: false")
    problem = _problem(model, device_type, zero_stage)
    if problem is not None:
        what, fix = problem
        if model.liger is True:
            raise IftError(f"model.liger: true, but {what}", "model.liger", fix)
        return LigerChoice(False, what)
    return LigerChoice(True, f"liger-kernel {importlib.metadata.version('liger-kernel')}: fused RMSNorm, RoPE and "
                             "SwiGLU, and fused linear cross-entropy on the loss positions")


def _problem(model: ModelConfig, device_type: str, zero_stage: int) -> tuple[str, str] | None:
    """(why Liger cannot run here, the fix), or None."""
    if device_type != "cuda":
        return (f"this run is on the {device_type} and Liger's Triton kernels need a CUDA GPU",
                f"{FIX}, or train on a CUDA GPU")
    if zero_stage == 3:
        return ("DeepSpeed ZeRO-3 partitions the output layer's weight outside its own forward, where the fused loss "
                "reads it", f"{FIX}, or use ZeRO-2 or FSDP")
    model_type = _model_type(model)
    if model_type not in FUSED_HEADS:
        return (f"ift has no Liger path for model_type {model_type} (covered: {', '.join(sorted(FUSED_HEADS))})", FIX)
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed", f"pip install 'ift[liger]', or {FIX}"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception as exc:  # e.g. no triton, or a transformers it does not support
        first = str(exc).splitlines()[0] if str(exc) else ""
        return (f"liger-kernel does not import here ({type(exc).__name__}: {first})",
                f"reinstall it with a triton that matches torch (pip install 'ift[liger]'), or {FIX}")
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return (f"liger-kernel {importlib.metadata.version('liger-kernel')} has no kernels for model_type {model_type}",
                f"upgrade liger-kernel, or {FIX}")
    return None


def _model_type(model: ModelConfig) -> str:
    from ift.modeling.config import base_config
    from ift.modeling.kind import model_kind

    config = base_config(model)
    if model_kind(config, model.kind) != "causal":
        return f"{config.model_type} (seq2seq)"
    return str(config.model_type)


def apply_liger(model: nn.Module, recipe: Recipe, choice: LigerChoice, say: Callable[[str], Any]) -> Recipe:
    """Liger's kernels on the loaded `model` (a peft wrapper or not) when `choice` is on and its output layer is
    a plain Linear; says what runs (or, for auto, why not) and returns `recipe` with model.liger pinned to it."""
    on, why = choice.on, choice.why
    if on:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings()
        if type(head) is not nn.Linear:
            why = (f"the output layer is a {type(head).__module__}.{type(head).__name__} (an adapter on it, e.g. "
                   "peft's trainable tokens for added tokens), and the fused loss reads the bare weight")
            if recipe.model.liger is True:
                raise IftError(f"model.liger: true, but {why}", "model.liger", FIX)
            on = False
    if on:
        from transformers.integrations.liger import apply_liger_kernel

        # ift computes the loss itself (fused_loss_sum), on its loss positions only
        apply_liger_kernel(model, {"cross_entropy": False, "fused_linear_cross_entropy": False})
        say(f"liger: on ({why})")
    elif recipe.model.liger == "auto":
        say(f"liger: off ({why})")
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"liger": on})})


def fused_loss_sum(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, config: Any) -> torch.Tensor:
    """Summed cross-entropy of `head`'s logits for `hidden` (N x H, the loss positions) against `targets` (N),
    by Liger's fused linear cross-entropy: chunked, the logits never held whole, fp32 softmax."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    scale, softcap = FUSED_HEADS[config.model_type](config)
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=softcap)
    return loss(head.weight, hidden * scale if scale != 1.0 else hidden, targets, head.bias)
