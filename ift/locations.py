"""Where a model or dataset comes from: a path on this machine or a Hub repo id, decided the same way for
models, datasets, run targets and cards; and the errors that mean the Hub could not be reached."""

from __future__ import annotations

import importlib
from collections.abc import Collection
from pathlib import Path


def looks_local(text: str, suffixes: Collection[str] = ()) -> bool:
    """A path to find on disk, so that a missing one is reported as a missing file rather than an unknown Hub id.

    Local: it exists; it starts like a path ('.', '/', '~', '\\') or holds a backslash; it has more than one '/'
    (a Hub id has at most one); or it ends with one of `suffixes`, the file types the caller reads (".jsonl",
    ".gguf", ...). `org/name` that does not exist here is a Hub id, as transformers reads it."""
    p = Path(text).expanduser()
    if text.startswith((".", "/", "~", "\\")) or "\\" in text or text.count("/") > 1 or p.is_absolute():
        return True
    return p.suffix.lower() in suffixes or p.exists()


def looks_like_hub_id(text: str | None, suffixes: Collection[str] = ()) -> bool:
    """A Hub repo id: not local (above), not a `pkg:` file, and valid repo-id syntax."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not text or text.startswith("pkg:") or looks_local(text, suffixes):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def connection_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors: the builtin ones and those of huggingface_hub's HTTP client (httpx2 in 2.x,
    httpx in 1.x), which do not derive from ConnectionError."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)
