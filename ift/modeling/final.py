"""A run's final weights (a full model, or a LoRA adapter on its base) loaded back for evaluation or export."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ift.errors import IftError
from ift.modeling.adapters import check_4bit, peft_calls
from ift.modeling.config import pretrained_config, resolve_dtype
from ift.modeling.model_source import resolve_model_path
from ift.modeling.kind import auto_model_class, model_kind
from ift.modeling.loading import Loaded, load_pretrained, match_tokenizer
from ift.modeling.tokenizer import ensure_pad, recipe_tokenizer
from ift.recipe import AdapterConfig, ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from ift.data.encoding import Kind


def load_final(final_dir: Path, model_cfg: ModelConfig, *, dtype: str | None = None,
               adapter: AdapterConfig | None = None) -> Loaded:
    """A run's `final/`: a full model, or a LoRA adapter on its base. Eval mode.

    `dtype`: the weights' dtype; by default the run's own (`model.dtype`, which training pins in the saved
    recipe), so a bf16 run is evaluated and chatted with in bf16 as it was trained, at half float32's memory
    (merge and export name theirs). When `adapter` says the run was QLoRA the base is loaded in 4-bit as
    trained, so the figures describe the function that was trained and tested.
    """
    merged_dtype = dtype or model_cfg.dtype
    final_dir = Path(final_dir)
    if not final_dir.is_dir():
        raise IftError(f"no final weights at {final_dir}", str(final_dir),
                       "train to the end first (final/ is written when training finishes)")
    if (final_dir / "adapter_config.json").is_file():
        return _load_adapter(final_dir, model_cfg, merged_dtype, adapter)
    if not (final_dir / "config.json").is_file():
        raise IftError(f"{final_dir} holds neither a model (config.json) nor an adapter (adapter_config.json)",
                       str(final_dir), "point at a run's final/ folder")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(final_dir, trust_remote_code=model_cfg.trust_remote_code)
    kind = model_kind(config, model_cfg.kind)
    tok = _final_tokenizer(final_dir, model_cfg, kind)
    net = auto_model_class(kind).from_pretrained(final_dir, config=config, dtype=resolve_dtype(merged_dtype, config),
                                            trust_remote_code=model_cfg.trust_remote_code)
    match_tokenizer(net, tok)
    net.eval()
    return Loaded(model=net, tokenizer=tok, kind=kind, source=str(final_dir))


def _load_adapter(final_dir: Path, model_cfg: ModelConfig, merged_dtype: str,
                  adapter: AdapterConfig | None = None) -> Loaded:
    if model_cfg.init == "scratch":
        raise IftError("this adapter was trained on a randomly initialised base whose weights were not saved",
                       str(final_dir), "train init: scratch models with adapter.method: none (full training)")
    source = resolve_model_path(model_cfg)
    config = pretrained_config(model_cfg, source)
    kind = model_kind(config, model_cfg.kind)
    tok = _final_tokenizer(final_dir, model_cfg, kind)
    four_bit = adapter is not None and adapter.method == "qlora"
    if four_bit:
        check_4bit(model_cfg)
    base = load_pretrained(model_cfg, adapter if four_bit else AdapterConfig(), source, config, kind,
                            resolve_dtype(merged_dtype, config))
    match_tokenizer(base, tok)
    with peft_calls(four_bit=four_bit):
        from peft import PeftModel

        net = PeftModel.from_pretrained(base, str(final_dir), is_trainable=False)
    net.eval()
    return Loaded(model=net, tokenizer=tok, kind=kind, source=source)


def _final_tokenizer(final_dir: Path, model_cfg: ModelConfig, kind: Kind) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    has_tokenizer = any((final_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = (AutoTokenizer.from_pretrained(final_dir, trust_remote_code=model_cfg.trust_remote_code)
           if has_tokenizer else recipe_tokenizer(model_cfg, None, kind))
    ensure_pad(tok, kind)
    return tok
