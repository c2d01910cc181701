"""ift/modeling/compute.py: LoRA's cheaper CPU dropout and the frozen base held in autocast's dtype."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import build_tiny_llama
from ift.modeling.compute import LoraDropout, _keep_mask, frozen_linears_in, use_fast_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_the_mask_keeps_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    n = 1_000_000
    dropout = LoraDropout(p)
    keep = _keep_mask(torch.Size([n]), dropout.drop_levels, torch.device("cpu"))
    q = 1 - dropout.drop_levels / 65536
    assert abs(q - (1 - p)) < 1 / 65536
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(keep.float().mean().item() - q) < 5 * sigma
    # the four 16-bit draws of one 64-bit word are independent: neighbours agree as often as chance says
    pairs = keep[0::2] == keep[1::2]
    agree = q * q + (1 - q) * (1 - q)
    assert abs(pairs.float().mean().item() - agree) < 5 * math.sqrt(agree * (1 - agree) / (n // 2))


def test_output_and_gradient_are_nn_dropouts_formula_for_the_drawn_mask(monkeypatch):
    """y = x * keep / (1 - p'), dy/dx = keep / (1 - p'): nn.Dropout's math, for the mask the module drew."""
    import ift.modeling.compute as compute

    drawn = []
    original = compute._keep_mask
    monkeypatch.setattr(compute, "_keep_mask", lambda *a: drawn.append(original(*a)) or drawn[-1])
    torch.manual_seed(1)
    x = torch.randn(64, 48, requires_grad=True)
    dropout = LoraDropout(0.1).train()
    y = dropout(x)
    (keep,) = drawn
    scale = 1 / (1 - dropout.drop_levels / 65536)
    torch.testing.assert_close(y, x.detach() * keep * scale, rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * keep * scale, rtol=0, atol=0)
    assert 0 < keep.sum() < keep.numel()
    # unbiased, like nn.Dropout: the mean over many draws is the input
    big = torch.ones(2_000_000)
    assert abs(dropout(big).mean().item() - 1) < 0.002


def test_identity_in_eval_mode_and_at_p_zero():
    x = torch.randn(8, 8)
    assert LoraDropout(0.3).eval()(x) is x
    assert LoraDropout(0.0).train()(x) is x
    with pytest.raises(ValueError):
        LoraDropout(1.0)


def _lora(model, dropout: float):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))


def test_ift_loads_lora_with_the_fast_dropout(tmp_path, tiny_tokenizer):
    from ift.modeling.loading import load
    from ift.recipe import AdapterConfig, ModelConfig

    build_tiny_llama(tiny_tokenizer).save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    for p, expected in ((0.05, LoraDropout), (0.0, nn.Identity)):
        model = load(ModelConfig(name_or_path=str(tmp_path / "base")),
                     AdapterConfig(method="lora", r=4, alpha=8, dropout=p), tokenizer=tiny_tokenizer).model
        dropouts = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
                    for d in m.lora_dropout.values()]
        assert len(dropouts) == 2 * 7 and all(type(d) is expected for d in dropouts)
        if p:
            assert all(d.p == p for d in dropouts)


@pytest.mark.parametrize("share", [True, False])
def test_fast_dropout_trains_like_peft_in_expectation(tiny_tokenizer, share):
    """Same model, same batches: the loss of a few LoRA steps with ift's dropout stays within the spread of
    peft's own nn.Dropout runs over seeds (the masks differ, the distribution does not)."""
    ids = torch.randint(4, len(tiny_tokenizer), (8, 24), generator=torch.Generator().manual_seed(0))

    def final_loss(fast: bool, seed: int) -> float:
        model = _lora(build_tiny_llama(tiny_tokenizer), 0.3)
        if fast:
            assert use_fast_dropout(model, share_inputs=share) == 14
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(seed)
        for _ in range(6):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        return loss.item()

    peft_losses = [final_loss(False, s) for s in range(4)]
    ift_losses = [final_loss(True, s) for s in range(4)]
    spread = max(peft_losses) - min(peft_losses)
    assert spread > 0  # dropout really is on
    assert abs(sum(ift_losses) / 4 - sum(peft_losses) / 4) < 2 * spread + 1e-3


def _dropout_outputs(model) -> dict[str, torch.Tensor]:
    outputs = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraDropout):
            module.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(name, out))
    return outputs


