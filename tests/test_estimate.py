"""ift.estimate.report: memory arithmetic on known configurations, exact LoRA/QLoRA counts, activations against
autograd's own saved tensors, fit advice order, FLOPs against the profiler, token counts, and the CLI."""

from __future__ import annotations

import contextlib
import functools
import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from ift.errors import IftError
from ift.estimate.advice import fit_advice, fits
from ift.estimate.compute import compute
from ift.estimate.memory import activation_bytes, memory, parse_memory, quantized_bytes, USABLE_FRACTION
from ift.estimate.model import model_info
from ift.estimate.plan import Setup

LLAMA = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def adapter(method="none", targets=("q_proj", "v_proj"), r=8, dropout=0.05, bias="none"):
    targets = targets if isinstance(targets, str) else list(targets)
    return SimpleNamespace(method=method, target_modules=targets, r=r, dropout=dropout, bias=bias)


def llama_config(**over):
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA, **over})


def info_for(config=None, ad=None, kind="causal"):
    from ift.modeling.adapters import lora_target_modules

    return model_info(config or llama_config(), ad or adapter(), kind, auto_targets=lora_target_modules)


def setup(**over) -> Setup:
    base = dict(method="none", batch_size=3, grad_accum=1, seq_len=40, loss_tokens=10, gradient_checkpointing=False,
                weight_dtype="float32", mixed_precision="no", lora_r=8, lora_dropout=0.05, device="cpu")
    return Setup(**{**base, **over})


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, expected", [("24GB", 24 * 10**9), ("80GiB", 80 * 2**30), ("16000MB", 16 * 10**9),
                                            ("1.5 TB", 15 * 10**11), ("24", 24 * 10**9), ("512mib", 512 * 2**20)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["24 gigs", "GB", "-3GB", "0GB", "", "2e9"])
def test_parse_memory_rejects_bad_sizes(text):
    with pytest.raises(IftError) as err:
        parse_memory(text)
    assert "--gpu-memory" in err.value.line() and "24GB" in err.value.line()


# ---------------------------------------------------------------- weights, gradients, optimizer states


@functools.lru_cache(maxsize=1)
def _tinyllama_1b():
    # TinyLlama-1.1B's shape: built on the meta device, so counting costs nothing
    return info_for(llama_config(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                 num_attention_heads=32, num_key_value_heads=4))


def test_1b_parameters_in_fp32_hold_4_bytes_each_and_full_adamw_needs_16():
    info = _tinyllama_1b()
    n = info.params.total
    assert n == 1_100_048_384  # TinyLlama-1.1B's published count
    mem = memory(info, setup())
    assert mem.weights == 4 * n  # 1.1 B parameters in fp32: 4.4 GB
    assert mem.gradients == 4 * n and mem.optimizer == 8 * n and mem.autocast_copies == 0
    assert (mem.weights + mem.gradients + mem.optimizer) / n == 16  # before activations


def test_bf16_autocast_keeps_fp32_master_weights_and_bf16_copies():
    info = _tinyllama_1b()
    pc = info.params
    mem = memory(info, setup(mixed_precision="bf16"))
    assert mem.weights == 4 * pc.total  # the fp32 weights are the master copy
    assert mem.autocast_copies == 2 * (pc.linear + pc.head)  # bf16 copies of every matmul weight
    assert mem.gradients == 4 * pc.total and mem.optimizer == 8 * pc.total
    per_param = (mem.weights + mem.gradients + mem.optimizer + mem.autocast_copies) / pc.total
    assert 17.5 < per_param <= 18
    pure = memory(info, setup(weight_dtype="bfloat16", mixed_precision="bf16"))
    assert pure.autocast_copies == 0 and (pure.weights + pure.gradients + pure.optimizer) / pc.total == 8


def test_lora_keeps_a_frozen_base_and_fp32_adapter_states():
    info = info_for(ad=adapter("lora"))
    n_adapter = info.lora_params(8)
    mem = memory(info, setup(method="lora", weight_dtype="bfloat16"))
    assert mem.weights == 2 * info.params.total and mem.adapter == 4 * n_adapter
    assert mem.gradients == 4 * n_adapter and mem.optimizer == 8 * n_adapter


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear", "auto", ("down_proj", "embed_tokens")])
@pytest.mark.parametrize("tied", [False, True])
def test_lora_count_is_exact_against_peft(targets, tied):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from ift.modeling.adapters import lora_target_modules

    config = llama_config(tie_word_embeddings=tied)
    info = info_for(config, adapter("lora", targets, r=4))
    model = LlamaForCausalLM(config)
    peft_targets = lora_target_modules(model) if targets == "auto" else (
        targets if isinstance(targets, str) else list(targets))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=peft_targets))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert info.lora_params(4) == trainable
    assert info.params.total == total - trainable


