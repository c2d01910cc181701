"""`ift export RUN_DIR --format gguf`: the run's merged model as one GGUF file for llama.cpp, and an Ollama Modelfile.

    paths = export_gguf("runs/quickstart", quant="q8_0")   # runs/quickstart/export/quickstart-q8_0.gguf + Modelfile

The inverse of the GGUF -> transformers conversion `ift.modeling.loading` relies on (transformers' GGUF reader):

- weights: the adapter merged into the unquantized float32 base (also for QLoRA runs, as `ift merge` does),
  tensor names through gguf's own name map (`gguf.get_tensor_name_map`), Llama-family Q/K rows permuted the
  way llama.cpp's converter does (its rotary embedding rotates adjacent pairs; transformers rotates halves);
  1-D tensors (norms, biases) stay float32, matrices become f16, bf16 or q8_0 (`gguf.quants`); a tied LM head
  is not written twice.
- metadata: llama.cpp's keys for the architecture (context length, sizes, heads, rope, norm epsilon), the
  byte-level BPE vocabulary (tokens, types, merges; `gguf.SpecialVocab` for the special ids), whether BOS / EOS
  are added, the pre-tokenizer name, and the chat template of the prompt format the run trained with.
- Modelfile: FROM the file, a TEMPLATE that reproduces that prompt format in Ollama's Go template language
  (derived by rendering the chat template with markers and checked against it on four conversations), and
  the end-of-turn tokens as stop parameters.

Supported: decoder-only Llama-family models with byte-level BPE tokenizers (SmolLM, Llama 3, Mistral with a
byte-level vocabulary, Qwen2); anything else is an `IftError` naming what is missing.
The file is written to a temporary name in the target folder and renamed; a failed export leaves nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ift import atomic
from ift.errors import IftError

Report = Callable[[str], None]
QUANTS = ("f16", "bf16", "q8_0")
# transformers model_type -> (gguf architecture, Q/K permuted for llama.cpp's rope)
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}
SUPPORTED_HELP = "llama (SmolLM, Llama), mistral and qwen2 models with a byte-level BPE tokenizer"
# llama.cpp pre-tokenizer names for pre-tokenizer layouts of tokenizer.json, checked in this order
PREFERRED_PRE = ("llama-bpe", "qwen2", "smaug-bpe", "gpt-4o", "tekken")
MARKERS = {"system": "\u27e6S\u27e7", "user1": "\u27e6U1\u27e7", "assistant": "\u27e6A1\u27e7",
           "user2": "\u27e6U2\u27e7"}  # text no chat template contains, to find where messages land


@dataclass
class Exported:
    gguf: Path
    modelfile: Path
    quant: str
    architecture: str
    tensors: int
    notes: list[str] = field(default_factory=list)


# -------------------------------------------------------------------------------------------------- entry


def export_gguf(run_dir: str | os.PathLike, *, quant: str = "f16", out: str | os.PathLike | None = None,
                report: Report | None = None) -> Exported:
    """Write RUN_DIR's merged model as GGUF (`out`, default RUN_DIR/export/<run>-<quant>.gguf) and a Modelfile."""
    say = report or (lambda _m: None)
    from ift.publish.merge import load_run_recipe

    run_dir = Path(run_dir)
    if quant not in QUANTS:
        raise IftError(f"unknown quantization '{quant}'", "--quant", f"use one of: {', '.join(QUANTS)}")
    recipe = load_run_recipe(run_dir)
    final = run_dir / "final"
    if not final.is_dir():
        raise IftError("the run has no final weights (final/ is missing)", str(final),
                       "let the training finish, or resume it: ift train RUN_DIR/recipe.yaml --resume")
    out = Path(out) if out is not None else run_dir / "export" / f"{run_dir.resolve().name}-{quant}.gguf"
    if out.suffix != ".gguf":
        raise IftError(f"the output file should end in .gguf: {out}", "--out", f"e.g. --out {out.with_suffix('.gguf')}")
    if out.is_dir():
        raise IftError("--out is a folder", str(out), "give a file name ending in .gguf")
    _check_config(final, recipe)  # before any weights load

    say("loading the fine-tuned model (adapter merged into the float32 base)")
    model, tokenizer, notes = merged_model(run_dir, recipe)
    from ift.inference.generate import run_prompt_format

    fmt = run_prompt_format(recipe, "causal")
    say(f"writing {out} ({quant})")
    arch, tensors = write_gguf(model, tokenizer, out, quant=quant, chat=fmt.chat_template,
                               pre=_base_pre_tokenizer(recipe), name=run_dir.resolve().name,
                               base_hub_id=_base_hub_id(recipe), notes=notes)
    modelfile = out.parent / "Modelfile"
    atomic.write_text(modelfile, modelfile_text(out.name, tokenizer, fmt, notes))
    say(f"wrote {modelfile}")
    return Exported(out, modelfile, quant, arch, tensors, notes)


