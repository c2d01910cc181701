"""Identity of prepared data: code version, fingerprints, stable hashes, source names and cache files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ift.data.formats import conversation_hash
from ift.recipe import SourceConfig

# rows per datasets.map batch (templating's rng is seeded per batch)
BATCH = 1000
CACHE_SUBDIR = "ift-prepared"


def _code_version() -> str:
    """Prepared data depends on the data and templates folders' code: an edit there invalidates caches."""
    ift_dir = Path(__file__).resolve().parents[1]
    h = hashlib.blake2b(digest_size=8)
    for folder in ("data", "templates"):
        for path in sorted((ift_dir / folder).glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


CODE_VERSION = _code_version()


def cache_fingerprint(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return h.hexdigest()


def stable_int(text: str) -> int:
    """A seed component from a string, the same on every machine (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")


def pair_hash(prompt: str, completion: str) -> int:
    digest = hashlib.blake2b(f"{prompt}\x00{completion}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def conversation_cache_key(messages: Sequence[dict]) -> int:
    """The whole conversation's hash (ift.data.conversations) as a signed int64, the `_pair` column's type."""
    h = conversation_hash(messages)
    return h - (1 << 64) if h >= 1 << 63 else h


def source_name(src: SourceConfig) -> str:
    """How reports and the `source` column name a source (the recipe checks these are distinct)."""
    return src.name or Path(src.path.rstrip("/\\")).stem or src.path


def cache_file_path(step: str, fingerprint: str) -> str:
    import datasets

    folder = Path(datasets.config.HF_DATASETS_CACHE) / CACHE_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{step}-{fingerprint}.arrow")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides the token ids: vocabulary, merges, normaliser, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
        if '"truncation":null,"padding":null' not in body[:200]:  # call-time state, not identity
            spec = json.loads(body)
            spec["truncation"] = spec["padding"] = None
            body = json.dumps(spec, sort_keys=True)
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    return cache_fingerprint(type(tokenizer).__name__, body, special, getattr(tokenizer, "chat_template", None),
                        getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None))