def test_qlora_weight_bytes_formula():
    n = 64 * 128  # 128 blocks of 64
    assert quantized_bytes([n], double_quant=False) == n // 2 + 128 * 4 + 64
    # double quantization: uint8 absmax per block, one fp32 per 256 blocks, the 256-entry fp32 code, an offset
    assert quantized_bytes([n], double_quant=True) == n // 2 + 128 + 4 + 1024 + 4 + 64
    big = 4096 * 4096  # the code table is a fixed cost: on real layers double quantization saves ~0.37 bit/weight
    saved_bits = 8 * (quantized_bytes([big], False) - quantized_bytes([big], True)) / big
    assert 0.36 < saved_bits < 0.38


def test_qlora_weight_bytes_match_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    config = llama_config(hidden_size=128, intermediate_size=320)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    for double in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double,
            bnb_4bit_compute_dtype=torch.bfloat16))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # as ift.modeling.loading does
        actual = 0
        for param in model.parameters():
            actual += param.numel() * param.element_size()
            state = getattr(param, "quant_state", None)
            if state is not None:
                actual += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * 4
                if state.nested:
                    actual += state.state2.absmax.numel() * 4 + state.state2.code.numel() * 4 + 4
        info = info_for(config, adapter("qlora"))
        assert memory(info, setup(method="qlora", double_quant=double)).weights == actual


# ---------------------------------------------------------------- activations: the formula vs autograd


def _saved_bytes(model, kind, b, s, loss_from, autocast):
    """Bytes of the distinct tensors autograd saves for backward in one forward (parameters excluded)."""
    from ift.training.loss import CompletionLoss

    torch.manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (b, s))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    labels = ids.clone()
    labels[:, :loss_from] = -100
    if kind == "seq2seq":
        labels = torch.randint(3, vocab, (b, s // 2))
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params:
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        CompletionLoss(model, kind)(input_ids=ids, attention_mask=mask, labels=labels)
    return sum(seen.values())


ACTIVATION_CASES = [
    # method, targets, dropout, dtype, autocast, checkpointing
    ("none", (), 0.0, torch.float32, False, False),
    ("none", (), 0.0, torch.float32, True, False),
    ("none", (), 0.0, torch.bfloat16, False, False),
    ("lora", ("q_proj", "v_proj"), 0.05, torch.float32, False, False),
    ("lora", "all-linear", 0.05, torch.bfloat16, False, False),
    ("lora", "all-linear", 0.0, torch.float32, True, False),
    ("lora", "all-linear", 0.05, torch.float32, True, False),
    ("none", (), 0.0, torch.float32, False, True),
    ("lora", ("q_proj", "v_proj"), 0.05, torch.float32, False, True),
]


@pytest.mark.parametrize("method, targets, dropout, dtype, autocast, checkpointing", ACTIVATION_CASES)
def test_activation_formula_matches_autograds_saved_tensors(method, targets, dropout, dtype, autocast, checkpointing):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = llama_config()
    model = LlamaForCausalLM(config).to(dtype)
    ad = adapter(method, targets, 8, dropout)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules=ad.target_modules, lora_dropout=dropout))
        from ift.modeling.compute import use_fast_dropout

        use_fast_dropout(model)  # as ift.modeling.loading attaches adapters
        if autocast:  # as ift trains LoRA under autocast: the frozen Linears held in bf16
            from ift.modeling.compute import frozen_linears_in

            frozen_linears_in(model, torch.bfloat16)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if method == "lora":
            model.enable_input_require_grads()
    model.train()
    measured = _saved_bytes(model, "causal", 3, 40, 30, autocast)
    info = info_for(config, ad)
    st = setup(method=method, lora_dropout=dropout, gradient_checkpointing=checkpointing,
               weight_dtype="float32" if dtype == torch.float32 else "bfloat16",
               mixed_precision="bf16" if autocast else "no")
    # autocast's bf16 weight copies are saved tensors too; the estimate books them separately
    estimated = activation_bytes(info.arch, info.params, st).saved + memory(info, st).autocast_copies
    assert estimated == pytest.approx(measured, rel=0.04)


