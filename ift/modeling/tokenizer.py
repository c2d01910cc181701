"""Tokenizers: the recipe's (pretrained, with a pad token) or a byte-level BPE trained for init: scratch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from ift.errors import IftError
from ift.modeling.config import pretrained_config, scratch_base_config
from ift.modeling.model_source import resolve_model_path
from ift.modeling.load_errors import hub_errors, is_local_model
from ift.modeling.kind import model_kind
from ift.recipe import ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from ift.data.encoding import Kind

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # tokenizers trained for init: scratch


def load_tokenizer(model: ModelConfig, train_texts: Iterable[str] | None = None) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer, with a pad token; trained on `train_texts` for init: scratch without one."""
    return recipe_tokenizer(model, train_texts, kind=None)


def recipe_tokenizer(model: ModelConfig, train_texts: Iterable[str] | None, kind: Kind | None) -> PreTrainedTokenizerBase:
    if model.tokenizer:
        tok = _pretrained_tokenizer(model, model.tokenizer, "model.tokenizer")
    elif model.init == "scratch":
        if not model.name_or_path:
            return train_tokenizer(train_texts, model.vocab_size)
        tok = _pretrained_tokenizer(model, model.name_or_path, "model.name_or_path")  # no weights needed
    else:
        tok = _pretrained_tokenizer(model, resolve_model_path(model), "model.name_or_path")
    ensure_pad(tok, kind or (lambda: resolve_kind(model)))
    return tok


def _pretrained_tokenizer(model: ModelConfig, source: str, key: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    if not path.exists() and is_local_model(source):
        raise IftError(f"tokenizer folder not found: {source}", key, "check the path or give a Hub id")
    revision = model.revision if source == model.name_or_path else None
    with hub_errors(source, key):
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else source, revision=revision,
                                             trust_remote_code=model.trust_remote_code)


def resolve_kind(model: ModelConfig) -> Kind:
    """The recipe model's kind from its config alone (no weights; a GGUF is converted/cached first)."""
    if model.init == "scratch":
        return model_kind(scratch_base_config(model), model.kind)
    return model_kind(pretrained_config(model, resolve_model_path(model)), model.kind)


def ensure_pad(tok: PreTrainedTokenizerBase, kind: Kind | Callable[[], Kind]) -> None:
    """Give the tokenizer a pad token: eos for causal models (padding is masked out), else a new <pad>.

    `kind` may be a function, so the config is only read when a pad token is actually missing.
    """
    if tok.pad_token is not None:
        return
    kind = kind() if callable(kind) else kind
    if kind == "causal" and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    else:
        tok.add_special_tokens({"pad_token": "<pad>"})  # load() grows the embeddings to match


def train_tokenizer(texts: Iterable[str] | None, vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE trained on `texts` (any text is encodable: no unknown tokens), for init: scratch."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        raise IftError("init: scratch without a tokenizer needs the training text to train one", "model.tokenizer",
                       "set model.tokenizer to a tokenizer folder / Hub id, or let the training command pass its texts")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((t for t in texts if t), trainer)
    if tok.get_vocab_size() <= len(SPECIAL_TOKENS) + 256:
        raise IftError("no training text to learn a tokenizer from", "data.sources",
                       "check that the training split has rows, or set model.tokenizer")
    pad, bos, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk)
