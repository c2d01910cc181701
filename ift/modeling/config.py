"""Model configs (pretrained, or built for init: scratch) and the dtype weights load in."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ift.errors import IftError
from ift.modeling.load_errors import hub_errors, is_local_model
from ift.recipe import ModelConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


# ---------------------------------------------------------------------------------------------- config


def pretrained_config(model: ModelConfig, source: str) -> PretrainedConfig:
    from transformers import AutoConfig

    revision = model.revision if source == model.name_or_path else None
    key = "model.gguf_file" if model.gguf_file else "model.name_or_path"
    with hub_errors(model.name_or_path or source, key):
        return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=model.trust_remote_code)


def base_config(model: ModelConfig) -> PretrainedConfig:
    """The recipe model's config without its weights: model.config for init: scratch (vocabulary not yet taken
    from a tokenizer), else the checkpoint's own (a GGUF file is converted and cached first, as loading does)."""
    if model.init == "scratch":
        return scratch_base_config(model)
    from ift.modeling.model_source import resolve_model_path

    return pretrained_config(model, resolve_model_path(model))


def scratch_base_config(model: ModelConfig) -> PretrainedConfig:
    """model.config as a config object: inline sizes (with model_type) or a config path / Hub id."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    spec = model.config
    if spec is None:
        raise IftError("init: scratch needs a model config", "model.config",
                       "set model.config to inline sizes such as {model_type: llama, hidden_size: 64} or a config path")
    if not isinstance(spec, dict):
        if is_local_model(spec) and not Path(spec).expanduser().exists():
            raise IftError(f"config not found: {spec}", "model.config", "check the path, or give inline sizes")
        with hub_errors(spec, "model.config"):
            return AutoConfig.from_pretrained(str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec,
                                              trust_remote_code=model.trust_remote_code)
    sizes = dict(spec)
    model_type = sizes.pop("model_type", None)
    if not model_type:
        raise IftError("inline model.config needs a model_type", "model.config.model_type",
                       "add model_type: llama (or t5, qwen2, gpt2, ...)")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        raise IftError(f"unknown model_type '{model_type}'", "model.config.model_type",
                       f"did you mean {' / '.join(close)}?" if close else "use a transformers model type such as llama or t5")
    defaults = CONFIG_MAPPING[model_type]()
    unknown = [k for k in sizes if not hasattr(defaults, k)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(defaults.to_dict()), n=1)
        raise IftError(f"unknown key '{unknown[0]}' for a {model_type} config", f"model.config.{unknown[0]}",
                       f"did you mean '{close[0]}'?" if close else f"see {type(defaults).__name__} for the keys")
    try:
        return AutoConfig.for_model(model_type, **sizes)
    except (ValueError, TypeError) as exc:
        raise IftError(f"invalid {model_type} config: {str(exc).splitlines()[0]}", "model.config",
                       "fix the sizes (e.g. hidden_size divisible by num_attention_heads)") from None


def scratch_config(model: ModelConfig, tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The scratch config with vocabulary size and special-token ids taken from the tokenizer."""
    config = scratch_base_config(model)
    old = {name: getattr(config, f"{name}_token_id", None) for name in ("pad", "bos", "eos")}
    new = {"pad": tok.pad_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id}
    config.vocab_size = len(tok)
    for name, value in new.items():
        setattr(config, f"{name}_token_id", value)
    if getattr(config, "is_encoder_decoder", False):
        # keep the start token's role (T5 starts from pad, BART from eos), now with our tokenizer's ids
        start = getattr(config, "decoder_start_token_id", None)
        role = next((name for name, value in old.items() if value is not None and value == start), "pad")
        config.decoder_start_token_id = new[role] if new[role] is not None else new["pad"]
    return config


# ---------------------------------------------------------------------------------------------- dtype


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype | None:
    """The checkpoint's dtype as a torch.dtype, None when the config names none (ift.estimate reads it by name)."""
    # transformers >= 5 keeps it in `dtype`; `torch_dtype` is only a deprecated alias of it (and logs so)
    value = getattr(config, "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def resolve_dtype(name: str, config: PretrainedConfig | None) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    saved = checkpoint_dtype(config) if config is not None else None
    # auto = the checkpoint's own dtype (no silent up-cast of bf16 models, which CPUs run natively),
    # except float16 without an accelerator: CPU fp16 matmuls are slow or missing, and its small range
    # overflows without a loss scaler, so it loads as float32. No stated dtype (random init) = float32.
    if saved is None or (saved == torch.float16 and not _has_accelerator()):
        return torch.float32
    return saved