def _check_config(final: Path, recipe) -> None:
    """An unsupported architecture is refused from its config alone."""
    from ift.modeling.loading import _pretrained_config, resolve_model_path

    if (final / "config.json").is_file():
        from transformers import AutoConfig

        config, where = AutoConfig.from_pretrained(final), str(final / "config.json")
    else:
        config, where = _pretrained_config(recipe.model, resolve_model_path(recipe.model)), "model (recipe.yaml)"
    check_architecture(config, where)


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


def merged_model(run_dir: Path, recipe) -> tuple[Any, Any, list[str]]:
    """The run's model as one set of float32 weights: the adapter merged into the unquantized base (a QLoRA
    run's adapter too: into the full-precision base, not the 4-bit one it trained on), or final/'s full model."""
    from ift.publish.merge import has_adapter
    from ift.modeling.loading import load_final

    notes: list[str] = []
    final = run_dir / "final"
    try:
        loaded = load_final(final, recipe.model, merged_dtype="float32")  # no adapter arg: never 4-bit
    except (RuntimeError, ValueError) as exc:
        raise IftError(f"the adapter does not fit the base model: {str(exc).strip().splitlines()[0][:300]}",
                       str(final), "check that the recipe's model is the base the adapter was trained on") from None
    model = loaded.model
    if has_adapter(final):
        model = model.merge_and_unload(safe_merge=True)
        if recipe.adapter.method == "qlora":
            notes.append("QLoRA run: the adapter was merged into the full-precision base (training saw a 4-bit base)")
    model.eval()
    return model, loaded.tokenizer, notes


def _base_pre_tokenizer(recipe) -> str | None:
    """The pre-tokenizer name of a GGUF base model: the very one llama.cpp already runs for it."""
    if not recipe.model.gguf_file:
        return None
    import gguf

    from ift.modeling.loading import _locate_gguf

    with contextlib.suppress(Exception):
        value = gguf.GGUFReader(str(_locate_gguf(recipe.model))).fields.get("tokenizer.ggml.pre")
        return value.contents() if value is not None else None
    return None


def _base_hub_id(recipe) -> str | None:
    if recipe.model.hub_id:
        return recipe.model.hub_id
    if recipe.model.gguf_file:
        from ift.modeling.loading import _locate_gguf, gguf_hub_id

        with contextlib.suppress(Exception):
            return gguf_hub_id(_locate_gguf(recipe.model))
        return None
    name = recipe.model.name_or_path
    return name if name and not Path(name).expanduser().exists() else None


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


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
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
    special.add_special_token = {"bos": _adds(tokenizer, tokenizer.bos_token_id, True),
                                 "eos": _adds(tokenizer, tokenizer.eos_token_id, False)}
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


# ---------------------------------------------------------------------------------------------- Modelfile


def _go_literal(text: str) -> str:
    """Text as a literal in a Go template (a `{{` would start an action)."""
    return text.replace("{{", '{{ "{{" }}')


def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


