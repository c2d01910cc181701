"""Cross-entropy over completion tokens, with the LM head run only where a label carries loss.

Most tokens of an instruction example are prompt, and the vocabulary is large (49k for SmolLM2):
projecting every hidden state to logits and then masking them away is the single largest waste of a
naive SFT step. `CompletionLoss` wraps the model so the whole computation (backbone, selective head,
loss) is one module: Accelerate's DDP/FSDP wrappers see it as the forward pass, and gradient sync
and sharding work unchanged.

The selective head re-implements the last lines of a model's forward (head, then any transform of the
logits), so it is used only on architectures whose forward it is tested to equal
(tests/test_loss.py compares it with `model(labels=...)`); every other model runs its own forward.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ift.data.encoding import IGNORE


def _softcap(config) -> Callable[[torch.Tensor], torch.Tensor]:
    cap = config.final_logit_softcapping
    return (lambda z: torch.tanh(z / cap) * cap) if cap else (lambda z: z)


# model_type -> what its forward does to the head's output. Only these get the selective head.
LOGIT_TRANSFORMS: dict[str, Callable] = {
    "llama": lambda config: (lambda z: z),
    "mistral": lambda config: (lambda z: z),
    "qwen2": lambda config: (lambda z: z),
    "qwen3": lambda config: (lambda z: z),
    "phi3": lambda config: (lambda z: z),
    "gemma": lambda config: (lambda z: z),
    "gemma2": _softcap,
    "granite": lambda config: (lambda z: z / config.logits_scaling),
    "cohere": lambda config: (lambda z: z * config.logit_scale),
}


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers are injected in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class CompletionLoss(nn.Module):
    """forward(batch) -> (sum of token losses, number of loss tokens) for causal or seq2seq models.

    Returning the sum lets the loop divide by the token count of the whole accumulated (and gathered)
    batch, so the loss is a mean over completion tokens, not a mean of micro-batch means. With
    `per_row=True` both come per row (shape [B]), so evaluation can drop the rows Accelerate duplicated
    to give every process an equal share.
    """

    def __init__(self, model: nn.Module, kind: str, fused_loss: bool = False):
        super().__init__()
        self.model = model
        self.kind = kind
        # Liger's fused linear cross-entropy on the loss positions (model.liger, ift/training/liger.py)
        self.fused_loss = fused_loss
        # Accelerate's FSDP2 preparation reads these from the module it is given (this one): without them no
        # decoder layer becomes its own unit and, with cpu_ram_efficient_loading, a tied head comes back untied
        self._no_split_modules = getattr(hf_model(model), "_no_split_modules", None)

    def get_input_embeddings(self) -> nn.Module:
        return hf_model(self.model).get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return hf_model(self.model).get_output_embeddings()

    def tie_weights(self, *args, **kwargs) -> None:
        tie = getattr(hf_model(self.model), "tie_weights", None)
        if tie is not None:
            tie(*args, **kwargs)

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, per_row: bool = False,
                **extra):
        if self.kind == "seq2seq":
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
            return token_loss(out.logits, labels, per_row)
        return self._causal(input_ids, attention_mask, labels, position_ids, per_row)

    def _causal(self, input_ids, attention_mask, labels, position_ids, per_row: bool):
        inner = hf_model(self.model)
        transform = LOGIT_TRANSFORMS.get(getattr(inner.config, "model_type", None))
        backbone = inner.base_model if inner.base_model is not inner else None
        head = inner.get_output_embeddings()
        targets = labels[:, 1:]
        if transform is None or backbone is None or head is None:
            # the model's own forward; use_cache=False, or transformers does not detect packed rows
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False).logits
            return token_loss(logits[:, :-1], targets, per_row)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        keep = targets != IGNORE
        # the head runs on exactly the positions whose next token carries loss
        kept = hidden[:, :-1][keep]
        if self.fused_loss and not per_row and len(kept):
            from ift.training.liger import fused_loss_sum

            return fused_loss_sum(kept, head, targets[keep], inner.config), keep.sum()
        logits = transform(inner.config)(head(kept))
        return _reduce(F.cross_entropy(logits.float(), targets[keep], reduction="none"), keep, per_row)


def _reduce(losses: torch.Tensor, keep: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token losses (at the `keep` positions) summed over the batch, or per row."""
    if not per_row:
        return losses.sum(), keep.sum()
    rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]
    sums = torch.zeros(keep.shape[0], dtype=losses.dtype, device=losses.device).index_add_(0, rows, losses)
    return sums, keep.sum(-1)


def token_loss(logits: torch.Tensor, targets: torch.Tensor, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over positions whose target is not IGNORE, and their count."""
    keep = targets != IGNORE
    return _reduce(F.cross_entropy(logits[keep].float(), targets[keep], reduction="none"), keep, per_row)


def count_loss_tokens(batch: dict, kind: str) -> torch.Tensor:
    """Loss tokens in a collated batch, as CompletionLoss counts them (causal labels are shifted); a tensor on
    the batch's device, so counting does not wait for the device."""
    labels = batch["labels"]
    if kind == "causal":
        labels = labels[:, 1:]
    return (labels != IGNORE).sum()