@pytest.mark.parametrize("method", ["none", "lora"])
def test_seq2seq_activations_are_close(method):
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=300, d_model=64, d_ff=160, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    ad = adapter(method, ("q", "v"), 8, 0.05)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q", "v"], lora_dropout=0.05))
    model.train()
    measured = _saved_bytes(model, "seq2seq", 3, 40, 0, False)
    info = info_for(config, ad, kind="seq2seq")
    st = setup(method=method, loss_tokens=20)
    assert activation_bytes(info.arch, info.params, st).saved == pytest.approx(measured, rel=0.1)


def test_checkpointing_and_smaller_batches_shrink_activations():
    info = info_for()
    full = activation_bytes(info.arch, info.params, setup(batch_size=8, seq_len=128))
    ckpt = activation_bytes(info.arch, info.params, setup(batch_size=8, seq_len=128, gradient_checkpointing=True))
    half = activation_bytes(info.arch, info.params, setup(batch_size=4, seq_len=128))
    assert ckpt.peak < full.peak and ckpt.saved < full.saved / 2
    assert half.peak == pytest.approx(full.peak / 2, rel=0.05)
    assert full.peak > full.saved  # the loss's gradients come on top at the start of backward


# ---------------------------------------------------------------- fit advice


def _budget_between(info, fitting: Setup, failing: Setup) -> int:
    """A device size where `fitting` fits and `failing` does not."""
    low, high = memory(info, fitting).peak, memory(info, failing).peak
    assert low < high
    return math.ceil((low + high) / 2 / USABLE_FRACTION)


def test_advice_prefers_a_smaller_batch_with_accumulation():
    info = info_for()
    st = setup(batch_size=8, grad_accum=2, seq_len=128)
    budget = _budget_between(info, replace(st, batch_size=4), st)
    advice = fit_advice(info, st, budget)
    assert (advice.setup.batch_size, advice.setup.grad_accum) == (4, 4)  # divisors keep the effective batch of 16
    assert advice.setup.gradient_checkpointing is False and advice.setup.method == "none"
    assert "training.per_device_train_batch_size=" + str(advice.setup.batch_size) in advice.overrides


def test_advice_order_checkpointing_then_lora_then_qlora_then_fsdp():
    info = info_for(llama_config(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4))
    st = setup(batch_size=1, seq_len=512, loss_tokens=512)
    ckpt = replace(st, gradient_checkpointing=True)
    lora = replace(ckpt, method="lora")
    # checkpointing is proposed before LoRA, even where LoRA alone would fit too
    assert fits(info, replace(st, method="lora"), _budget_between(info, ckpt, st))
    assert fit_advice(info, st, _budget_between(info, ckpt, st)).changes[0].startswith("gradient checkpointing")
    # with checkpointing on: LoRA, then QLoRA
    advice = fit_advice(info, ckpt, _budget_between(info, lora, ckpt))
    assert advice.setup.method == "lora" and advice.overrides == ("adapter.method=lora",)
    qlora = replace(lora, method="qlora", weight_dtype="float32")
    assert fit_advice(info, lora, _budget_between(info, qlora, lora)).setup.method == "qlora"
    # LoRA comes before FSDP even where sharding over 2 GPUs would fit
    sharded = replace(ckpt, fsdp=2, gpus=2)
    assert memory(info, sharded).peak < memory(info, ckpt).peak
    assert fit_advice(info, ckpt, _budget_between(info, sharded, ckpt)).setup.method == "lora"


def test_advice_shards_with_fsdp_when_nothing_else_is_left():
    info = info_for(llama_config(vocab_size=300, hidden_size=512, intermediate_size=2048, num_hidden_layers=8))
    qlora = setup(method="qlora", batch_size=1, seq_len=32, loss_tokens=8, gradient_checkpointing=True)
    sharded = replace(qlora, fsdp=2, gpus=2)
    advice = fit_advice(info, qlora, _budget_between(info, sharded, qlora))
    assert advice.setup.fsdp == 2 and advice.changes == ("FSDP full sharding over 2 GPUs (accelerate config: FSDP, "
                                                         "FULL_SHARD)",)
    assert fit_advice(info, qlora, 10**15) is None  # it fits: no advice


