"""Model kind: causal or seq2seq, from a transformers config, and the Auto class that loads each kind."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ift.errors import IftError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

from ift.data.encoding import Kind

KINDS_HELP = ("decoder-only models (Llama, SmolLM, Qwen, Mistral, GPT-2...) or encoder-decoder models "
              "(T5, FLAN-T5, BART) can be instruction-tuned")


def _mapping_names() -> tuple[dict, dict, dict]:
    from transformers.models.auto import modeling_auto as auto

    return (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
            auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def _class_names(mapping: dict) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (tuple, list)) else (value,))
    return names


def model_kind(config: PretrainedConfig, forced: str = "auto") -> Kind:
    """causal or seq2seq, from the config (or `forced`, checked against what the model type supports)."""
    causal, seq2seq, masked = _mapping_names()
    model_type = getattr(config, "model_type", None) or "?"
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    # BERT-likes appear in the causal mapping (as decoders for encoder-decoder stacks) but are encoders
    # unless the config says is_decoder; a masked LM cannot generate text.
    encoder_only = model_type in masked and not encoder_decoder and not getattr(config, "is_decoder", False)
    if encoder_only:
        raise IftError(
            f"'{model_type}' is an encoder-only model: it fills in masked tokens and cannot generate text",
            "model.name_or_path", f"choose another model: {KINDS_HELP}")
    if forced == "causal":
        if model_type not in causal:
            raise IftError(f"model type '{model_type}' has no causal-LM head in transformers", "model.kind",
                           "set model.kind: auto" + (" (it is seq2seq)" if model_type in seq2seq else ""))
        return "causal"
    if forced == "seq2seq":
        if model_type not in seq2seq:
            raise IftError(f"model type '{model_type}' has no seq2seq-LM head in transformers", "model.kind",
                           "set model.kind: auto" + (" (it is causal)" if model_type in causal else ""))
        return "seq2seq"
    if encoder_decoder and model_type in seq2seq:
        return "seq2seq"
    architectures = set(getattr(config, "architectures", None) or ())
    if architectures & _class_names(seq2seq) and model_type in seq2seq:
        return "seq2seq"
    if architectures & _class_names(causal) and model_type in causal:
        return "causal"
    if model_type in causal:
        return "causal"
    if model_type in seq2seq:
        return "seq2seq"
    raise IftError(f"model type '{model_type}' has neither a causal-LM nor a seq2seq-LM head in transformers",
                   "model.name_or_path", f"choose another model: {KINDS_HELP}")


def auto_model_class(kind: Kind):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForCausalLM if kind == "causal" else AutoModelForSeq2SeqLM
