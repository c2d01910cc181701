"""How a LoRA model computes in training: dropout masks drawn cheaply on CPU, frozen weights in autocast's dtype.

Two measured costs of peft's LoRA on CPU that change no figure a run reports (bench/train_throughput.py,
docs/benchmarks.md):

- `nn.Dropout` draws one Bernoulli sample per element from torch's sequential CPU generator: a 1440 x 576 input
  (batch 8 x 180 tokens, SmolLM2's width) takes 4.6 ms, twice the bf16 matmul it feeds, and peft drops the input
  of every adapted projection. `LoraDropout` draws 64-bit random words and reads four 16-bit uniforms from each
  (1.2 ms for the same input); the drop probability is p rounded to 1/65,536 and the survivors are scaled by the
  exact inverse of that keep rate, so the output's expectation is the input, as with nn.Dropout.
- Under autocast, every matmul casts its fp32 weight to bf16 again; autocast caches only weights that require a
  gradient, so LoRA's frozen base is cast afresh at every forward. `frozen_linears_in` casts those weights once:
  autocast would have rounded them the same way, so the forward and backward are the same numbers
  (tests/test_compute.py), and the base holds half the memory.
"""

from __future__ import annotations

import torch
from torch import nn

_LEVELS = 1 << 16  # uniforms of 16 bits


def _keep_mask(shape: torch.Size, drop_levels: int, device: torch.device) -> torch.Tensor:
    """Boolean mask, True with probability 1 - drop_levels / 65,536, from a quarter as many 64-bit draws."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    return words.view(torch.int16)[:n].view(shape) >= (drop_levels - (_LEVELS >> 1))


class _Masked(torch.autograd.Function):
    """x * keep * scale, saving only the boolean mask (1 byte per element) for backward, as nn.Dropout does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None, None


class LoraDropout(nn.Module):
    """nn.Dropout(p) for LoRA's adapter inputs: on CPU the mask comes from `_keep_mask`; elsewhere torch's own
    dropout (CUDA's is a fused kernel already)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.drop_levels = round(p * _LEVELS)
        self.scale = _LEVELS / (_LEVELS - self.drop_levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_levels == 0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, training=True)
        return _Masked.apply(x, _keep_mask(x.shape, self.drop_levels, x.device), self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: nn.Module) -> int:
    """Replace peft's nn.Dropout in every LoRA layer by LoraDropout; returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is nn.Dropout and dropout.p > 0:
                dropouts[name] = LoraDropout(dropout.p)
                replaced += 1
    return replaced


def frozen_linears_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the weights and biases of frozen float32 nn.Linear layers to `dtype` (autocast's compute dtype);
    returns the bytes saved.

    Left as they are: anything that trains, non-Linear layers (embeddings, norms: the residual stream stays
    float32, as under autocast with float32 weights), a weight shared with an embedding (a tied LM head: the
    embedding lookup is not autocast), 4-bit layers (not float32), and the model's `_keep_in_fp32_modules`.
    """
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    keep_fp32 = set()
    for m in model.modules():
        keep_fp32.update(getattr(m, "_keep_in_fp32_modules", None) or ())
    saved = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(part in keep_fp32 for part in name.split(".")):
            continue
        for tensor_name in ("weight", "bias"):
            param = getattr(module, tensor_name, None)
            if (param is None or param.requires_grad or param.dtype != torch.float32 or id(param) in shared
                    or type(param) is not nn.Parameter):
                continue
            param.data = param.data.to(dtype)
            saved += param.numel() * (4 - param.element_size())
    return saved