def test_advice_stacks_changes_when_no_single_one_fits_and_gives_up_when_nothing_does():
    info = info_for(llama_config(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4))
    st = setup(batch_size=16, seq_len=512, loss_tokens=512)
    target = replace(st, batch_size=1, grad_accum=16, gradient_checkpointing=True, method="lora")
    budget = math.ceil(memory(info, target).peak * 1.001 / USABLE_FRACTION)
    singles = [replace(st, batch_size=1, grad_accum=16), replace(st, gradient_checkpointing=True),
               replace(st, method="lora"), replace(st, method="qlora", weight_dtype="float32")]
    assert not any(fits(info, s, budget) for s in singles)
    advice = fit_advice(info, st, budget)
    assert fits(info, advice.setup, budget) and len(advice.changes) == 3
    assert advice.setup.gradient_checkpointing and advice.setup.method == "lora" and advice.setup.batch_size < 16
    assert advice.setup.batch_size * advice.setup.grad_accum == 16
    assert fit_advice(info, st, 1000) is None  # 1 kB: nothing helps


# ---------------------------------------------------------------- compute


@pytest.mark.parametrize("method, checkpointing", [("none", False), ("lora", False), ("none", True), ("lora", True)])
def test_flops_match_the_profiler(method, checkpointing):
    from peft import LoraConfig, get_peft_model
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaForCausalLM

    from ift.training.loss import CompletionLoss

    config = llama_config()
    model = LlamaForCausalLM(config)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if method == "lora":
            model.enable_input_require_grads()  # as ift.modeling.loading does
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    model.train()
    b, s, loss_from = 2, 32, 24
    ids = torch.randint(3, 300, (b, s))
    labels = ids.clone()
    labels[:, :loss_from] = -100
    with sdpa_kernel(SDPBackend.MATH), profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        loss, n = CompletionLoss(model, "causal")(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        loss.backward()
    counted = sum(e.flops for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm") and e.flops)
    info = info_for(config, adapter(method, ("q_proj", "v_proj")))
    st = setup(method=method, gradient_checkpointing=checkpointing, lora_dropout=0.0)
    estimated = compute(info, st, b * s, b * (s - loss_from), s, per="step")
    assert estimated.flops == pytest.approx(counted, rel=0.03)
    if method == "none" and not checkpointing:
        n_matmul = info.params.linear + info.params.head
        assert estimated.rule_of_thumb == 6 * n_matmul * b * s


def test_time_uses_gpus_peak_and_utilisation():
    info = info_for()
    c = compute(info, setup(gpus=4), 1e9, 1e8, 512, peak_tflops=100, mfu=0.5)
    assert c.seconds == pytest.approx(c.flops / (4 * 100e12 * 0.5))


# ---------------------------------------------------------------- token counts


def test_token_count_from_tokenized_columns():
    from datasets import Dataset

    from ift.estimate.tokens import _count

    ds = Dataset.from_dict({"input_ids": [[1, 2, 3, 4], [5, 6], [7, 8, 9]],
                            "labels": [[-100, -100, 3, 4], [5, 6], [-100, 8, 9]]})
    causal = _count(ds, "causal")
    assert (causal.rows, causal.tokens, causal.max_tokens) == (3, 9, 4)
    assert causal.loss_tokens == 2 + 1 + 2 and causal.max_loss_tokens == 2  # the first label has no prediction
    seq2seq = _count(ds, "seq2seq")
    assert seq2seq.loss_tokens == 2 + 2 + 2


# ---------------------------------------------------------------- the CLI


def _recipe(tmp_path, tokenizer=None) -> str:
    """A recipe on a model folder that holds only config.json (and a tokenizer when data is counted)."""
    folder = tmp_path / "model"
    llama_config(vocab_size=len(tokenizer) if tokenizer else 300).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    rows = [{"text": f"the bank reported {w} results and shares moved {i} points"}
            for i, w in enumerate(["strong", "weak", "flat", "mixed"] * 10)]
    data = tmp_path / "news.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{name_or_path: {folder}, dtype: float32, cache_dir: {tmp_path / 'cache'}}}\n"
        f"data: {{sources: [{{path: {data}}}], max_length: 64, validation_size: 4, test_size: 4}}\n"
        f"training: {{output_dir: {tmp_path / 'run'}, per_device_train_batch_size: 4, gradient_accumulation_steps: 2,"
        f" num_train_epochs: 2}}\n")
    return str(recipe)


def test_cli_json_without_data(tmp_path, capsys):
    from ift.cli import main

    assert main(["estimate", _recipe(tmp_path), "adapter.method=lora", "--no-data", "--json", "--gpu-memory", "1GB",
                 "--peak-tflops", "10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"]["method"] == "lora" and out["parameters"]["trainable"] == out["parameters"]["lora"]["parameters"]
    assert out["memory"]["fits"] is True and out["memory"]["peak"] <= out["memory"]["usable"]
    assert out["setup"]["seq_len"] == 64 and out["data"] is None
    assert out["compute"]["per"] == "step" and out["compute"]["seconds"] > 0
    assert set(out["memory"]["by_method"]) == {"none", "lora", "qlora"}


def test_cli_counts_tokens_and_caches_them(tmp_path, capsys, monkeypatch, tiny_tokenizer):
    from ift.cli import main

    recipe = _recipe(tmp_path, tiny_tokenizer)
    assert main(["estimate", recipe, "--json", "--device", "cpu", "--gpu-memory", "2kB"]) == 0
    out = json.loads(capsys.readouterr().out)
    data = out["data"]
    assert data["rows"] == 32 and data["tokens"] > data["rows"] and data["max_tokens"] <= 64
    assert data["steps_per_epoch"] == math.ceil(math.ceil(32 / 4) / 2) and data["total_steps"] == 2 * data["steps_per_epoch"]
    # memory at the longest real row, not max_length: the CPU run pads to 16 but never past it
    # (ift.data.collate.train_padding); a multiple the recipe names pads it
    assert out["setup"]["seq_len"] == data["max_tokens"] < 64
    assert main(["estimate", recipe, "data.pad_to_multiple_of=48", "--json", "--device", "cuda"]) == 0
    assert json.loads(capsys.readouterr().out)["setup"]["seq_len"] == 48 * math.ceil(data["max_tokens"] / 48)
    assert out["memory"]["fits"] is False and out["memory"]["advice"] is None
    assert out["scale"]["tokens_per_parameter"] == pytest.approx(2 * data["tokens"] / out["parameters"]["total"])
    # the second run reads the cached count instead of preparing the data again
    import ift.data.prepare

    monkeypatch.setattr(ift.data.prepare, "build_splits", lambda *a, **k: pytest.fail("data prepared twice"))
    assert main(["estimate", recipe, "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == data
    assert main(["estimate", recipe, "--json", "--device", "cuda"]) == 0  # no padding there
    assert json.loads(capsys.readouterr().out)["setup"]["seq_len"] == data["max_tokens"]


def test_a_cpu_estimate_is_for_the_precision_ift_train_runs_on_this_cpu(tmp_path, capsys, monkeypatch):
    """On a CPU without native bf16, ift train runs a bf16 recipe in fp32: `--device cpu` estimates that run (it
    estimated bf16 autocast copies and activations the run never held)."""
    import torch

    from ift.cli import main

    def cpu_estimate(*overrides: str) -> tuple[dict, str]:
        assert main(["estimate", _recipe(tmp_path), "adapter.method=lora", *overrides, "--no-data", "--json",
                     "--device", "cpu"]) == 0
        out = capsys.readouterr()
        return json.loads(out.out), out.err

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    native, note = cpu_estimate("training.mixed_precision=bf16")
    assert native["setup"]["mixed_precision"] == "bf16" and note == ""
    fp32, _ = cpu_estimate("training.mixed_precision=no")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    fallback, note = cpu_estimate("training.mixed_precision=bf16")
    assert "no native bf16 matrix multiply" in note and "this estimate is for that run" in note
    assert fallback["setup"]["mixed_precision"] == "no"
    assert fallback["memory"]["peak"] == fp32["memory"]["peak"] != native["memory"]["peak"]
    assert main(["estimate", _recipe(tmp_path), "adapter.method=lora", "training.mixed_precision=bf16",
                 "--no-data", "--json"]) == 0
    cuda = json.loads(capsys.readouterr().out)
    assert cuda["setup"]["mixed_precision"] == "bf16"  # a GPU's bf16 does not depend on this CPU


def test_cli_readable_report(tmp_path, capsys):
    from ift.cli import main

    assert main(["estimate", _recipe(tmp_path), "--no-data", "--gpu-memory", "3MB"]) == 0
    out = capsys.readouterr().out
    assert "memory per device" in out and "peak by method" in out and "does not fit" in out
    assert "cheapest change" in out or "no change" in out


@pytest.mark.parametrize("flag, value", [("--gpu-memory", "24 gigs"), ("--gpus", "0"), ("--mfu", "2"),
                                         ("--peak-tflops", "fast")])
def test_cli_bad_numbers_exit_2_with_one_clear_line(tmp_path, capsys, flag, value):
    from ift.cli import main

    assert main(["estimate", _recipe(tmp_path), "--no-data", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_a_cpu_estimate_counts_the_attention_kernel_ift_train_picks(tmp_path, capsys, monkeypatch):
    """A short bf16 run on the CPU trains with eager attention (ift/modeling/attention.py), which keeps the scores
    for backward: `--device cpu` estimates that kernel, a GPU estimate and `attn_implementation: sdpa` the fused one."""
    import torch

    from ift.cli import main

    def estimate(*args: str) -> dict:
        assert main(["estimate", _recipe(tmp_path), "adapter.method=lora", "training.mixed_precision=bf16",
                     "--no-data", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    eager = estimate("--device", "cpu")
    fused = estimate("model.attn_implementation=sdpa", "--device", "cpu")
    assert (eager["model"]["attention"], fused["model"]["attention"]) == ("eager", "fused")
    assert eager["memory"]["activations"] > fused["memory"]["activations"]
    assert estimate()["model"]["attention"] == "fused"  # the GPU keeps sdpa
    assert estimate("model.attn_implementation=eager")["model"]["attention"] == "eager"


def test_a_bf16_checkpoint_full_finetune_is_estimated_as_it_trains_with_fp32_master_weights(tmp_path):
    """A bf16 checkpoint (dtype auto) trains on float32 master weights: the estimate's weights, gradients and
    AdamW states are within 10% of the bytes the training loop holds after its first step."""
    import yaml

    from ift.estimate.model import load_model_info
    from ift.estimate.plan import setup_from_recipe
    from ift.recipe import load_recipe
    from ift.train import FineTune
    from conftest import build_tiny_llama, build_tiny_tokenizer
    from test_train import reset_accelerate_state, toy_recipe

    base = tmp_path / "bf16-base"
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer).to(torch.bfloat16).save_pretrained(base)
    tokenizer.save_pretrained(base)
    path = toy_recipe(tmp_path, max_steps=1, eval_steps=100, save_steps=100)
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {"name_or_path": str(base), "dtype": "auto"}
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)

    info = load_model_info(recipe.model, recipe.adapter)
    assert info.config_dtype == "bfloat16"
    mem = memory(info, setup_from_recipe(recipe, info, device="cpu"))
    estimated = mem.weights + mem.gradients + mem.optimizer

    run = FineTune(recipe)
    try:
        run.setup()
        run.train_window([next(iter(run.train_dl))])
        model = run.accelerator.unwrap_model(run.loss_model).model
        params = list(model.parameters())
        weights = sum(p.numel() * p.element_size() for p in params)
        # gradients are freed after the step (zero_grad(set_to_none)); during backward they are the size of
        # the trainable weights
        gradients = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        states = sum(t.numel() * t.element_size() for state in run.optimizer.state.values()
                     for t in state.values() if torch.is_tensor(t) and t.ndim > 0)
        held = weights + gradients + states
    finally:
        run.cleanup()
        reset_accelerate_state()
    assert {p.dtype for p in params} == {torch.float32}
    assert abs(estimated - held) <= 0.1 * held, (estimated, held)


def test_lora_advice_for_a_bf16_checkpoint_holds_the_frozen_base_as_loaded():
    """A full fine-tune of a bf16 checkpoint is counted in float32; the LoRA it is advised holds the base in bf16."""
    info = info_for(ad=adapter("lora"))
    full = setup(batch_size=1, gradient_checkpointing=True, loaded_dtype="bfloat16")
    lora_bf16 = memory(info, replace(full, method="lora", weight_dtype="bfloat16")).peak
    lora_fp32 = memory(info, replace(full, method="lora", weight_dtype="float32")).peak
    assert lora_bf16 < lora_fp32 < memory(info, full).peak
    advice = fit_advice(info, full, int(lora_bf16 / USABLE_FRACTION) + 1)
    assert advice is not None and advice.setup.method == "lora" and advice.setup.weight_dtype == "bfloat16"
