"""The loss-position head gives each architecture's own loss: `model(labels=...)` is the reference."""

from __future__ import annotations

import pytest
import torch

from ift.training.loss import IGNORE, LOGIT_TRANSFORMS, CompletionLoss

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
# architectures with a transform of their logits get non-trivial values for it
CAUSAL = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 8}, "phi3": {}, "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 3.0},
    "granite": {"logits_scaling": 4.0}, "cohere": {"logit_scale": 0.3},
    "olmo2": {},  # not in LOGIT_TRANSFORMS: the model's own forward is used
}


def _batch(prompt_len: int = 5):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :prompt_len] = IGNORE
    labels[mask == 0] = IGNORE
    return ids, mask, labels


@pytest.mark.parametrize("model_type", sorted(CAUSAL))
def test_loss_head_equals_the_models_own_loss(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SMALL, **CAUSAL[model_type])
    model = AutoModelForCausalLM.from_config(config).eval()
    ids, mask, labels = _batch()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        total, n = CompletionLoss(model, "causal")(input_ids=ids, attention_mask=mask, labels=labels)
        rows, counts = CompletionLoss(model, "causal")(input_ids=ids, attention_mask=mask, labels=labels,
                                                       per_row=True)
    torch.testing.assert_close(total / n, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows.sum(), total, atol=1e-4, rtol=1e-5)
    assert int(counts.sum()) == int(n) == int((labels[:, 1:] != IGNORE).sum())
    assert (model_type in LOGIT_TRANSFORMS) == (model_type != "olmo2")


def test_seq2seq_loss_equals_the_models_own_loss(tiny_t5):
    model = tiny_t5.eval()
    ids, mask, labels = _batch(prompt_len=0)
    ids = ids % model.config.vocab_size
    labels = torch.where(labels == IGNORE, labels, labels % model.config.vocab_size)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        total, n = CompletionLoss(model, "seq2seq")(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(total / n, reference, atol=1e-5, rtol=1e-5)


def test_fallback_forward_runs_without_a_cache(monkeypatch):
    """Without use_cache=False transformers builds a cache and no longer detects packed rows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("olmo2", **SMALL)).eval()
    seen = {}
    original = type(model).forward

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    ids, mask, labels = _batch()
    CompletionLoss(model, "causal")(input_ids=ids, attention_mask=mask, labels=labels)
    assert seen.get("use_cache") is False
