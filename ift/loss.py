"""Cross-entropy over completion tokens, with the LM head run only where a label carries loss.

Most tokens of an instruction example are prompt, and the vocabulary is large (49k for SmolLM2):
projecting every hidden state to logits and then masking them away is the single largest waste of a
naive SFT step. `CompletionLoss` wraps the model so the whole computation (backbone, selective head,
loss) is one module: Accelerate's DDP/FSDP wrappers see it as the forward pass, and gradient sync
and sharding work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers are injected in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class CompletionLoss(nn.Module):
    """forward(batch) -> (sum of token losses, number of loss tokens) for causal or seq2seq models.

    Returning the sum lets the loop divide by the token count of the whole accumulated (and gathered)
    batch, so the loss is a mean over completion tokens, not a mean of micro-batch means.
    """

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, **extra):
        if self.kind == "seq2seq":
            return self._seq2seq(input_ids, attention_mask, labels)
        return self._causal(input_ids, attention_mask, labels, position_ids)

    def _causal(self, input_ids, attention_mask, labels, position_ids):
        inner = hf_model(self.model)
        backbone = inner.base_model if inner.base_model is not inner else None
        head = inner.get_output_embeddings()
        if backbone is None or head is None:  # an architecture without the usual split: full logits
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            return token_loss(logits[:, :-1], labels[:, 1:])
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        # the head runs on exactly the positions whose next token carries loss
        logits = head(hidden[:, :-1][keep])
        softcap = getattr(inner.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss, keep.sum()

    def _seq2seq(self, input_ids, attention_mask, labels):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
        return token_loss(out.logits, labels)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over positions whose target is not IGNORE, and their count."""
    keep = targets != IGNORE
    loss = F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
    return loss, keep.sum()


def count_loss_tokens(batch: dict, kind: str) -> int:
    """Loss tokens in a collated batch, as CompletionLoss counts them (causal labels are shifted)."""
    labels = batch["labels"]
    if kind == "causal":
        labels = labels[:, 1:]
    return int((labels != IGNORE).sum())