@dataclass
class ChatPieces:
    """A chat template cut at its messages: what comes before, between and after them."""

    head_system: str | None  # before the system prompt (None: the template takes no system message)
    system_to_user: str | None
    head: str  # before the first user message when there is no system prompt (a default one included)
    user_to_assistant: str  # after a user message: the assistant's turn opens
    assistant_to_user: str | None  # after an answer in the history, up to the next user message

    def render(self, system: str | None, turns: Sequence[str]) -> str:
        """What the Go template below renders for a conversation of alternating user / assistant turns."""
        text = (self.head_system + system + self.system_to_user) if system is not None else self.head
        for k, content in enumerate(turns):
            text += content + (self.user_to_assistant if k % 2 == 0 else self.assistant_to_user)
        return text


def chat_pieces(tokenizer) -> ChatPieces:
    """Cut the tokenizer's chat template into literal pieces by rendering conversations with markers."""
    m = MARKERS
    user1, user2, answer = ({"role": "user", "content": m["user1"]}, {"role": "user", "content": m["user2"]},
                            {"role": "assistant", "content": m["assistant"]})
    single = _render(tokenizer, [user1], True)
    head, _, after = single.partition(m["user1"])
    pieces = ChatPieces(None, None, head, after, None)
    with contextlib.suppress(Exception):  # templates without a system role raise
        full = _render(tokenizer, [{"role": "system", "content": m["system"]}, user1], True)
        head_system, _, rest = full.partition(m["system"])
        if m["system"] in full and rest.endswith(m["user1"] + after):
            pieces.head_system, pieces.system_to_user = head_system, rest[: -len(m["user1"] + after)]
    with contextlib.suppress(Exception):
        three = _render(tokenizer, [user1, answer, user2], True)
        prefix = head + m["user1"] + after + m["assistant"]
        if three.startswith(prefix) and three.endswith(m["user2"] + after):
            pieces.assistant_to_user = three[len(prefix): -len(m["user2"] + after)]
    return pieces


def _verified_pieces(tokenizer, pieces: ChatPieces) -> tuple[bool, bool]:
    """(system prompts reproduced, multi-turn reproduced): the pieces checked against the chat template."""
    def same(messages: list[dict], system: str | None, turns: list[str]) -> bool:
        try:
            return _render(tokenizer, messages, True) == pieces.render(system, turns)
        except Exception:
            return False

    convo = [("Hi there", "user"), ("Hello! How can I help?", "assistant"), ("Tell me a joke.", "user")]
    as_messages = [{"role": r, "content": c} for c, r in convo]
    system_ok = pieces.head_system is not None and same(
        [{"role": "system", "content": "Be brief."}, as_messages[0]], "Be brief.", [convo[0][0]])
    multi_ok = pieces.assistant_to_user is not None and same(as_messages, None, [c for c, _ in convo])
    if system_ok and multi_ok:
        multi_ok = same([{"role": "system", "content": "Be brief."}] + as_messages, "Be brief.", [c for c, _ in convo])
    return system_ok, multi_ok


def ollama_template(tokenizer, fmt) -> tuple[str, list[str]]:
    """An Ollama TEMPLATE (Go template) giving the prompt text training used; and comments on its limits."""
    comments: list[str] = []
    if not fmt.chat_template:
        prompt = "{{ .Prompt }}"
        if fmt.template is not None:
            filled = _template_as_go(fmt.template)
            if filled is not None:
                prompt = filled
                comments.append(f"your message fills promptsource template {fmt.template.ref} (as `ift chat` does)")
            else:
                comments.append(f"template {fmt.template.ref} cannot be written in Go: send prompts already rendered")
        comments.append("trained without a chat template: every message is one prompt, answered after a space")
        return prompt, comments
    pieces = chat_pieces(tokenizer)
    bos = tokenizer.bos_token if _adds(tokenizer, tokenizer.bos_token_id, True) else None
    strip = (lambda s: s[len(bos):] if s is not None and bos and s.startswith(bos) else s)  # noqa: E731
    system_ok, multi_ok = _verified_pieces(tokenizer, pieces)
    head, head_system = _go_literal(strip(pieces.head)), _go_literal(strip(pieces.head_system or ""))
    user_to_assistant = _go_literal(pieces.user_to_assistant)
    if system_ok:
        start = (f"{{{{ if .System }}}}{head_system}{{{{ .System }}}}{_go_literal(pieces.system_to_user)}"
                 f"{{{{ else }}}}{head}{{{{ end }}}}")
    else:
        start = head
        comments.append("the chat template takes no system prompt: SYSTEM / .System is ignored")
    if multi_ok:
        body = (f'{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{{{{ .Content }}}}{user_to_assistant}'
                f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{_go_literal(pieces.assistant_to_user)}'
                f"{{{{ end }}}}{{{{ end }}}}")
    else:
        body = f"{{{{ .Prompt }}}}{user_to_assistant}"
        comments.append("multi-turn conversations could not be derived from the chat template: one turn at a time")
    return start + body, comments


