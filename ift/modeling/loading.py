"""Models and tokenizers: causal or seq2seq, pretrained (Hub, folder, GGUF) or from scratch, with LoRA / QLoRA.

Everything takes the recipe's `model` / `adapter` sections and returns a `Loaded` bundle:

    loaded = load(recipe.model, recipe.adapter, gradient_checkpointing=recipe.training.gradient_checkpointing,
                  train_texts=texts_for_a_scratch_tokenizer)
    print(describe(loaded))          # total / trainable parameters, adapter, dtype

A GGUF file is converted once into a safetensors folder keyed by the file's sha256, so later runs load
in seconds instead of de-quantizing again. Mistakes (unknown model type, unreachable Hub id, missing
file, 4-bit impossible here) are `IftError`s naming the recipe key, raised before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from ift.errors import IftError
from ift.modeling.adapters import count_parameters, check_4bit, keep_4bit_differentiable, lora_config, peft_calls
from ift.modeling.compute import use_fast_dropout
from ift.modeling.config import pretrained_config, scratch_config, resolve_dtype
from ift.modeling.model_source import say_progress, resolve_model_path
from ift.modeling.load_errors import hub_errors
from ift.modeling.kind import auto_model_class, model_kind
from ift.modeling.tokenizer import ensure_pad, recipe_tokenizer
from ift.recipe import AdapterConfig, ModelConfig

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ift.data.encoding import Kind


@dataclass
class Loaded:
    model: PreTrainedModel | PeftModel
    tokenizer: PreTrainedTokenizerBase
    kind: Kind
    source: str  # folder or Hub id of the base weights (a GGUF's cache folder; "scratch:<model_type>" for init: scratch)


# ----------------------------------------------------------------------------------------------- load


def load(model: ModelConfig, adapter: AdapterConfig, *, gradient_checkpointing: bool = False,
         train_texts: Iterable[str] | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
         dtype_override: str | None = None, new_tokens: Sequence[int] = ()) -> Loaded:
    """Model + tokenizer as the recipe says, adapters attached; returned in eval mode (as from_pretrained).

    new_tokens: ids the tokenizer gained (data.special_tokens, a named chat template's tokens): the embeddings
    grow to the tokenizer, and under LoRA these rows train (peft's trainable tokens) while the rest stay frozen.
    """
    if adapter.method == "qlora":
        check_4bit(model)  # before any weights load
    _check_attention(model)
    if adapter.method == "lora" and model.init == "scratch":
        raise IftError("LoRA on a randomly initialised base: the base weights are never saved, so the adapter "
                       "could not be reloaded after training", "adapter.method",
                       "use adapter.method: none (full training) for init: scratch")
    dtype_name = dtype_override or model.dtype
    if model.init == "scratch":
        tok = tokenizer or recipe_tokenizer(model, train_texts, kind=None)
        config = scratch_config(model, tok)
        kind = model_kind(config, model.kind)
        ensure_pad(tok, kind)
        net = auto_model_class(kind).from_config(config, dtype=resolve_dtype(dtype_name, None),
                                            trust_remote_code=model.trust_remote_code, **_attention(model))
        net.eval()
        source = f"scratch:{config.model_type}"
    else:
        source = resolve_model_path(model)
        config = pretrained_config(model, source)
        kind = model_kind(config, model.kind)
        tok = tokenizer or recipe_tokenizer(model, None, kind)
        ensure_pad(tok, kind)
        net = load_pretrained(model, adapter, source, config, kind, resolve_dtype(dtype_name, config))
    match_tokenizer(net, tok)
    if adapter.method == "none":
        net.requires_grad_(True)  # full fine-tuning: every weight trains
    if adapter.method == "qlora":
        from peft import prepare_model_for_kbit_training

        keep_4bit_differentiable(net)
        # checkpointing is enabled below (non-reentrant), not by peft's deprecated-API path
        net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        _enable_checkpointing(net, adapter.method != "none")
    if adapter.method in ("lora", "qlora"):
        with peft_calls(four_bit=adapter.method == "qlora"):
            from peft import get_peft_model

            net = get_peft_model(net, lora_config(adapter, kind, net, new_tokens))
        use_fast_dropout(net)  # masks 4x cheaper, one per shared input (ift/modeling/compute.py)
    return Loaded(model=net, tokenizer=tok, kind=kind, source=source)


def load_pretrained(model: ModelConfig, adapter: AdapterConfig, source: str, config: PretrainedConfig,
                     kind: Kind, dtype: torch.dtype) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"config": config, "dtype": dtype, "trust_remote_code": model.trust_remote_code,
                              **_attention(model)}
    if source == model.name_or_path and model.revision:
        kwargs["revision"] = model.revision
    if adapter.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=adapter.quant_type,
            bnb_4bit_use_double_quant=adapter.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, adapter.compute_dtype))
    key = "model.gguf_file" if model.gguf_file else "model.name_or_path"
    with hub_errors(model.name_or_path or source, key):
        return auto_model_class(kind).from_pretrained(source, **kwargs)


def _attention(model: ModelConfig) -> dict[str, str]:
    """model.attn_implementation as a from_pretrained argument; auto leaves transformers' choice (training may
    still switch it: ift/modeling/attention.py)."""
    return {} if model.attn_implementation == "auto" else {"attn_implementation": model.attn_implementation}


def _check_attention(model: ModelConfig) -> None:
    """A kernel this machine cannot run stops here, in one line, before anything loads."""
    if model.attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise IftError("flash_attention_2 needs the flash-attn package and a CUDA GPU; this machine lacks one",
                           "model.attn_implementation",
                           "use auto (sdpa, or eager where faster), sdpa or eager, or install flash-attn on a CUDA GPU")


def match_tokenizer(net: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    """Embeddings large enough for the tokenizer (a pad token may have been added); pad id known to the model."""
    embeddings = net.get_input_embeddings()
    if embeddings is not None and len(tok) > embeddings.num_embeddings:
        from transformers.utils import logging as hf_logging

        before = embeddings.num_embeddings
        # transformers logs a paragraph about mean resizing at warning level; ift says it in one line instead
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            net.resize_token_embeddings(len(tok))  # new rows drawn around the old rows' mean (mean_resizing)
        finally:
            hf_logging.set_verbosity(level)
        say_progress(f"embeddings grown from {before:,} to {len(tok):,} rows for the tokenizer's added tokens "
             "(new rows start near the mean of the old ones)")
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tok.pad_token_id
    generation = getattr(net, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tok.pad_token_id


def _enable_checkpointing(net: PreTrainedModel, adapters: bool) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(net, "activation_checkpointing_enable"):  # transformers >= 5.x name; the old one warns
        net.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    net.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation
    if adapters:
        net.enable_input_require_grads()  # frozen embeddings: keep a grad path into checkpointed blocks


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def describe(loaded: Loaded) -> str:
    """One line for logs: source, kind, precision, adapter, total and trainable parameters."""
    total, trainable = count_parameters(loaded.model)
    net = loaded.model
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    precision = str(base.dtype).removeprefix("torch.")
    if getattr(base, "is_loaded_in_4bit", False):
        quant = getattr(getattr(base, "hf_quantizer", None), "quantization_config", None)
        precision = f"4-bit {getattr(quant, 'bnb_4bit_quant_type', 'nf4').upper()} base"

    adapter = "full fine-tuning"
    peft_config = getattr(net, "peft_config", None)
    if peft_config:
        cfg = next(iter(peft_config.values()))
        targets = cfg.target_modules if isinstance(cfg.target_modules, str) else ", ".join(sorted(cfg.target_modules))
        adapter = f"LoRA r={cfg.r} alpha={cfg.lora_alpha:g} on {targets}"
    share = 100 * trainable / total if total else 0.0
    return (f"{getattr(base.config, 'model_type', '?')} ({loaded.kind}) from {loaded.source} · {precision} · {adapter} · "
            f"parameters: {_human(total)} total, {_human(trainable)} trainable ({share:.2f}%)")
