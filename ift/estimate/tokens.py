"""Data: real token counts of the tokenized training split, cached by the data section and source files."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ift import atomic
from ift.data.encoding import IGNORE

CACHE_VERSION = 1


@dataclass(frozen=True)
class TokenCount:
    rows: int
    tokens: int  # input tokens of the training split (encoder side for seq2seq)
    loss_tokens: int  # tokens whose label carries loss (decoder tokens for seq2seq)
    max_tokens: int  # longest row
    max_loss_tokens: int  # most loss tokens in one row


def count_tokens(recipe: Any, kind: str, cache_dir: Path | None) -> TokenCount:
    """Token counts of the tokenized training split, exactly as training prepares it (ift.data.prepare), cached by
    the data section, the tokenizer settings and the local source files' sizes and times."""
    key = _data_key(recipe)
    cache = cache_dir / f"tokens-{key}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            return TokenCount(**json.loads(cache.read_text()))
        except (ValueError, TypeError):
            pass  # a damaged cache is recomputed
    from ift.data.chat_templates import setup_chat_tokenizer
    from ift.data.prepare import build_splits
    from ift.data.tokenization import tokenize
    from ift.modeling.tokenizer import load_tokenizer
    from ift.templates.library import TemplateLibrary

    prepared = build_splits(recipe.data, TemplateLibrary(dirs=tuple(recipe.data.templates_dir)))
    train = prepared.splits["train"]
    texts = (p + " " + c for p, c in zip(train["prompt"], train["completion"]))  # for a scratch tokenizer
    tokenizer = load_tokenizer(recipe.model, train_texts=texts)
    setup_chat_tokenizer(tokenizer, recipe.data.chat_template, recipe.data.special_tokens)  # as training does
    tokens, _ = tokenize(prepared.splits, tokenizer, kind, recipe.data)
    count = _count(tokens["train"], kind)
    if cache is not None:
        atomic.write_text(cache, json.dumps(asdict(count)))
    return count


def _count(split: Any, kind: str) -> TokenCount:
    """Lengths from the Arrow columns (fast for large splits): causal labels are shifted by one, as in the loss."""
    import numpy as np
    import pyarrow.compute as pc

    table = split.with_format("arrow")[:]
    lengths = np.asarray(pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False))
    if "labels" in table.column_names:
        labels = table.column("labels")
        offsets = np.asarray(pc.list_value_length(labels).to_numpy(zero_copy_only=False))
        flat = np.asarray(pc.list_flatten(labels).to_numpy(zero_copy_only=False))
        keep = (flat != IGNORE).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(offsets)[:-1]]).astype(np.int64)
        per_row = np.add.reduceat(keep, starts) if len(flat) else np.zeros(len(offsets), np.int64)
        per_row = np.where(offsets > 0, per_row, 0)
        if kind == "causal":  # the first label never has a prediction before it
            first = np.where(offsets > 0, keep[np.minimum(starts, max(len(flat) - 1, 0))], 0)
            per_row = per_row - first
    else:
        per_row = lengths - 1 if kind == "causal" else lengths
    return TokenCount(rows=int(len(lengths)), tokens=int(lengths.sum()), loss_tokens=int(per_row.sum()),
                      max_tokens=int(lengths.max(initial=0)), max_loss_tokens=int(per_row.max(initial=0)))


def _data_key(recipe: Any) -> str:
    parts = [str(CACHE_VERSION), recipe.data.model_dump_json(),
             json.dumps(recipe.model.model_dump(mode="json"), sort_keys=True)]
    for source in recipe.data.sources:
        path = Path(source.path)
        if path.exists():
            files = sorted(path.rglob("*")) if path.is_dir() else [path]
            parts += [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
    for folder in recipe.data.templates_dir:
        for f in sorted(Path(folder).rglob("*.yaml")) if Path(folder).is_dir() else []:
            parts.append(f"{f}:{f.stat().st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