def _template_as_go(tpl) -> str | None:
    """A promptsource prompt of plain text around one `{{ field }}` as Go (the field = the user's message)."""
    from jinja2 import nodes

    from ift.templates.library import ENV

    try:
        tree = ENV.parse(tpl.jinja)
    except Exception:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], nodes.Output):
        return None
    parts = tree.body[0].nodes
    names = [p for p in parts if isinstance(p, nodes.Name)]
    if len(names) != 1 or any(not isinstance(p, (nodes.TemplateData, nodes.Name)) for p in parts):
        return None
    pieces = [p.data if isinstance(p, nodes.TemplateData) else "\0" for p in parts]
    before, _, after = "".join(pieces).partition("\0")
    return _go_literal(before.lstrip()) + "{{ .Prompt }}" + _go_literal(after.rstrip())


def modelfile_text(gguf_name: str, tokenizer, fmt, notes: Sequence[str] = ()) -> str:
    """An Ollama Modelfile for the GGUF file next to it: the run's prompt format, its stop tokens, greedy decoding."""
    template, comments = ollama_template(tokenizer, fmt)
    if '"""' in template:
        raise IftError('the prompt format contains """, which a Modelfile cannot quote', "Modelfile",
                       "write the Modelfile by hand")
    lines = ["# Ollama Modelfile written by `ift export`: ollama create NAME -f Modelfile", "",
             f"FROM ./{gguf_name}", ""]
    lines += [f"# {c}" for c in list(comments) + list(notes)]
    lines += [f'TEMPLATE """{template}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(t)}" for t in stop_tokens(tokenizer, fmt.chat_template)]
    lines += ["# greedy, as ift chat / generate / eval decode by default; raise it for varied answers",
              "PARAMETER temperature 0", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- checking


def read_back(path: str | os.PathLike, dtype: str = "float32"):
    """The GGUF file loaded by transformers (`gguf_file=`, de-quantized): (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ift.modeling.loading import _dequantize_kwargs

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype),
                                                 **_dequantize_kwargs())
    model.eval()
    return model, tokenizer


def compare_logits(reference, tokenizer, exported, texts: Sequence[str]) -> dict:
    """Largest logit difference between two models on `texts` (the reference's tokens), absolute and relative to
    the largest reference logit, over the reference's vocabulary."""
    import torch

    worst = scale = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            a = reference(input_ids=ids).logits.float()
            b = exported(input_ids=ids).logits.float()[..., : a.shape[-1]]
            worst = max(worst, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
    return {"max_abs": worst, "max_rel": worst / scale if scale else 0.0}


def check_export(path: str | os.PathLike, reference, tokenizer,
                 texts: Sequence[str] = ("Hello, how are you?", "Headline: profits doubled.")) -> dict:
    """Read the exported file back with transformers; compare logits and tokenization with the merged model."""
    model, tok = read_back(path)
    figures = compare_logits(reference, tokenizer, model, texts)
    figures["same_tokens"] = all(tok(t)["input_ids"] == tokenizer(t)["input_ids"] for t in texts)
    return figures
