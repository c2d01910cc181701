"""The attention rule (ift/modeling/attention.py): which kernel a training run uses, for train and estimate."""

from __future__ import annotations

import pytest
import torch

from ift.modeling.attention import EAGER_MAX_LENGTH, training_attention
from ift.recipe import Recipe


def recipe(precision: str = "bf16", max_length: int = 180, attn: str = "auto") -> Recipe:
    return Recipe.model_validate({
        "model": {"name_or_path": "some/model", "attn_implementation": attn},
        "data": {"sources": [{"name": "x", "path": "x.jsonl"}], "max_length": max_length},
        "training": {"mixed_precision": precision, "output_dir": "runs/x"},
    })


@pytest.mark.parametrize("precision, max_length, device, kind, expected", [
    ("bf16", 180, "cpu", "causal", "eager"),
    ("bf16", EAGER_MAX_LENGTH, "cpu", "causal", "eager"),
    ("bf16", EAGER_MAX_LENGTH + 1, "cpu", "causal", None),  # scores grow with length^2: sdpa keeps memory flat
    ("no", 180, "cpu", "causal", None),  # fp32: the CPU's sdpa is as fast
    ("bf16", 180, "cuda", "causal", None),  # GPUs: fused kernels
    ("bf16", 180, "cpu", "seq2seq", None),
])
def test_auto_picks_eager_only_for_short_bf16_causal_training_on_the_cpu(precision, max_length, device, kind,
                                                                         expected):
    assert training_attention(recipe(precision, max_length), device, kind) == expected


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_an_explicit_choice_is_kept(attn):
    assert training_attention(recipe(attn=attn), "cpu", "causal") == attn
    assert training_attention(recipe("no", 4096, attn=attn), "cuda", "causal") == attn


def test_an_unknown_kernel_is_a_recipe_error():
    with pytest.raises(Exception, match="attn_implementation"):
        recipe(attn="flash")


@pytest.mark.parametrize("bf16, tolerance", [(False, 1e-5), (True, 0.02)])
def test_eager_and_sdpa_compute_the_same_loss_and_gradients(tiny_llama, bf16, tolerance):
    """What the switch relies on: the same function, with a padding mask; in bf16, to its rounding."""
    from ift.modeling.attention import set_attention

    torch.manual_seed(0)
    ids = torch.randint(5, tiny_llama.config.vocab_size, (4, 24))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # a left-padded row
    labels = ids.clone()
    labels[1, :8] = -100  # no loss predicted from padding (the first real token is a prompt token)
    results = []
    for name in ("sdpa", "eager"):
        assert set_attention(tiny_llama, name) or name == "sdpa"
        assert tiny_llama.config._attn_implementation == name
        tiny_llama.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = tiny_llama(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append((loss.detach().float(), {n: p.grad.clone() for n, p in tiny_llama.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=tolerance, rtol=tolerance)
    for n, sdpa_grad in results[0][1].items():  # relative to the gradient's own scale
        error = (sdpa_grad - results[1][1][n]).abs().max() / sdpa_grad.abs().max()
        assert error < tolerance, (n, float(error))
