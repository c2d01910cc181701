"""How a LoRA model computes in training: dropout masks drawn cheaply on CPU, frozen weights in autocast's dtype.

Three measured costs of peft's LoRA on CPU (bench/lora_step.py, bench/train_throughput.py, docs/benchmarks.md):

- `nn.Dropout` draws one Bernoulli sample per element from torch's sequential CPU generator: a 1440 x 576 input
  (batch 8 x 180 tokens, SmolLM2's width) takes 4.6 ms, twice the bf16 matmul it feeds, and peft drops the input
  of every adapted projection. `LoraDropout` draws 64-bit random words and reads four 16-bit uniforms from each
  (1.2 ms for the same input); the drop probability is p rounded to 1/65,536 and the survivors are scaled by the
  exact inverse of that keep rate, so the output's expectation is the input, as with nn.Dropout.
- Under autocast, every matmul casts its fp32 weight to bf16 again; autocast caches only weights that require a
  gradient, so LoRA's frozen base is cast afresh at every forward. `frozen_linears_in` casts those weights once:
  autocast would have rounded them the same way, so the forward and backward are the same numbers
  (tests/test_compute.py), and the base holds half the memory.
- peft drops the input of q, k and v (and of gate and up) three (two) times over, though they read one tensor.
  With `share_inputs`, adapters that read the very same tensor share one dropped copy: one mask and one
  backward multiply per input instead of one per adapter (a bf16 SmolLM2 step 3.16 -> 2.74 s here). Each
  adapter's input is still nn.Dropout(p) of it; what changes is that q/k/v drop the same features in a step.
"""

from __future__ import annotations

import weakref

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


class _LastInput:
    """The input a LoraDropout of one model saw last and what it returned, so that the next adapter reading the
    very same tensor (q/k/v read one normed hidden state, gate/up another) reuses it: one mask per input."""

    def __init__(self) -> None:
        self.x: weakref.ref | None = None
        self.version = -1
        self.p = -1.0
        self.out: torch.Tensor | None = None

    def get(self, x: torch.Tensor, p: float) -> torch.Tensor | None:
        if self.x is not None and self.x() is x and self.version == x._version and self.p == p:
            return self.out
        return None

    def put(self, x: torch.Tensor, p: float, out: torch.Tensor) -> None:
        self.x, self.version, self.p, self.out = weakref.ref(x), x._version, p, out

    def clear(self) -> None:
        self.x, self.out = None, None

    def __deepcopy__(self, memo) -> "_LastInput":  # a copied model shares nothing with this one's last forward
        return _LastInput()


class LoraDropout(nn.Module):
    """nn.Dropout(p) for LoRA's adapter inputs: on CPU the mask comes from `_keep_mask`; elsewhere torch's own
    dropout (CUDA's is a fused kernel already). With `shared`, adapters that read the same input tensor in a
    row share one dropped copy of it."""

    def __init__(self, p: float, shared: _LastInput | None = None) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.drop_levels = round(p * _LEVELS)
        self.scale = _LEVELS / (_LEVELS - self.drop_levels)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_levels == 0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, training=True)
        if self.shared is not None and (out := self.shared.get(x, self.p)) is not None:
            return out
        out = _Masked.apply(x, _keep_mask(x.shape, self.drop_levels, x.device), self.scale)
        if self.shared is not None:
            self.shared.put(x, self.p, out)
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: nn.Module, share_inputs: bool = True) -> int:
    """Replace peft's nn.Dropout in every LoRA layer by LoraDropout; returns how many were replaced.

    share_inputs: adapters that read the same tensor (q/k/v; gate/up) get one dropped copy of it, as if the
    dropout sat on the shared input (one mask, one backward multiply, 13% off a bf16 step of SmolLM2 here);
    peft draws one mask per adapter. Each adapter's input has nn.Dropout's distribution either way.
    """
    replaced = 0
    shared = _LastInput() if share_inputs else None
    if shared is not None:  # a new forward never reuses the last one's tensors
        model.register_forward_pre_hook(lambda *_: shared.clear())
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is nn.Dropout and dropout.p > 0:
                dropouts[name] = LoraDropout(dropout.p, shared)
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
