"""GGUF writing for `ift export`: tensors in llama.cpp's layout, the byte-level BPE vocabulary, metadata, stop tokens.

The inverse of the GGUF -> transformers conversion `ift.modeling.model_source` relies on (transformers' GGUF reader):

- weights: the adapter merged into the unquantized float32 base (also for QLoRA runs, as `ift merge` does),
  tensor names through gguf's own name map (`gguf.get_tensor_name_map`), Llama-family Q/K rows permuted the
  way llama.cpp's converter does (its rotary embedding rotates adjacent pairs; transformers rotates halves);
  1-D tensors (norms, biases) stay float32, matrices become f16, bf16 or q8_0 (`gguf.quants`); a tied LM head
  is not written twice.
- metadata: llama.cpp's keys for the architecture (context length, sizes, heads, rope, norm epsilon), the
  byte-level BPE vocabulary (tokens, types, merges; `gguf.SpecialVocab` for the special ids), whether BOS / EOS
  are added, the pre-tokenizer name, and the chat template of the prompt format the run trained with.

The file is written to a temporary name in the target folder and renamed; a failed write leaves nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ift.errors import IftError

QUANTS = ("f16", "bf16", "q8_0")
# transformers model_type -> (gguf architecture, Q/K permuted for llama.cpp's rope)
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}
SUPPORTED_HELP = "llama (SmolLM, Llama), mistral and qwen2 models with a byte-level BPE tokenizer"
# llama.cpp pre-tokenizer names for pre-tokenizer layouts of tokenizer.json, checked in this order
PREFERRED_PRE = ("llama-bpe", "qwen2", "smaug-bpe", "gpt-4o", "tekken")


def check_architecture(config, where: str) -> None:
    model_type = getattr(config, "model_type", "?")
    if model_type not in ARCHITECTURES:
        raise IftError(f"exporting a '{model_type}' model to GGUF is not supported", where,
                       f"ift exports {SUPPORTED_HELP}; for others, `ift merge` the run and use llama.cpp's "
                       "convert_hf_to_gguf.py on the merged folder")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise IftError(f"rope scaling '{rope_type}' is not exported to GGUF yet", where,
                       "export a model without rope scaling, or `ift merge` and use llama.cpp's converter")


# --------------------------------------------------------------------------------------------------- GGUF


def _permute(weights, n_head: int):
    """llama.cpp's Q/K row order: each head's two halves interleaved (its rope rotates adjacent pairs)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensor_type(quant: str, shape: Sequence[int]) -> Any:
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return Q.F32  # norms and biases: llama.cpp keeps them float32
    if quant == "q8_0":
        block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
        return Q.Q8_0 if shape[-1] % block == 0 else Q.F16  # rows not a multiple of 32: f16, as llama.cpp
    return {"f16": Q.F16, "bf16": Q.BF16}[quant]


def _encode_tensor(array, qtype):
    import numpy as np
    from gguf import quants

    if qtype.name == "F32":
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype.name == "F16":
        return np.ascontiguousarray(array.astype(np.float16))
    return quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def gguf_tensors(model) -> tuple[str, list[tuple[str, tuple[int, ...], Callable[[], Any]]]]:
    """(gguf architecture name, [(gguf tensor name, shape, function giving its float32 array in llama.cpp's
    layout)]): arrays are made one at a time, when written."""
    import gguf

    config = model.config
    check_architecture(config, "model config")
    arch_key, permute = ARCHITECTURES[config.model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_key)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    out = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # the embedding matrix, written once
        stem, _, suffix = hf_name.rpartition(".")
        name = names.get_name(stem)
        if name is None:
            raise IftError(f"no GGUF name for tensor '{hf_name}'", f"{config.model_type} model",
                           "this model has a layer llama.cpp's architecture does not know; export is not possible")

        def array(tensor=tensor, hf_name=hf_name):
            data = tensor.detach().to("cpu").float().numpy()
            if permute and ".q_proj." in hf_name:
                data = _permute(data, heads)
            elif permute and ".k_proj." in hf_name:
                data = _permute(data, kv_heads)
            return data

        out.append((f"{name}.{suffix}", tuple(tensor.shape), array))
    return gguf.MODEL_ARCH_NAMES[arch], out


def write_gguf(model, tokenizer, path: str | os.PathLike, *, quant: str = "f16", chat: bool = True,
               pre: str | None = None, name: str | None = None, base_hub_id: str | None = None,
               notes: list[str] | None = None) -> tuple[str, int]:
    """Write `model` (a transformers causal LM, float weights) and `tokenizer` as one GGUF file at `path`.

    chat: the model was trained in the tokenizer's chat template (written as tokenizer.chat_template); False
    writes a template of the bare prompt format instead. pre: llama.cpp's pre-tokenizer name (None: detected
    from tokenizer.json). Returns (architecture, number of tensors).
    """
    import gguf
    import numpy as np

    notes = notes if notes is not None else []
    path = Path(path)
    config = model.config
    arch, tensors = gguf_tensors(model)
    rows = model.get_input_embeddings().num_embeddings
    vocab = _byte_level_vocab(tokenizer, rows)
    writer = gguf.GGUFWriter(None, arch)
    _add_general(writer, config, name, quant, base_hub_id)
    _add_hparams(writer, config, rows)
    _add_vocab(writer, tokenizer, config, vocab, rows, chat=chat, pre=pre, notes=notes)
    if getattr(config, "sliding_window", None) and config.sliding_window < config.max_position_embeddings \
            and getattr(config, "use_sliding_window", True):
        notes.append(f"sliding window attention ({config.sliding_window}) is not written: llama.cpp runs this "
                     "architecture with full attention")

    infos = []
    for tname, logical, make in tensors:
        qtype = _tensor_type(quant, logical)
        if qtype.name in ("F32", "F16"):
            dtype, shape = (np.float32 if qtype.name == "F32" else np.float16), logical
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        else:
            dtype, shape = np.uint8, gguf.quant_shape_to_byte_shape(logical, qtype)
            nbytes = int(np.prod(shape))
        writer.add_tensor_info(tname, shape, np.dtype(dtype), nbytes, raw_dtype=qtype if dtype is np.uint8 else None)
        infos.append((tname, make, qtype, nbytes))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tname, make, qtype, nbytes in infos:  # one tensor in memory at a time
            encoded = _encode_tensor(make(), qtype)
            assert encoded.nbytes == nbytes, tname
            writer.write_tensor_data(encoded)
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return arch, len(infos)


