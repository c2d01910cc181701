"""DeepSpeed (ZeRO) configs checked against the recipe before anything trains.

ift accumulates and clips itself (ift/train.py), so a DeepSpeed config may not do either differently:
- `gradient_accumulation_steps` other than auto/1 makes the engine divide the loss again on top of ift's window
  scaling (every gradient too small by that factor);
- the engine clips at its step with its own `gradient_clipping` (Accelerate fills `auto` with 1.0, and its
  `clip_grad_norm_` only reports the norm under DeepSpeed), so `training.max_grad_norm` is written there;
- under ZeRO-3 the final weights can be gathered only with `stage3_gather_16bit_weights_on_model_save: true`;
  without it the run would fail in `finish()`, after all its compute.
"""

from __future__ import annotations

from ift.errors import IftError

WHERE = "DeepSpeed config (accelerate config's deepspeed_config)"


def deepspeed_updates(config: dict, zero_stage: int, max_grad_norm: float) -> dict:
    """What ift sets in the DeepSpeed config for this recipe; an IftError for what contradicts it."""
    steps = config.get("gradient_accumulation_steps", "auto")
    if steps not in ("auto", 1):
        raise IftError(f"the DeepSpeed config sets gradient_accumulation_steps: {steps}",
                       f"{WHERE}: gradient_accumulation_steps",
                       "set it to auto (or 1): ift accumulates by training.gradient_accumulation_steps, and DeepSpeed "
                       "would divide the loss a second time")
    clipping = config.get("gradient_clipping", "auto")
    if clipping != "auto" and float(clipping) != float(max_grad_norm):
        raise IftError(f"the DeepSpeed config clips gradients at {clipping} but training.max_grad_norm is "
                       f"{max_grad_norm}", f"{WHERE}: gradient_clipping",
                       "set gradient_clipping: auto in the DeepSpeed config (ift writes training.max_grad_norm there), "
                       "or give both the same value")
    zero = config.get("zero_optimization") or {}
    if zero_stage == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise IftError("ZeRO stage 3 without stage3_gather_16bit_weights_on_model_save cannot write final/ (the "
                       "run would fail after training)",
                       f"{WHERE}: zero_optimization.stage3_gather_16bit_weights_on_model_save",
                       "set it to true (accelerate config: zero3_save_16bit_model: true)")
    # DeepSpeed reads 0 as no clipping, as training.max_grad_norm: 0 means
    return {"gradient_clipping": float(max_grad_norm)}