def test_adapters_reading_one_input_share_one_dropped_copy(tiny_tokenizer):
    """q/k/v read one normed hidden state and gate/up another: with share_inputs each group gets one dropped
    copy (the same tensor), o and down their own; without it every adapter draws its own mask, as peft does."""
    ids = torch.randint(4, len(tiny_tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    for share in (True, False):
        model = _lora(build_tiny_llama(tiny_tokenizer), 0.3).train()
        use_fast_dropout(model, share_inputs=share)
        outputs = _dropout_outputs(model)
        model(input_ids=ids)
        for layer in (0, 1):
            out = {proj: next(v for k, v in outputs.items() if f"layers.{layer}." in k and f".{proj}." in k)
                   for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
            groups = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",)]
            for group in groups:
                assert all((out[p] is out[group[0]]) == share for p in group[1:])
            firsts = [out[g[0]] for g in groups]
            assert len({id(t) for t in firsts}) == len(firsts)
        # a new forward draws new masks: nothing is reused from the last one, though the input is the same
        before = {k: v for k, v in outputs.items()}
        model(input_ids=ids)
        assert all(not torch.equal(outputs[k], before[k]) for k in outputs)


def test_a_shared_copy_is_not_reused_for_a_changed_or_different_tensor():
    from ift.modeling.compute import _LastInput

    shared = _LastInput()
    a, b = LoraDropout(0.5, shared).train(), LoraDropout(0.5, shared).train()
    x = torch.randn(64, 32)
    assert b(x) is a(x)
    first = b(x)
    x.mul_(2)  # changed in place: its version moved on
    assert a(x) is not first
    assert b(x.clone()) is not a(x)
    assert LoraDropout(0.25, shared).train()(x) is not a(x)  # another p, another mask

    import copy

    model = nn.Sequential(a, b)
    model(x)
    twin = copy.deepcopy(model)  # the saved output is part of a graph: it must not be copied, nor shared
    assert twin[0].shared is twin[1].shared and twin[0].shared is not shared and twin[0].shared.out is None


def test_shared_masks_give_peft_per_adapter_numbers_for_the_same_masks(tiny_tokenizer):
    """peft's per-adapter path is the reference: replaying the masks ift drew (one per shared input) as each
    adapter's own dropout gives the same loss and adapter gradients."""
    import copy

    ids = torch.randint(4, len(tiny_tokenizer), (4, 20), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    reference = _lora(build_tiny_llama(tiny_tokenizer), 0.3).train()
    model = copy.deepcopy(reference)
    use_fast_dropout(model)
    outputs = _dropout_outputs(model)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert len({id(t) for t in outputs.values()}) == 2 * 4  # shared: four inputs per layer

    class Replay(nn.Module):
        def __init__(self, drawn: torch.Tensor, scale: float) -> None:
            super().__init__()
            self.keep, self.scale = drawn != 0, scale

        def forward(self, x):
            return x * self.keep * self.scale

    for name, module in reference.named_modules():
        if isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict):
            fast = model.get_submodule(name).lora_dropout["default"]
            module.lora_dropout["default"] = Replay(outputs[f"{name}.lora_dropout.default"].detach(), fast.scale)
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    for name in grads:  # x's gradient: masked once after summing vs masked per adapter then summed
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_frozen_base_in_bf16_gives_autocasts_numbers(tiny_tokenizer):
    """LoRA under bf16 autocast: loss and every adapter gradient equal, bit for bit, with the frozen Linear
    weights held in bf16 or cast by autocast from float32; embeddings, norms and adapters stay float32."""
    ids = torch.randint(4, len(tiny_tokenizer), (4, 20), generator=torch.Generator().manual_seed(0))

    def step(cast: bool):
        model = _lora(build_tiny_llama(tiny_tokenizer), 0.0)
        model.train()
        saved = frozen_linears_in(model, torch.bfloat16) if cast else 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return model, saved, loss, grads

    reference, _, ref_loss, ref_grads = step(cast=False)
    model, saved, loss, grads = step(cast=True)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    frozen_linear = [n for n in dtypes if "base_layer.weight" in n or "lm_head.weight" in n]  # an untied head too
    assert frozen_linear and all(dtypes[n] == torch.bfloat16 for n in frozen_linear)
    assert all(dtypes[n] == torch.float32 for n in dtypes if "lora_" in n or "norm" in n or "embed_tokens" in n)
    assert saved == 2 * sum(model.get_parameter(n).numel() for n in frozen_linear)


def test_a_tied_head_and_trainable_weights_are_left_alone(tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    frozen_linears_in(model, torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16