def _add_general(writer, config, name: str | None, quant: str, base_hub_id: str | None) -> None:
    import gguf

    writer.add_type("model")
    if name:
        writer.add_name(name)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if base_hub_id:  # what these weights were fine-tuned from (general.source.* would claim they are that model)
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_hub_id.rsplit("/", 1)[-1])
        if "/" in base_hub_id:
            writer.add_base_model_organization(0, base_hub_id.split("/", 1)[0])
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_hub_id}")


def _add_hparams(writer, config, rows: int) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta if theta is not None else getattr(config, "rope_theta", 10000.0)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(rows)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


# -------------------------------------------------------------------------------------------------- vocab


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise IftError(f"the tokenizer ({type(tokenizer).__name__}) has no tokenizer.json (not a fast tokenizer)",
                       "tokenizer", f"ift exports {SUPPORTED_HELP}")
    return json.loads(backend.to_str())


def _byte_level_vocab(tokenizer, rows: int) -> _Vocab:
    """Tokens by id as llama.cpp's BPE vocabulary stores them, with their types; rows past the tokenizer padded."""
    import gguf

    spec = _tokenizer_json(tokenizer)
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    decoders = [decoder] + list(decoder.get("decoders") or [])
    byte_level = any(d.get("type") == "ByteLevel" for d in decoders)
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        kind = "SentencePiece-style (byte fallback)" if model.get("byte_fallback") else str(model.get("type"))
        raise IftError(f"the tokenizer is {kind}, not byte-level BPE", "tokenizer",
                       f"ift exports {SUPPORTED_HELP}; `ift merge` and use llama.cpp's convert_hf_to_gguf.py")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(tokenizer) > rows:
        raise IftError(f"the tokenizer has {len(tokenizer)} tokens but the embeddings only {rows} rows", "tokenizer",
                       "resize the model's embeddings to the tokenizer")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(rows):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return _Vocab(tokens, [int(t) for t in types])


def detect_pre_tokenizer(tokenizer) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer, from tokenizer.json's layout; None when unknown."""
    pre = _tokenizer_json(tokenizer).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps or []]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        try:  # the regexes transformers' GGUF reader applies per name: a name it maps back to the same split
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:
            return None
        names = [n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex]
        for preferred in PREFERRED_PRE:
            if preferred in names:
                return preferred
        return names[0] if names else None
    return None


def adds_special_token(tokenizer, token_id: int | None, first: bool) -> bool:
    """Whether the tokenizer adds this special token (BOS first / EOS last) to plain text by itself."""
    if token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and (ids[0] if first else ids[-1]) == token_id


def stop_tokens(tokenizer, chat: bool) -> list[str]:
    """The trained end-of-turn tokens: EOS and the special tokens a chat template closes an answer with."""
    from ift.data.encoding import encode_pairs

    found: list[int] = []
    if chat and getattr(tokenizer, "chat_template", None):
        tail = encode_pairs(tokenizer, "causal", ["x"], [""], chat_template=True, add_eos=False)[0][1]
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
        found += [t for t in tail if t in special]
    if tokenizer.eos_token_id is not None:
        found.append(tokenizer.eos_token_id)
    out: list[str] = []
    for t in found:
        text = tokenizer.convert_ids_to_tokens(t)
        if text not in out:
            out.append(text)
    return out


def _add_vocab(writer, tokenizer, config, vocab: _Vocab, rows: int, *, chat: bool, pre: str | None,
               notes: list[str]) -> None:
    import gguf

    writer.add_tokenizer_model("gpt2")
    detected = pre or detect_pre_tokenizer(tokenizer)
    if detected is None:
        notes.append("pre-tokenizer not recognised: written as 'default' (llama.cpp may split text differently)")
    writer.add_tokenizer_pre(detected or "default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    with tempfile.TemporaryDirectory(prefix="ift-export-") as folder:
        tokenizer.save_pretrained(folder)
        config.to_json_file(os.path.join(folder, "config.json"))
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=rows)
    for typ, token in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token is not None:
            special.special_token_ids[typ] = token
    turn_end = [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens(tokenizer, chat)]
    if turn_end and turn_end[0] != tokenizer.eos_token_id:
        special.special_token_ids["eot"] = turn_end[0]
    special.add_special_token = {"bos": adds_special_token(tokenizer, tokenizer.bos_token_id, True),
                                 "eos": adds_special_token(tokenizer, tokenizer.eos_token_id, False)}
    special.chat_template = tokenizer.chat_template if chat and getattr(tokenizer, "chat_template", None) \
        else BARE_CHAT_TEMPLATE
    if not special.merges:
        raise IftError("the tokenizer has no BPE merges to write", "tokenizer", f"ift exports {SUPPORTED_HELP}")
    special.add_to_gguf(writer, quiet=True)


# The bare prompt format as a chat template, for runs trained without one: the user's text is the prompt, an
# answer follows it after a space (ift.data.encoding.join) and ends with EOS. One turn is what such a run has seen.
BARE_CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] }}"
                      "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
                      "{% endif %}{% endfor %}")
