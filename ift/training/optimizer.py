"""The optimizer and its schedule: AdamW over two parameter groups, transformers' schedulers."""

from __future__ import annotations

from ift.recipe import TrainingConfig
from ift.training.distributed import shards_parameters

# transformers' scheduler names for ours: a constant rate after warmup is its constant_with_warmup
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # biases and normalisation weights are 1-D: decaying them only hurts
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict], t: TrainingConfig, accelerator):
    """AdamW, fused when asked and possible: torch's fused kernel needs float parameters on a device that has
    it, and FSDP/DeepSpeed swap the parameters for sharded ones after the optimizer is built."""
    import torch

    kwargs = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    if t.optim == "adamw_torch_fused" and not shards_parameters(accelerator):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError:  # e.g. parameters on a device without the fused kernel
            pass
    return torch.optim.AdamW(groups, **kwargs)


def schedule(optimizer, t: TrainingConfig, max_steps: int):
    """The learning-rate schedule over `max_steps` optimizer steps, warmup by steps or by ratio."""
    from transformers import get_scheduler

    warmup = t.warmup_steps or int(t.warmup_ratio * max_steps)
    return get_scheduler(SCHEDULERS[t.lr_scheduler_type], optimizer, num_warmup_steps=warmup,
                         num_training_steps=max_steps)
