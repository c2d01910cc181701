"""The recipe's data section -> honest train/validation/test splits of prompt/completion pairs -> tokens.

    sources (local files/folders or Hub ids) ─ load, rename columns
      └ keep the source's own splits; carve missing ones from train (seeded, optionally stratified)
        └ render templates per row (one drawn at random, or every one) ─ raw text when none ─ or, for a
          conversational format (messages, sharegpt, prompt_completion, alpaca), one message list per row
          └ leak check: a (prompt, completion) pair, or a whole conversation, also in validation/test leaves train
            └ training mixture (weighted to a total, or examples-proportional with caps)
              └ tokenize: prompt tokens masked with -100, targets never cut silently; conversations in the chat
                template with loss on assistant replies only (ift.data.conversations)

Every expensive step is a `datasets` map or select with a fingerprint computed here from its inputs
(parent fingerprint, settings, templates, tokenizer, this code), so a second identical run reuses the
Arrow cache files instead of recomputing. Carving happens on raw rows, before templating, so the
template expansions of one row never straddle two splits.
Collation and dataloaders live in `ift.data.collate` and are re-exported here.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import random
import socket
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa

from ift.data.collate import Collator, eval_dataloader, train_dataloader
from ift.data.conversations import (FORMATS as CONVERSATION_FORMATS, DEFAULT_COLUMNS, conversation_hash,
                                detect_format, encode_conversations, end_of_turn_token, normalize_row)
from ift.data.encoding import IGNORE, encode_pairs
from ift.errors import IftError, IftErrors
from ift.recipe import ALPACA_TEMPLATE, SPLITS, DataConfig, SourceConfig

__all__ = ["PreparedData", "build_splits", "check_sources", "tokenize", "Collator", "train_dataloader",
           "eval_dataloader", "describe", "preview_rows", "mixture_counts", "carve_indices", "load_preview_rows"]

# of every prepared split; `messages` holds a conversational row's whole conversation (empty for template rows),
# `prompt`/`completion` its last user turn and final reply (what evaluation answers and scores)
COLUMNS = ("prompt", "completion", "choices", "source", "template", "messages")
# `truncated` codes written by tokenize(): how a row got into the tokenized split. A conversation too long for
# max_length first loses whole earliest exchanges (TURNS_DROPPED); only if the last exchange alone is too long is
# its reply's tail cut (REPLY_CUT), and a final prompt that alone fills max_length drops the row
INTACT, PROMPT_CUT, FIRST_WINDOW, LATER_WINDOW, TURNS_DROPPED, REPLY_CUT = 0, 1, 2, 3, 4, 5

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}
BATCH = 1000
CACHE_SUBDIR = "ift-prepared"


@dataclass
class PreparedData:
    """Templated splits (`prompt`, `completion`, `choices`, `source`, `template`) and what was done."""

    splits: Any  # datasets.DatasetDict with "train", "validation", "test"
    report: dict = field(default_factory=dict)
    # the data section as run: a default split name the source lacks (so the split was carved) pinned to null,
    # and every source's format as detected, so that a run's saved recipe.yaml rebuilds the same splits
    data: DataConfig | None = None


# ------------------------------------------------------------------------------------- identity


def _code_version() -> str:
    """Prepared data depends on the data and templates folders' code: an edit there invalidates caches."""
    ift_dir = Path(__file__).resolve().parents[1]
    h = hashlib.blake2b(digest_size=8)
    for folder in ("data", "templates"):
        for path in sorted((ift_dir / folder).glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


CODE_VERSION = _code_version()


def _fingerprint(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return h.hexdigest()


def _stable_int(text: str) -> int:
    """A seed component from a string, the same on every machine (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")


def _pair_hash(prompt: str, completion: str) -> int:
    digest = hashlib.blake2b(f"{prompt}\x00{completion}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _conversation_hash(messages: Sequence[dict]) -> int:
    """The whole conversation's hash (ift.data.conversations) as a signed int64, the `_pair` column's type."""
    h = conversation_hash(messages)
    return h - (1 << 64) if h >= 1 << 63 else h


def source_name(src: SourceConfig) -> str:
    """How reports and the `source` column name a source (the recipe checks these are distinct)."""
    return src.name or Path(src.path.rstrip("/\\")).stem or src.path


def _cache_file(step: str, fingerprint: str) -> str:
    import datasets

    folder = Path(datasets.config.HF_DATASETS_CACHE) / CACHE_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{step}-{fingerprint}.arrow")


# ------------------------------------------------------------------------------------- sources


@dataclass
class _Source:
    index: int
    cfg: SourceConfig
    name: str
    raw: dict[str, Any]  # the source's own splits (columns renamed)
    origin: str  # "file", "folder", "save_to_disk" or "hub"
    ignored_files: list[str] = field(default_factory=list)
    files: dict[str, list[str]] = field(default_factory=dict)  # the source's split -> its data files (local)
    format: str = "template"  # template, text, or a conversational format (resolve_format)

    @property
    def key(self) -> str:
        return f"data.sources.{self.index}"

    def columns(self) -> list[str]:
        return sorted({c for ds in self.raw.values() for c in ds.column_names})


def _looks_local(path: str) -> bool:
    """A path we should find on disk (so a missing one is a missing file, not a Hub id)."""
    p = Path(path).expanduser()
    if p.exists() or path.startswith((".", "/", "~", "\\")) or p.suffix.lower() in FORMATS or p.is_absolute():
        return True
    first = Path(path).parts[0] if Path(path).parts else ""
    return len(Path(path).parts) > 2 or (len(Path(path).parts) == 2 and Path(first).is_dir())


def _split_of(file: Path) -> str | None:
    """Which split a file holds, from its name: train.jsonl, dev.csv, test-00000-of-00001.parquet ..."""
    stem = file.name.split(".")[0].lower()
    for sep in ("-", "_"):
        stem = stem.split(sep)[0] if stem.split(sep)[0] in SPLIT_ALIASES else stem
    return SPLIT_ALIASES.get(stem)


def _path_key(key: str) -> str:
    """Where a source's path problems are reported: the recipe key, or a command-line flag as it is."""
    return key if key.startswith("-") else f"{key}.path"


def _folder_files(folder: Path, key: str) -> tuple[str, dict[str, list[str]], list[str]]:
    """(builder, {split: files}, ignored files) for a folder of data files."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in FORMATS)
    if not files:
        others = sorted(f.name for f in folder.iterdir() if not f.name.startswith("."))[:8]
        raise IftError(f"no data files in folder {folder}", _path_key(key),
                       f"put .jsonl/.json/.csv/.parquet/.txt files there (found: {', '.join(others) or 'nothing'}), "
                       "or point to a folder written by Dataset.save_to_disk")
    builders = {FORMATS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise IftError(f"folder {folder} mixes formats ({', '.join(sorted(builders))})", _path_key(key),
                       "keep one format per folder, or point the source at a single file")
    by_split: dict[str, list[str]] = {}
    unnamed = []
    for f in files:
        split = _split_of(f)
        if split is None:
            unnamed.append(str(f))
        else:
            by_split.setdefault(split, []).append(str(f))
    if not by_split:  # e.g. all.jsonl: one pool, carved into splits later
        return builders.pop(), {"train": unnamed}, []
    return builders.pop(), by_split, unnamed


def _load_local(src: SourceConfig, key: str) -> tuple[Any, str, list[str], dict[str, list[str]]]:
    """(DatasetDict of the source's own splits, origin, ignored files, {split: files}) from a local path."""
    import datasets

    path = Path(src.path).expanduser()
    if not path.exists():
        raise IftError(f"data file or folder not found: {src.path}", _path_key(key),
                       f"check the path (relative paths start from {Path.cwd()}), or give a Hub dataset id")
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - any failure to read a saved dataset is the user's folder
            raise IftError(f"cannot read save_to_disk folder {src.path}: {type(err).__name__}: {_first_line(err)}",
                           _path_key(key), "re-save it with Dataset.save_to_disk / DatasetDict.save_to_disk"
                           ) from None
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({"train": loaded})
        return loaded, "save_to_disk", [], {}
    if path.is_dir():
        builder, data_files, ignored = _folder_files(path, key)
        origin = "folder"
    else:
        builder = FORMATS.get(path.suffix.lower())
        if builder is None:
            raise IftError(f"unknown data format '{path.suffix or path.name}'", _path_key(key),
                           "use .jsonl, .json, .csv, .parquet or .txt files, or a Dataset.save_to_disk folder")
        data_files, ignored, origin = {"train": [str(path)]}, [], "file"
    # one split at a time: splits may have different columns (DialogSum's test has summary1..3)
    loaded = {split: _read_split(builder, split, files, key) for split, files in data_files.items()}
    return datasets.DatasetDict(loaded), origin, ignored, data_files


# ------------------------------------------------------------------------------------- reading files
# Every command that reads data files (training, `ift data`, `ift validate`, `ift templates preview|validate`)
# reads them here, so the same file fails the same way everywhere: one line naming the file, the line or row,
# and the fix.

TEXT_BUILDERS = ("json", "csv", "text")


# how to repair a file each builder could not parse
READ_FIXES = {
    "json": "check that every line is one complete JSON object, e.g. {\"text\": \"...\", \"label\": \"...\"}",
    "csv": "check that the file has a header row, the same number of fields on every row, and closed quotes",
    "parquet": "the file is cut short or not parquet: write it again (pandas.DataFrame.to_parquet, Dataset.to_parquet)",
    "text": "check that it is plain UTF-8 text",
}


class _QuietLoader(logging.Filter):
    """datasets logs its own 'Failed to load JSON / read schema ...' before raising; the raised error is reported
    instead, as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to ")


def _first_line(err: BaseException | str, limit: int = 300) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else ""


def _read_split(builder: str, split: str, files: list[str], key: str) -> Any:
    import datasets

    for file in files:
        _check_file(Path(file), builder, key)
    builder_logger = logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}")
    quiet = _QuietLoader()
    builder_logger.addFilter(quiet)
    try:
        return datasets.load_dataset(builder, data_files={split: files}, split=split)
    except Exception as err:  # noqa: BLE001 - parse errors surface as many exception types
        raise _read_error(builder, files, err, key) from None
    finally:
        builder_logger.removeFilter(quiet)


def _check_file(path: Path, builder: str, key: str) -> None:
    """Problems found before parsing: an empty file, text that is not UTF-8."""
    size = path.stat().st_size
    if size == 0 or (builder in TEXT_BUILDERS and size < 1 << 16 and not path.read_bytes().strip()):
        raise IftError(f"data file {path} is empty", _path_key(key),
                       "put rows in it (one JSON object per line for .jsonl, a header row then rows for .csv), "
                       "or remove it from the source")
    if builder in TEXT_BUILDERS:
        problem = _utf8_problem(path)
        if problem:
            source = "utf-16" if "UTF-16" in problem else "latin1"  # latin1: the usual other encoding
            raise IftError(f"cannot read {path}: it is not UTF-8 text ({problem})", _path_key(key),
                           f"re-save it as UTF-8, e.g. `iconv -f {source} -t utf-8 FILE > NEW`")


def _utf8_problem(path: Path) -> str | None:
    """Where the first byte that is not UTF-8 is (line and column), or None; read in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines, line_start = 0, 1, 0
    with open(path, "rb") as fh:
        head = fh.read(2)
        fh.seek(0)
        if head in (b"\xff\xfe", b"\xfe\xff"):
            return "it starts with a UTF-16 byte order mark"
        while chunk := fh.read(1 << 22):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                before = chunk[:err.start]
                line = lines + before.count(b"\n")
                start = (offset + before.rindex(b"\n") + 1) if b"\n" in before else line_start
                return f"byte 0x{chunk[err.start]:02x} at line {line}, column {offset + err.start - start + 1}"
            newlines = chunk.count(b"\n")
            if newlines:
                line_start = offset + chunk.rindex(b"\n") + 1
            lines += newlines
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return f"the file ends inside a multi-byte character (line {lines})"
    return None


def _read_error(builder: str, files: list[str], err: Exception, key: str) -> IftError:
    """The parse failure as one line: the file and line for JSON; datasets' own first line otherwise."""
    if builder == "json":
        for file in files:
            found = _json_problem(Path(file))
            if found:
                return IftError(found, _path_key(key), "fix or remove that line: each line of a .jsonl file is "
                                "one complete JSON object, e.g. {\"text\": \"...\", \"label\": \"...\"}")
    cause = err.__cause__ or err
    return IftError(f"cannot read {', '.join(files)} as {builder}: {type(cause).__name__}: {_first_line(cause)}",
                    _path_key(key), READ_FIXES.get(builder, f"check that every file is valid {builder}"))


def _json_problem(path: Path) -> str | None:
    """The first line of a JSON-lines file that is not a JSON object (or the error of a whole-file JSON array)."""
    with open(path, encoding="utf-8") as fh:
        first = fh.read(1 << 16).lstrip()
    if first.startswith("["):  # a .json file holding one array of objects
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            return f"cannot read {path}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None) if isinstance(rows, list) else None
        return None if bad is None else f"cannot read {path}: item {bad} of its JSON array is not an object"
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                ends_early = "Unterminated" in err.msg or (err.msg.startswith("Expecting")
                                                           and err.pos >= len(line.rstrip()))
                cut = " (the line is cut short: a truncated file?)" if ends_early else ""
                return f"cannot read {path}: line {number} is not valid JSON: {err.msg} (column {err.colno}){cut}"
            if not isinstance(row, dict):
                return f"cannot read {path}: line {number} is a JSON {type(row).__name__}, not an object"
    return None


# ------------------------------------------------------------------------------------- values


def _json_kind(text: str | None) -> str | None:
    """The JSON type of a value of a `Json` column, from the first character of its JSON text."""
    if text is None:
        return None
    c = text[:1]
    return {"\"": "string", "[": "list", "{": "object", "t": "boolean", "f": "boolean", "n": None}.get(
        c, "number" if c else None)


def _value_problem(ds: Any, column: str, limit: int | None) -> tuple[int, str, str] | None:
    """(row, what, fix) for the first bad value of a column a template reads, or None.

    A column whose rows hold different types (a string here, a list there) loads as JSON; a value over `limit`
    characters cannot be rendered by a template."""
    import pyarrow.compute as pc

    feature = ds.features.get(column)
    if feature is None or not len(ds):
        return None
    data = ds.with_format("arrow")[column]
    if type(feature).__name__ == "Json":  # stored as JSON text (an Arrow extension type over strings)
        if isinstance(data.type, pa.BaseExtensionType):
            data = pa.chunked_array([c.storage for c in data.chunks], type=data.type.storage_type)
        kinds = [_json_kind(v) for v in pc.utf8_slice_codeunits(pc.utf8_ltrim_whitespace(data), 0, 1).to_pylist()]
        first = next((i for i, k in enumerate(kinds) if k is not None), None)
        other = next((i for i, k in enumerate(kinds) if k is not None and k != kinds[first]), None) \
            if first is not None else None
        if other is not None:
            return (other, f"column '{column}' mixes types: a {kinds[first]} in row {first}, a {kinds[other]} in "
                           f"row {other}", f"give '{column}' one type in every row (e.g. all strings)")
        return None
    if limit is None or not pa.types.is_string(data.type) and not pa.types.is_large_string(data.type):
        return None
    lengths = pc.utf8_length(data)
    longest = pc.max(lengths).as_py()
    if longest is not None and longest > limit:
        row = pc.index(lengths, longest).as_py()
        return (row, f"row {row} has a {longest:,}-character value in column '{column}'",
                f"a template renders at most {limit:,} characters: shorten or drop that row")
    return None


def _check_values(ds: Any, columns: Sequence[str], where: str, limit: int | None) -> None:
    for column in sorted(set(columns)):
        found = _value_problem(ds, column, limit)
        if found:
            row, what, fix = found
            raise IftError(what, f"{where}, row {row}", fix)


def _check_source_values(source: _Source, templates: Sequence[Any], fixed: Any | None) -> None:
    """The values the templates (or the raw-text column) read, in every split the recipe uses."""
    from ift.templates.library import MAX_SIZE

    inverse = {new: old for old, new in source.cfg.columns.items()}
    for ours, ds, where in _splits_read(source):
        use = [fixed] if fixed is not None and ours != "train" else list(templates)
        columns = {inverse.get(v, v) for t in use for v in t.variables()} if use else {source.cfg.text_column}
        _check_values(ds, columns, where, MAX_SIZE if use else None)


def _splits_read(source: _Source) -> Iterator[tuple[str, Any, str]]:
    """(our split, the source's dataset, where: its file or split) for each of its splits the recipe reads, once."""
    seen = set()
    for ours in SPLITS:
        theirs = getattr(source.cfg.splits, ours)
        if theirs is None or theirs not in source.raw or theirs in seen:
            continue
        seen.add(theirs)
        files = source.files.get(theirs, [])
        where = f"{_path_key(source.key)}: {files[0]}" if len(files) == 1 else \
            f"{_path_key(source.key)}: split '{theirs}' of {source.cfg.path}"
        yield ours, source.raw[theirs], where


def resolve_format(cfg: SourceConfig, has_templates: bool, columns: Sequence[str], first_row: dict | None = None,
                   key: str = "data.sources") -> str:
    """What a source's rows are: its `format`, or (auto) template when it has templates, else the conversational
    format its columns show, else raw text. An undecidable source is an error naming what it has."""
    if cfg.format != "auto":
        return cfg.format
    if has_templates:
        return "template"
    cols = set(columns)
    if cfg.conversation_column and cfg.conversation_column in cols:
        turn = next(iter((first_row or {}).get(cfg.conversation_column) or []), None)
        if isinstance(turn, dict) and {"from", "value"} <= set(turn):
            return "sharegpt"
        return "messages"
    found = detect_format(cols)
    if found:
        return found
    if cfg.text_column in cols:
        return "text"
    candidates = [f for f in CONVERSATION_FORMATS if detect_format({*_format_columns(f)})]
    raise IftError(f"cannot tell what the rows of source '{source_name(cfg)}' are (columns: "
                   f"{', '.join(sorted(cols)) or 'none'})", f"{key}.format",
                   "give it templates, or set format: " + ", ".join(["text", *candidates])
                   + f" (text reads column '{cfg.text_column}'; rename columns with {key}.columns)")


def _format_columns(fmt: str, cfg: SourceConfig | None = None) -> list[str]:
    """The columns a conversational format reads."""
    if fmt in DEFAULT_COLUMNS:
        return [(cfg.conversation_column if cfg else None) or DEFAULT_COLUMNS[fmt]]
    return {"prompt_completion": ["prompt", "completion"], "alpaca": ["instruction", "output"]}.get(fmt, [])


def _normalize(cfg: SourceConfig, fmt: str, row: dict, where: str, index: int,
               system_prompt: str | None) -> list[dict[str, str]]:
    return normalize_row(row, fmt, source=where, index=index, column=cfg.conversation_column,
                         system_prompt=system_prompt)


def _check_conversations(source: _Source, system_prompt: str | None) -> None:
    """Every row of every split the recipe reads is a conversation there is something to learn from: the first
    that is not is an error naming the file (or split) and the row as the file numbers it, before any carving."""
    if source.format not in ("messages", "sharegpt", "prompt_completion"):
        return
    for _, ds, where in _splits_read(source):
        wanted = [c for c in _format_columns(source.format, source.cfg) if c in ds.column_names]
        if len(wanted) < len(_format_columns(source.format, source.cfg)):
            continue  # reported by _check_columns, with the columns there are
        table = ds.with_format("arrow").select_columns(wanted) if len(ds) else None
        for start in range(0, len(ds), BATCH):
            rows = table[start:start + BATCH].to_pylist()
            for k, row in enumerate(rows):
                _normalize(source.cfg, source.format, row, where, start + k, system_prompt)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a connection to the Hub? (A quick probe: datasets itself retries for ~25 s.)"""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; let datasets try
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_error(src: SourceConfig, key: str, detail: str = "") -> IftError:
    return IftError(
        f"the Hugging Face Hub is not reachable, so dataset '{src.path}' cannot be loaded{detail}",
        _path_key(key),
        "check your network (or set HF_HUB_OFFLINE=1 to use a copy already in the datasets cache), or download "
        "the data and point the source at a local .jsonl/.csv/.parquet file or save_to_disk folder",
    )


def _load_hub(src: SourceConfig, key: str, split: str | None = None) -> Any:
    """The Hub dataset's splits (only `split` when given) as a DatasetDict."""
    import datasets
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        raise _hub_error(src, key)
    try:
        loaded = datasets.load_dataset(src.path, name=src.config, revision=src.revision, split=split)
    except ConnectionError as err:
        raise _hub_error(src, key, f" ({_first_line(err, 200)})") from None
    except Exception as err:  # noqa: BLE001 - not found, bad config, gated ...
        raise IftError(f"cannot load Hub dataset '{src.path}'"
                       + (f" (config '{src.config}')" if src.config else "") + f": {_first_line(err)}",
                       _path_key(key), "check the dataset id, its config (data.sources.N.config, or --data ID:CONFIG),"
                       " revision and split; or use a local path") from None
    return datasets.DatasetDict({split: loaded}) if split is not None else loaded


def _load_source(index: int, src: SourceConfig, templates: Sequence[Any] = (), fixed: Any | None = None,
                 rename: bool = True) -> _Source:
    """Load a source's own splits, check the values its templates read, rename its columns."""
    key = f"data.sources.{index}"
    files: dict[str, list[str]] = {}
    if _looks_local(src.path):
        loaded, origin, ignored, files = _load_local(src, key)
    else:
        loaded, origin, ignored = _load_hub(src, key), "hub", []
    raw = dict(loaded.items())
    source = _Source(index, src, source_name(src), raw, origin, ignored, files)
    _check_source_values(source, templates, fixed)
    if rename:
        _rename(source)
    return source


def _rename(source: _Source) -> None:
    renames = source.cfg.columns
    if not renames:
        return
    missing = [old for old in renames if not any(old in ds.column_names for ds in source.raw.values())]
    if missing:
        raise IftError(f"column '{missing[0]}' to rename is not in the source", f"{source.key}.columns",
                       f"columns are: {', '.join(source.columns())}")
    for split, ds in source.raw.items():
        mapping = {old: new for old, new in renames.items() if old in ds.column_names and old != new}
        clash = [new for old, new in mapping.items() if new in ds.column_names and new not in mapping]
        if clash:
            # e.g. DialogSum validation has summary1..3: renaming summary1 -> summary where a `summary`
            # already exists would be ambiguous; name the problem instead of guessing.
            raise IftError(f"renaming to '{clash[0]}' clashes with an existing column in split '{split}'",
                           f"{source.key}.columns", "rename the existing column too, or pick another name")
        if mapping:
            source.raw[split] = ds.rename_columns(mapping)


# ------------------------------------------------------------------------------------- splits


def _explicit_splits(cfg: SourceConfig) -> set[str]:
    return set(cfg.splits.model_fields_set) if "splits" in cfg.model_fields_set else set()


def _assign(source: _Source) -> dict[str, Any | None]:
    """Our split -> the source's dataset (None: carve it from train)."""
    explicit = _explicit_splits(source.cfg)
    out: dict[str, Any | None] = {}
    for ours in SPLITS:
        theirs = getattr(source.cfg.splits, ours)
        if theirs is None:
            out[ours] = None
        elif theirs in source.raw:
            out[ours] = source.raw[theirs]
        elif ours in explicit or ours == "train":
            fix = (f"name one of its splits ({', '.join(source.raw)})"
                   + ("" if ours == "train" else f", or set {source.key}.splits.{ours}: null to carve it from train"))
            raise IftError(f"split '{theirs}' is not in source '{source.name}' (it has: {', '.join(source.raw)})",
                           f"{source.key}.splits.{ours}", fix)
        else:
            out[ours] = None  # the default name is absent: carve
    if out["train"] is None:
        raise IftError(f"source '{source.name}' has no training split", f"{source.key}.splits.train",
                       f"name the split holding training rows (it has: {', '.join(source.raw)})")
    return out


def _size(value: float, n: int) -> int:
    if value >= 1:
        return int(value)
    return max(1, int(round(value * n))) if value > 0 else 0  # a fraction asked for rows: at least one


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split `total` over classes in proportion to `counts` (largest remainder), never above a count."""
    if total <= 0 or counts.sum() == 0:
        return np.zeros_like(counts)
    exact = counts * (total / counts.sum())
    out = np.minimum(np.floor(exact).astype(int), counts)
    order = np.argsort(-(exact - out), kind="stable")
    for i in order:
        if out.sum() >= total:
            break
        if out[i] < counts[i]:
            out[i] += 1
    return out


def carve_indices(n: int, sizes: dict[str, int], rng: np.random.Generator,
                  labels: Sequence[Any] | None = None) -> dict[str, np.ndarray]:
    """Row indices for the carved splits and what is left for train; stratified when labels are given.

    Indices within each split are sorted (source order), so selection is cache-friendly; the random
    part is which rows go where.
    """
    need = [s for s in ("validation", "test") if sizes.get(s, 0) > 0]
    if labels is None:
        perm = rng.permutation(n)
        out, start = {}, 0
        for split in need:
            out[split] = np.sort(perm[start:start + sizes[split]])
            start += sizes[split]
        out["train"] = np.sort(perm[start:])
        return out
    keys = np.array([str(v) for v in labels], dtype=object)
    classes = sorted(set(keys.tolist()))
    members = [rng.permutation(np.flatnonzero(keys == c)) for c in classes]
    counts = np.array([len(m) for m in members])
    taken = np.zeros_like(counts)
    picked: dict[str, list[np.ndarray]] = {s: [] for s in need}
    for split in need:
        quota = _allocate(counts - taken, sizes[split])
        for c, m in enumerate(members):
            picked[split].append(m[taken[c]:taken[c] + quota[c]])
        taken += quota
    out = {s: np.sort(np.concatenate(parts)) if parts else np.array([], dtype=int) for s, parts in picked.items()}
    out["train"] = np.sort(np.concatenate([m[taken[c]:] for c, m in enumerate(members)]))
    return out


def _check_stratify(data: DataConfig, sources: list[_Source], assignments: list[dict[str, Any | None]]) -> None:
    """stratify_by must name a column of at least one source that carves a split (in a mixture,
    sources without it are carved at random: label columns differ between datasets)."""
    if not data.stratify_by:
        return
    carving = [(s, a["train"]) for s, a in zip(sources, assignments) if a["validation"] is None or a["test"] is None]
    if carving and not any(data.stratify_by in train.column_names for _, train in carving):
        source, train = carving[0]
        raise IftError(f"stratify column '{data.stratify_by}' is not in source '{source.name}'", "data.stratify_by",
                       f"columns are: {', '.join(train.column_names)}; rename one with "
                       f"{source.key}.columns: {{old_name: {data.stratify_by}}}, or remove stratify_by")


def _carve(source: _Source, assigned: dict[str, Any | None], data: DataConfig, report: dict) -> dict[str, Any]:
    train = assigned["train"]
    n = len(train)
    sizes = {"validation": _size(data.validation_size, n) if assigned["validation"] is None else 0,
             "test": _size(data.test_size, n) if assigned["test"] is None else 0}
    carved = {s: k for s, k in sizes.items() if k > 0}
    info = {"own": [s for s in SPLITS if assigned[s] is not None], "carved": carved, "stratified_by": None}
    report[source.name] = info
    if not carved:
        return _no_missing(dict(assigned), train)
    if sum(carved.values()) >= n:
        raise IftError(f"source '{source.name}' has {n} training rows: too few to carve "
                       + " and ".join(f"{k} {s}" for s, k in carved.items()) + " rows and keep any for training",
                       "data.validation_size / data.test_size", "use smaller sizes, or give the source its own splits")
    labels = None
    if data.stratify_by:
        if data.stratify_by in train.column_names:
            labels = train.with_format("arrow")[data.stratify_by].to_pylist()
            info["stratified_by"] = data.stratify_by
        else:  # another source has the column (checked before): this one is carved at random, and says so
            info["not_stratified"] = f"no column '{data.stratify_by}'"
    rng = np.random.default_rng([data.seed, _stable_int(source.name)])
    picked = carve_indices(n, carved, rng, labels)
    out = dict(assigned)
    for split, idx in picked.items():
        fp = _fingerprint("carve", train._fingerprint, split, idx)
        out[split] = train.select(idx, new_fingerprint=fp)
    return _no_missing(out, train)


def _no_missing(splits: dict[str, Any | None], train: Any) -> dict[str, Any]:
    """A split sized 0 (validation_size: 0) is an empty dataset with the source's columns."""
    return {s: ds if ds is not None else train.select([], new_fingerprint=_fingerprint("empty", train._fingerprint))
            for s, ds in splits.items()}


# ------------------------------------------------------------------------------------- templates


def _features() -> Any:
    import datasets

    return datasets.Features({
        "prompt": datasets.Value("string"), "completion": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")), "source": datasets.Value("string"),
        "template": datasets.Value("string"), "_pair": datasets.Value("int64"),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    })


def _resolve_templates(data: DataConfig, library: Any) -> tuple[list[list[Any]], list[Any], list[IftError]]:
    """Template objects per source (and the fixed evaluation template), every bad ref reported."""
    per_source, eval_fixed, errors = [], [], []
    for i, src in enumerate(data.sources):
        found = []
        for j, ref in enumerate(src.templates):
            try:
                found.append(library.get(ref))
            except IftError as err:  # the key, then the template file's own location when it has one
                errors.append(IftError(err.what, _join(f"data.sources.{i}.templates.{j}", err.where), err.fix))
        fixed = None
        if src.eval_template:
            try:
                fixed = library.get(src.eval_template)
            except IftError as err:
                errors.append(IftError(err.what, _join(f"data.sources.{i}.eval_template", err.where), err.fix))
        per_source.append(found)
        eval_fixed.append(fixed)
    return per_source, eval_fixed, errors


def _join(key: str, where: str | None) -> str:
    return f"{key}: {where}" if where else key


def _template_identity(tpl: Any) -> tuple:
    return (getattr(tpl, "ref", tpl.name), tpl.id, getattr(tpl, "jinja", ""),
            getattr(tpl, "answer_choices_jinja", None))


def _check_columns(source: _Source, templates: list[Any], columns: Sequence[str], split: str | None = None,
                   key_field: str = "templates") -> list[IftError]:
    errors = []
    cols = set(columns)
    where = f"split '{split}' of source '{source.name}'" if split else f"source '{source.name}'"
    if source.format in ("messages", "sharegpt", "prompt_completion"):
        missing = [c for c in _format_columns(source.format, source.cfg) if c not in cols]
        if missing:
            which = "conversation_column" if source.format in DEFAULT_COLUMNS else "columns"
            errors.append(IftError(
                f"{source.format} {where} has no column {', '.join(repr(m) for m in missing)}",
                f"{source.key}.{which}", f"columns are: {', '.join(sorted(cols))}; "
                + (f"set {source.key}.conversation_column to the column of turns" if which == "conversation_column"
                   else f"rename them with {source.key}.columns: {{old_name: {missing[0]}}}") + ", or set format"))
        return errors
    if not templates:
        if source.cfg.text_column not in cols:
            errors.append(IftError(
                f"raw-text {where} has no column '{source.cfg.text_column}'",
                f"{source.key}.text_column", f"columns are: {', '.join(sorted(cols))}; set text_column to one "
                "of them, or give the source templates"))
        return errors
    for tpl in templates:
        missing = sorted(tpl.variables() - cols)
        if missing:
            errors.append(IftError(
                f"template '{getattr(tpl, 'ref', tpl.name)}' uses {', '.join(repr(m) for m in missing)}, "
                f"not among the columns of {where}",
                f"{source.key}.{key_field}", f"columns are: {', '.join(sorted(cols))}; rename one with "
                f"{source.key}.columns: {{old_name: {missing[0]}}}, or choose another template"
                + (f" (or set {source.key}.splits.{split}: null to carve {split} from train)"
                   if split and split != "train" else "")))
    return errors


class _Renderer:
    """datasets.map function: raw rows -> prompt/completion/choices/source/template/_pair rows."""

    def __init__(self, source: str, templates: list[Any], picks: np.ndarray | None, text_column: str, seed: tuple,
                 fmt: str = "template", cfg: SourceConfig | None = None, system_prompt: str | None = None):
        self.source, self.templates, self.picks = source, templates, picks
        self.text_column, self.seed = text_column, seed
        self.fmt, self.cfg, self.system_prompt = fmt, cfg, system_prompt

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        from ift.templates.library import render_row

        out: dict[str, list] = {k: [] for k in ("prompt", "completion", "choices", "source", "template", "_pair",
                                                "messages")}
        columns = list(batch)
        if self.fmt in ("messages", "sharegpt", "prompt_completion"):
            for pos, index in enumerate(indices):  # every row was checked on load (_check_conversations)
                row = {c: batch[c][pos] for c in columns}
                messages = _normalize(self.cfg, self.fmt, row, self.source, index, self.system_prompt)
                self._add_conversation(out, messages, [], f"({self.fmt})")
            return out
        if not self.templates:
            for text in batch[self.text_column]:
                if text is None or not str(text).strip():
                    continue  # nothing to learn from: skipped (counted from the row totals)
                self._add(out, "", str(text), [], "")
            return out
        # `choice`/`random` inside templates draw from this rng: seeded per batch, so reruns match
        rng = random.Random(f"{self.seed}-{indices[0] if indices else 0}")
        for pos, index in enumerate(indices):
            row = {c: batch[c][pos] for c in columns}
            chosen = self.templates if self.picks is None else [self.templates[self.picks[index]]]
            for tpl in chosen:
                pair = render_row(tpl, row, index, rng=rng, truncate=False)
                if pair is None:
                    continue  # the template does not apply to this row (promptsource convention)
                choices = tpl.answer_choices(row, rng=rng) or []
                if self.fmt == "alpaca":  # the template's pair is a one-exchange conversation
                    messages = [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
                    if self.system_prompt is not None:
                        messages.insert(0, {"role": "system", "content": self.system_prompt})
                    self._add_conversation(out, messages, choices, tpl.ref)
                else:
                    self._add(out, pair[0], pair[1], choices, tpl.ref)
        return out

    def _add(self, out: dict[str, list], prompt: str, completion: str, choices: list[str], template: str) -> None:
        out["prompt"].append(prompt)
        out["completion"].append(completion)
        out["choices"].append(list(choices))
        out["source"].append(self.source)
        out["template"].append(template)
        out["_pair"].append(_pair_hash(prompt, completion))
        out["messages"].append([])

    def _add_conversation(self, out: dict[str, list], messages: list[dict], choices: list[str], template: str) -> None:
        """A conversation hashed whole (leak check); prompt/completion are its last user turn and final reply."""
        out["prompt"].append(next(m["content"] for m in reversed(messages[:-1]) if m["role"] != "assistant"))
        out["completion"].append(messages[-1]["content"])
        out["choices"].append(list(choices))
        out["source"].append(self.source)
        out["template"].append(template)
        out["_pair"].append(_conversation_hash(messages))
        out["messages"].append(messages)


def _render(ds: Any, source: _Source, split: str, templates: list[Any], data: DataConfig) -> tuple[Any, dict]:
    """Render one split; also returns how many rows each template was expected to produce."""
    cfg = source.cfg
    mode = "all" if cfg.template_mode == "all" and len(templates) > 1 else "sample"
    picks = None
    expected: dict[str, int] = {}
    if templates and mode == "sample":
        rng = np.random.default_rng([data.seed, _stable_int(source.name), SPLITS.index(split)])
        picks = rng.integers(0, len(templates), size=len(ds))
        counts = np.bincount(picks, minlength=len(templates))
        for tpl, count in zip(templates, counts):
            expected[tpl.ref] = expected.get(tpl.ref, 0) + int(count)
    elif templates:
        expected = {tpl.ref: len(ds) for tpl in templates}
    elif source.format in ("messages", "sharegpt", "prompt_completion"):
        expected = {f"({source.format})": len(ds)}
    else:
        expected = {"": len(ds)}
    seed = (data.seed, source.name, split)
    conversational = source.format in CONVERSATION_FORMATS
    fp = _fingerprint("render", ds._fingerprint, seed, mode, [_template_identity(t) for t in templates],
                      cfg.text_column if not templates else None, source.format,
                      (cfg.conversation_column, data.system_prompt) if conversational else None, CODE_VERSION)
    fn = _Renderer(source.name, templates, picks, cfg.text_column, seed, source.format, cfg,
                   data.system_prompt if conversational else None)
    if not len(ds):  # datasets skips the function on empty input and keeps no columns
        import datasets

        empty = datasets.Dataset.from_dict({k: [] for k in _features()}, features=_features())
        return empty, expected
    try:
        out = ds.map(fn, batched=True, batch_size=BATCH, with_indices=True, remove_columns=ds.column_names,
                     features=_features(), new_fingerprint=fp, cache_file_name=_cache_file("render", fp),
                     desc=f"templating {source.name}/{split}")
    except IftError as err:
        raise IftError(err.what, f"{source.key} ({source.name}), split {split}: {err.where}", err.fix) from None
    return out, expected


# ------------------------------------------------------------------------------------- leaks and mixture


def _column_np(ds: Any, column: str) -> np.ndarray:
    table = ds.with_format("arrow")[:] if len(ds) else None
    if table is None:
        return np.array([], dtype=np.int64)
    return table.column(column).to_numpy()


def _drop_rows(ds: Any, mask: np.ndarray, why: str) -> Any:
    if not mask.any():
        return ds
    keep = np.flatnonzero(~mask)
    return ds.select(keep, new_fingerprint=_fingerprint(why, ds._fingerprint, keep))


def _remove_leaks(rendered: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Pairs in validation or test leave train; pairs in test leave validation. Counts per source."""
    hashes = {name: {s: _column_np(ds, "_pair") for s, ds in splits.items()} for name, splits in rendered.items()}
    in_test = np.concatenate([h["test"] for h in hashes.values()])
    in_eval = np.concatenate([in_test, *[h["validation"] for h in hashes.values()]])
    removed: dict[str, dict[str, int]] = {}
    for name, splits in rendered.items():
        train_mask = np.isin(hashes[name]["train"], in_eval)
        val_mask = np.isin(hashes[name]["validation"], in_test)
        splits["train"] = _drop_rows(splits["train"], train_mask, "leak-train")
        splits["validation"] = _drop_rows(splits["validation"], val_mask, "leak-validation")
        removed[name] = {"train": int(train_mask.sum()), "validation": int(val_mask.sum())}
    return removed


def mixture_counts(available: dict[str, int], weights: dict[str, float] | None, total: int | None,
                   caps: dict[str, int | None]) -> dict[str, int]:
    """Rows to take from each source for the training mixture.

    weighted: `total` rows split by the normalised weights (largest remainder); without a total, the
    largest total that needs no source repeated. proportional: every row, up to each source's cap.
    """
    capped = {n: min(a, caps.get(n) or a) for n, a in available.items()}
    if weights is None:
        return capped
    wsum = sum(weights.values())
    share = {n: w / wsum for n, w in weights.items()}
    if total is None:
        total = int(min(capped[n] / share[n] for n in capped if share[n] > 0))
    names = list(available)
    exact = np.array([total * share[n] for n in names])
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return {n: int(c) for n, c in zip(names, counts)}


def _sample(ds: Any, k: int, rng: np.random.Generator, name: str) -> Any:
    """k rows: a random subset, or whole repeats plus a random remainder when k exceeds the rows."""
    n = len(ds)
    if k == n:
        return ds
    repeats, rest = divmod(k, n)
    idx = np.concatenate([np.tile(np.arange(n), repeats), np.sort(rng.choice(n, size=rest, replace=False))])
    return ds.select(idx, new_fingerprint=_fingerprint("mix", ds._fingerprint, name, k, idx))


def _mix(trains: dict[str, Any], data: DataConfig) -> tuple[Any, dict]:
    import datasets

    mix = data.mixture
    caps = {source_name(s): s.max_rows or (mix.cap if mix.strategy == "proportional" else None) for s in data.sources}
    weights = None
    if mix.strategy == "weighted":
        weights = {source_name(s): (s.weight if s.weight is not None else 1.0) for s in data.sources}
    available = {n: len(ds) for n, ds in trains.items()}
    counts = mixture_counts(available, weights, mix.total, caps)
    parts = []
    for name, ds in trains.items():
        rng = np.random.default_rng([data.seed, _stable_int(name), 7])
        if counts[name] > 0 and len(ds) > 0:
            parts.append(_sample(ds, counts[name], rng, name))
    train = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    total = max(sum(counts.values()), 1)
    wsum = sum(weights.values()) if weights else None
    report = {"strategy": mix.strategy, "total": sum(counts.values()), "sources": {
        n: {"available": available[n], "rows": counts[n], "row_share": round(counts[n] / total, 4),
            "weight": round(weights[n] / wsum, 4) if weights else None,
            "repeated": round(counts[n] / available[n], 3) if available[n] and counts[n] > available[n] else None}
        for n in trains}}
    return train, report


# ------------------------------------------------------------------------------------- build_splits


def build_splits(data: DataConfig, library: Any) -> PreparedData:
    """Load, carve, template, leak-check and mix the recipe's sources into train/validation/test."""
    import datasets

    per_source, eval_fixed, errors = _resolve_templates(data, library)
    if errors:
        raise IftErrors(errors)
    sources = [_load_source(i, src, per_source[i], eval_fixed[i]) for i, src in enumerate(data.sources)]
    for source in sources:
        _set_format(source, per_source, eval_fixed, library, data)
    report: dict[str, Any] = {"sources": {}, "splits": {s: {"rows": 0, "sources": {}} for s in SPLITS}}
    carve_report: dict[str, Any] = {}
    rendered: dict[str, dict[str, Any]] = {}
    assignments = [_assign(source) for source in sources]
    _check_stratify(data, sources, assignments)
    for source, templates, fixed, assigned in zip(sources, per_source, eval_fixed, assignments):
        errors = []
        for split, ds in assigned.items():  # a source's own splits may differ (SST-2's test has no label)
            if ds is not None:
                fixed_here = fixed is not None and split != "train"
                errors += _check_columns(source, [fixed] if fixed_here else templates, ds.column_names, split,
                                         "eval_template" if fixed_here else "templates")
        if errors:
            raise IftErrors(errors)
        splits = _carve(source, assigned, data, carve_report)
        rendered[source.name] = {}
        for split in SPLITS:
            use = [fixed] if (fixed is not None and split != "train") else templates
            ds, expected = _render(splits[split], source, split, use, data)
            rendered[source.name][split] = ds
            report["splits"][split]["sources"][source.name] = {
                "rows_in": len(splits[split]), "expected": expected,
                "rendered": {tpl: k for (_, tpl), k in _template_counts(ds).items()}}
        report["sources"][source.name] = {
            "path": source.cfg.path, "origin": source.origin, "columns": source.columns(),
            "format": source.format,
            "templates": [t.ref for t in templates], "eval_template": fixed.ref if fixed is not None else None,
            "template_mode": source.cfg.template_mode if templates else (
                "raw text" if source.format == "text" else "conversation"),
            **carve_report[source.name], **({"ignored_files": source.ignored_files} if source.ignored_files else {}),
        }
    leaks = _remove_leaks(rendered) if data.leak_check else {n: {"train": 0, "validation": 0} for n in rendered}
    report["leaks"] = {"checked": data.leak_check, "removed": leaks,
                       "train": sum(v["train"] for v in leaks.values()),
                       "validation": sum(v["validation"] for v in leaks.values())}
    _check_not_empty(rendered, report, sources)
    train, report["mixture"] = _mix({n: s["train"] for n, s in rendered.items()}, data)
    final = {"train": train}
    for split in ("validation", "test"):
        parts = [s[split] for s in rendered.values() if len(s[split])]
        final[split] = datasets.concatenate_datasets(parts) if len(parts) > 1 else (
            parts[0] if parts else rendered[sources[0].name][split])
    dd = datasets.DatasetDict({s: final[s].remove_columns("_pair") for s in SPLITS})
    _summarise(dd, report)
    return PreparedData(dd, report, _pin_carved(data, assignments, [s.format for s in sources]))


def _first_row(source: _Source) -> dict | None:
    ds = source.raw.get(source.cfg.splits.train or "") or next(iter(source.raw.values()), None)
    return ds[0] if ds is not None and len(ds) else None


def _set_format(source: _Source, per_source: list[list[Any]], eval_fixed: list[Any], library: Any,
                data: DataConfig) -> None:
    """Decide the source's format; alpaca rows get the shipped template unless the source names its own; every
    conversation is checked before any carving, so a bad row is named as its file numbers it."""
    i = source.index
    source.format = resolve_format(source.cfg, bool(per_source[i]), source.columns(), _first_row(source), source.key)
    if source.format == "alpaca" and not per_source[i]:
        per_source[i] = [library.get(ALPACA_TEMPLATE)]
        _check_source_values(source, per_source[i], eval_fixed[i])
    _check_conversations(source, data.system_prompt)


def _pin_carved(data: DataConfig, assignments: list[dict[str, Any | None]], formats: list[str]) -> DataConfig:
    sources = [src.model_copy(update={"splits": src.splits.model_copy(
                   update={split: None for split, ds in assigned.items() if ds is None}), "format": fmt})
               for src, assigned, fmt in zip(data.sources, assignments, formats)]
    return data.model_copy(update={"sources": sources})


def _check_not_empty(rendered: dict[str, dict[str, Any]], report: dict, sources: list[_Source]) -> None:
    for source in sources:
        for split in SPLITS:
            ds = rendered[source.name][split]
            info = report["splits"][split]["sources"][source.name]
            if len(ds) or (info["rows_in"] == 0 and split != "train" and _requested_zero(report, source, split)):
                continue
            why = (f"{info['rows_in']} rows before templating" if info["rows_in"] == 0 else
                   f"all {info['rows_in']} rows were skipped by the templates or removed as leaks")
            raise IftError(f"split '{split}' of source '{source.name}' is empty ({why})",
                           f"{source.key}", "check the templates apply to this data (`ift templates validate REF "
                           "--data PATH`), the split sizes, and the source's rows")


def _requested_zero(report: dict, source: _Source, split: str) -> bool:
    """validation_size/test_size 0 asks for no such split: empty is intended, not an error."""
    info = report["sources"][source.name]
    return split not in info["own"] and split not in info["carved"]


def _template_counts(ds: Any) -> Counter:
    table = _table(ds)
    if table is None:
        return Counter()
    return Counter(zip(table.column("source").to_pylist(), table.column("template").to_pylist()))


def _summarise(dd: Any, report: dict) -> None:
    """Per split and source: final rows and templates used, rows the templates skipped, leaks removed."""
    for split in SPLITS:
        entry = report["splits"][split]
        entry["rows"] = len(dd[split])
        final = _template_counts(dd[split])
        for name, info in entry["sources"].items():
            expected, rendered = info.pop("expected"), info.pop("rendered")
            used = {tpl or "(raw text)": k for (src, tpl), k in sorted(final.items()) if src == name}
            info["rows"] = sum(used.values())
            info["templates"] = used
            info["skipped"] = {tpl or "(raw text)": e - rendered.get(tpl, 0)
                               for tpl, e in expected.items() if e - rendered.get(tpl, 0)}
            info["leaks_removed"] = report["leaks"]["removed"][name].get(split, 0)


# ------------------------------------------------------------------------------------- check_sources


def check_sources(data: DataConfig, library: Any) -> list[IftError]:
    """Checks for `ift validate`, every problem at once: template refs; local data read as training reads it
    (the same errors); Hub datasets by their metadata only (reachable, splits, columns); named splits; that
    the columns the templates read exist in each split used."""
    per_source, eval_fixed, errors = _resolve_templates(data, library)
    stratify_seen: list[tuple[str, list[str]]] = []
    for i, src in enumerate(data.sources):
        key = f"data.sources.{i}"
        try:
            by_split = _peek(i, src, per_source[i], eval_fixed[i])
        except IftError as err:
            errors.append(err)
            continue
        if by_split is None:
            continue  # a Hub dataset whose columns we cannot see without downloading it
        probe = _Source(i, src, source_name(src), {}, "")
        every = sorted({c for cols in by_split.values() for c in cols})
        errors += [IftError(f"column '{old}' to rename is not in the source", f"{key}.columns",
                            f"columns are: {', '.join(every)}") for old in src.columns if old not in every]
        try:
            probe.format = _validated_format(i, src, per_source, eval_fixed, library, data,
                                             [src.columns.get(c, c) for c in every])
        except IftError as err:
            errors.append(err)
            continue
        explicit = _explicit_splits(src)
        for ours in SPLITS:
            theirs = getattr(src.splits, ours)
            if theirs is None:
                continue
            if theirs not in by_split:
                if ours in explicit or ours == "train":
                    errors.append(IftError(f"split '{theirs}' is not in source '{probe.name}' (it has: "
                                           f"{', '.join(by_split)})", f"{key}.splits.{ours}",
                                           "name one of its splits, or null to carve it from train"))
                continue
            renamed = [src.columns.get(c, c) for c in by_split[theirs]]
            if ours == "train" and data.stratify_by:
                stratify_seen.append((probe.name, renamed))
            fixed_here = eval_fixed[i] is not None and ours != "train"
            if (src.eval_template and ours != "train" and not fixed_here) or (src.templates and not per_source[i]):
                continue  # its template refs did not resolve (reported): no templates is not raw text here
            errors += _check_columns(probe, [eval_fixed[i]] if fixed_here else per_source[i], renamed, ours,
                                     "eval_template" if fixed_here else "templates")
    if stratify_seen and not any(data.stratify_by in cols for _, cols in stratify_seen):
        name, columns = stratify_seen[0]
        errors.append(IftError(f"stratify column '{data.stratify_by}' is not in source '{name}'", "data.stratify_by",
                               f"columns are: {', '.join(columns)}"))
    unique: dict[str, IftError] = {}
    for err in errors:  # a template checked against several splits fails the same way once
        unique.setdefault(err.line(), err)
    return list(unique.values())


def _validated_format(i: int, src: SourceConfig, per_source: list[list[Any]], eval_fixed: list[Any], library: Any,
                      data: DataConfig, columns: list[str]) -> str:
    """`ift validate`'s view of a source's format; a local conversational source has every row checked, as
    training checks them."""
    if src.format in ("auto", "messages", "sharegpt", "prompt_completion", "alpaca") and _looks_local(src.path) \
            and not (src.templates and src.format == "auto"):
        source = _load_source(i, src, per_source[i], eval_fixed[i])
        _set_format(source, per_source, eval_fixed, library, data)
        return source.format
    fmt = resolve_format(src, bool(per_source[i]) or bool(src.templates), columns, None, f"data.sources.{i}")
    if fmt == "alpaca" and not per_source[i]:
        per_source[i] = [library.get(ALPACA_TEMPLATE)]
    return fmt


def _peek(index: int, src: SourceConfig, templates: Sequence[Any], fixed: Any | None) -> dict[str, list[str]] | None:
    """{split: columns (before renames)}: local data read with the training loader (its errors, its cache);
    a Hub dataset from its metadata (None when only a download could say)."""
    key = f"data.sources.{index}"
    if not _looks_local(src.path):
        from huggingface_hub import constants

        if not constants.HF_HUB_OFFLINE and not hub_reachable():
            raise _hub_error(src, key)
        return _peek_hub(src, key)
    source = _load_source(index, src, templates, fixed, rename=False)
    return {split: list(ds.column_names) for split, ds in source.raw.items()}


def _peek_hub(src: SourceConfig, key: str) -> dict[str, list[str]] | None:
    import datasets

    try:
        builder = datasets.load_dataset_builder(src.path, name=src.config, revision=src.revision)
    except ConnectionError:
        raise _hub_error(src, key) from None
    except Exception as err:  # noqa: BLE001
        raise IftError(f"cannot find Hub dataset '{src.path}': {str(err)[:300]}", f"{key}.path",
                       "check the dataset id, config and revision; or use a local path") from None
    features, splits = builder.info.features, builder.info.splits
    if not features or not splits:
        return None
    return {s: list(features) for s in splits}


def load_preview_rows(source: str, split: str = "train", n: int | None = None,
                      columns: Sequence[str] = ()) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (dicts) and column names of one split of a local file/folder or a Hub dataset `id[:config]`, read
    as training reads a source (the same errors, `--data` named as where); `columns`: those a template reads,
    checked in every row as training checks them. `n`: the first n rows (0 or None: all). For
    `ift templates preview|validate --data`."""
    import datasets
    from ift.templates.library import MAX_SIZE

    key = "--data"
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a preview prints rows, not progress bars
    try:
        if _looks_local(source):
            loaded, _, _, files = _load_local(SourceConfig(path=source), key)
        else:
            name, _, config = source.partition(":")
            loaded, files = _load_hub(SourceConfig(path=name, config=config or None), key, split), {}
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    if Path(source).expanduser().is_file():
        chosen = next(iter(loaded))  # a single file has no splits: it is the one
    else:
        chosen = SPLIT_ALIASES.get(split.lower(), split) if split not in loaded else split
        if chosen not in loaded:
            raise IftError(f"split '{split}' is not in {source} (it has: {', '.join(loaded)})", "--split",
                           f"choose --split among: {', '.join(loaded)}")
    ds = loaded[chosen]
    split_files = files.get(chosen, [])
    where = f"{key}: {split_files[0]}" if len(split_files) == 1 else f"{key}: split '{chosen}' of {source}"
    _check_values(ds, [c for c in columns if c in ds.column_names], where, MAX_SIZE)
    if n:
        ds = ds.select(range(min(n, len(ds))))
    return ds.to_list(), list(ds.column_names)


# ------------------------------------------------------------------------------------- tokenization


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
    return _fingerprint(type(tokenizer).__name__, body, special, getattr(tokenizer, "chat_template", None),
                        getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None))


def _cut(ids: list[int], budget: int, side: str, keep_head: int, keep_tail: int) -> list[int]:
    """The prompt cut to `budget` tokens from `side` of its content, keeping its first `keep_head` and
    last `keep_tail` tokens in place (BOS; EOS; a chat template's header and assistant tag)."""
    head, tail = ids[:keep_head], ids[len(ids) - keep_tail:] if keep_tail else []
    body = ids[keep_head: len(ids) - keep_tail]
    room = budget - len(head) - len(tail)
    if room <= 0:
        return ids[len(ids) - budget:] if side == "left" else ids[:budget]
    body = body[len(body) - room:] if side == "left" else body[:room]
    return head + body + tail


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class _Encoder:
    """datasets.map function (arrow format): rendered rows -> input_ids, attention_mask, labels, length.

    Each output example is (head, tail): head = tokens without loss (the prompt), tail = tokens with
    loss (the completion). Token columns are built as flat numpy arrays + offsets (converting nested
    Python lists to Arrow costs more than the tokenizer's own Python overhead).
    """

    def __init__(self, tokenizer: Any, kind: str, data: DataConfig):
        self.tokenizer, self.kind = tokenizer, kind
        self.max_length, self.mode = data.max_length, data.truncation
        self.train_on_prompt, self.chat = data.train_on_prompt, data.wraps_pairs
        self.train_on, self.template_spec = data.train_on, data.chat_template
        self.end_of_turn = end_of_turn_token(tokenizer)
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        # a chat-wrapped prompt with no content: its head (system turn, user tag) and tail (end of turn,
        # assistant tag) stay when a long prompt is cut, so the model still sees a well-formed chat
        self.frame = encode_pairs(tokenizer, kind, [""], [""], chat_template=True, add_eos=False)[0][0] \
            if self.chat and kind == "causal" else []

    def __call__(self, table: pa.Table) -> pa.Table:
        prompts = table.column("prompt").to_pylist()
        completions = table.column("completion").to_pylist()
        raw = [t == "" for t in table.column("template").to_pylist()]
        convs = self._conversations(table)
        pairs = self._encode(prompts, completions, [r and not convs.get(i) for i, r in enumerate(raw)], set(convs))
        rows, heads, tails, status, override, labels = [], [], [], [], {}, {}
        for i, (p, c) in enumerate(pairs):
            if i in convs:
                encoded = convs[i]
                if encoded is not None:  # None: the final prompt alone fills max_length (dropped, counted)
                    labels[len(rows)] = encoded.labels
                    rows.append(i)
                    heads.append([])
                    tails.append(encoded.input_ids)
                    status.append(REPLY_CUT if encoded.cut_tokens else TURNS_DROPPED if encoded.dropped_messages
                                  else INTACT)
                continue
            for head, tail, code in (self._raw(p, c) if raw[i] else self._pair(p, c)):
                if code in (FIRST_WINDOW, LATER_WINDOW):
                    override[len(rows)] = self.tokenizer.decode(tail, skip_special_tokens=True)
                rows.append(i)
                heads.append(head)
                tails.append(tail)
                status.append(code)
        out = table.take(pa.array(rows, type=pa.int64()))
        if override:
            comp = out.column("completion").to_pylist()
            for j, text in override.items():
                comp[j] = text
            out = out.set_column(out.schema.get_field_index("completion"), "completion", pa.array(comp, pa.string()))
        return self._columns(out, heads, tails, status, labels)

    def _conversations(self, table: pa.Table) -> dict[int, Any]:
        """Row -> its EncodedConversation (None when dropped), for the rows that are conversations."""
        if "messages" not in table.column_names:
            return {}
        import pyarrow.compute as pc

        lengths = pc.list_value_length(table.column("messages")).fill_null(0).to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(lengths > 0)
        if not len(idx):
            return {}
        if self.kind == "seq2seq":
            raise IftError("conversational sources train a decoder-only model in a chat template; a seq2seq model "
                           "has none", "data.sources", "use a causal model, or give the source templates")
        if self.template_spec == "none" or not getattr(self.tokenizer, "chat_template", None):
            raise IftError("conversations need a chat template, but " + (
                "data.chat_template is none" if self.template_spec == "none" else "the tokenizer has none"),
                "data.chat_template", "set data.chat_template: chatml or llama3 (their tokens are added to the "
                "tokenizer), or a .jinja file")
        messages = table.column("messages").take(pa.array(idx)).to_pylist()
        sources = table.column("source").take(pa.array(idx)).to_pylist()
        limit = None if self.mode == "drop" else self.max_length  # drop: an over-long conversation leaves whole
        encoded = encode_conversations(self.tokenizer, messages, train_on=self.train_on, max_length=limit,
                                       end_of_turn=self.end_of_turn, sources=[f"source '{s}'" for s in sources],
                                       drop_overlong=True)
        return {int(i): None if e is not None and len(e.input_ids) > self.max_length else e
                for i, e in zip(idx, encoded)}

    def _encode(self, prompts: list[str], completions: list[str], raw: list[bool],
                skip: set[int] = frozenset()) -> list[tuple[list[int], list[int]]]:
        pairs: list[Any] = [([], [])] * len(prompts)
        for is_raw in (False, True):
            idx = [i for i, r in enumerate(raw) if r == is_raw and i not in skip]
            if not idx:
                continue
            if is_raw and self.kind == "seq2seq":
                raise IftError("raw-text sources (no templates) train a causal model on the text itself; "
                               "a seq2seq model needs prompt/target pairs", "data.sources",
                               "give the source templates, or use a causal model")
            encoded = encode_pairs(self.tokenizer, self.kind, [prompts[i] for i in idx],
                                   [completions[i] for i in idx], chat_template=self.chat and not is_raw)
            for i, pair in zip(idx, encoded):
                pairs[i] = pair
        return pairs

    def _columns(self, out: pa.Table, heads: list[list[int]], tails: list[list[int]], status: list[int],
                 explicit: dict[int, list[int]] | None = None) -> pa.Table:
        """explicit: output row -> its labels, for conversations (loss on every assistant reply, not one tail)."""
        h = np.fromiter(map(len, heads), dtype=np.int64, count=len(heads))
        t = np.fromiter(map(len, tails), dtype=np.int64, count=len(tails))
        if self.kind == "seq2seq":
            ids, ids_off = _flat(heads, h), _offsets(h)
            labels, lab_off = _flat(tails, t), _offsets(t)
            length = h + t
        else:
            ids = _flat([x for pair in zip(heads, tails) for x in pair], np.stack([h, t], 1).ravel())
            ids_off = lab_off = _offsets(h + t)
            labels = ids.copy()
            if not self.train_on_prompt:  # -100 on each row's first len(head) positions
                starts = np.repeat(ids_off[:-1], h + t)
                within = np.arange(len(ids), dtype=np.int64) - starts
                labels[within < np.repeat(h, h + t)] = IGNORE
            for j, lab in (explicit or {}).items():
                labels[ids_off[j]:ids_off[j + 1]] = lab
            length = h + t
        mask = np.ones(len(ids), dtype=np.int8)
        return (out.append_column("input_ids", pa.ListArray.from_arrays(pa.array(ids_off), pa.array(ids)))
                .append_column("attention_mask", pa.ListArray.from_arrays(pa.array(ids_off), pa.array(mask)))
                .append_column("labels", pa.ListArray.from_arrays(pa.array(lab_off), pa.array(labels)))
                .append_column("length", pa.array(length.astype(np.int32)))
                .append_column("truncated", pa.array(np.asarray(status, dtype=np.int8))))

    def _pair(self, p: list[int], c: list[int]) -> list[tuple[list[int], list[int], int]]:
        """Fit a pair into max_length by cutting the prompt (or dropping the row): never the target."""
        limit = self.max_length
        if self.kind == "seq2seq":
            if len(c) > limit:
                return []  # the target cannot be cut: drop
            if len(p) <= limit:
                return [(p, c, INTACT)]
            if self.mode == "drop":
                return []
            return [(_cut(p, limit, self.mode, 0, int(bool(p) and p[-1] == self.eos)), c, PROMPT_CUT)]
        if len(p) + len(c) <= limit:
            return [(p, c, INTACT)]
        budget = limit - len(c)
        if self.mode == "drop" or budget < 1:
            return []  # drop rather than cut the target
        return [(_cut(p, budget, self.mode, *self._frame(p)), c, PROMPT_CUT)]

    def _frame(self, p: list[int]) -> tuple[int, int]:
        """How many leading and trailing prompt tokens are template, not content (kept when cutting)."""
        if not self.frame:
            return int(self.bos is not None and bool(p) and p[0] == self.bos), 0
        head = _common_prefix(p, self.frame)
        tail = _common_prefix(p[::-1], self.frame[::-1])
        return head, min(tail, len(self.frame) - head, len(p) - head)

    def _raw(self, p: list[int], c: list[int]) -> list[tuple[list[int], list[int], int]]:
        """Raw text: loss on every token; text longer than max_length is split into windows, not cut."""
        limit = self.max_length
        if len(p) + len(c) <= limit:
            return [(p, c, INTACT)]
        tokens = p + c
        windows = []
        for n, start in enumerate(range(0, len(tokens), limit)):
            piece = tokens[start:start + limit]
            if len(piece) < 2:
                continue  # a 1-token window predicts nothing
            head = piece[:max(len(p) - start, 0)]  # leading BOS of the first window: no loss, as unsplit
            windows.append((head, piece[len(head):], FIRST_WINDOW if n == 0 else LATER_WINDOW))
        return windows


def _flat(seqs: list[list[int]], lengths: np.ndarray) -> np.ndarray:
    return np.fromiter(chain.from_iterable(seqs), dtype=np.int32, count=int(lengths.sum()))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    return out


def _tokenized_features(features: Any) -> Any:
    import datasets

    extra = {"input_ids": datasets.List(datasets.Value("int32")), "attention_mask": datasets.List(datasets.Value("int8")),
             "labels": datasets.List(datasets.Value("int32")), "length": datasets.Value("int32"),
             "truncated": datasets.Value("int8")}
    return datasets.Features({**{k: v for k, v in features.items() if k not in extra}, **extra})


def tokenize(splits: Any, tokenizer: Any, kind: str, data: DataConfig) -> tuple[Any, dict]:
    """Token ids and loss labels for every split (cached by fingerprint); report of what was cut or dropped."""
    import datasets

    if kind not in ("causal", "seq2seq"):
        raise IftError(f"unknown model kind '{kind}'", "model.kind", "use causal or seq2seq")
    if data.wraps_pairs and kind == "causal" and not getattr(tokenizer, "chat_template", None):
        raise IftError(f"data.chat_template is {data.chat_template} but the tokenizer has no chat template",
                       "data.chat_template", "set data.chat_template: auto (or none), a named template (chatml, "
                       "llama3), or use an instruct model whose tokenizer has one")
    tok_fp = tokenizer_fingerprint(tokenizer)
    settings = (kind, data.max_length, data.truncation, data.train_on_prompt, data.chat_template, data.train_on)
    out, report = {}, {"settings": {"kind": kind, "max_length": data.max_length, "truncation": data.truncation,
                                    "train_on_prompt": data.train_on_prompt, "chat_template": data.chat_template,
                                    "train_on": data.train_on, "end_of_turn": end_of_turn_token(tokenizer)}}
    encoder = _Encoder(tokenizer, kind, data)
    for split, ds in splits.items():
        fp = _fingerprint("tokenize", ds._fingerprint, tok_fp, settings, CODE_VERSION)
        num_proc = data.num_proc if data.num_proc > 1 and len(ds) >= 2 * BATCH else None
        features = _tokenized_features(ds.features)
        if not len(ds):  # datasets would return an empty dataset without the token columns
            out[split] = datasets.Dataset.from_dict({k: [] for k in features}, features=features)
            report[split] = token_report(ds, out[split])
            continue
        mapped = ds.with_format("arrow").map(
            encoder, batched=True, batch_size=BATCH, remove_columns=ds.column_names,
            features=features, new_fingerprint=fp, num_proc=num_proc,
            cache_file_name=_cache_file("tokenize", fp), desc=f"tokenizing {split}")
        out[split] = mapped.with_format(None)
        report[split] = token_report(ds, out[split])
        if not len(out[split]):
            raise IftError(f"split '{split}' ends up empty: all {len(ds)} rows are longer than data.max_length "
                           f"({data.max_length} tokens) and were dropped", "data.max_length",
                           "raise data.max_length, or set data.truncation: left (or right) so long prompts are cut "
                           "instead (targets are never cut)")
    if "train" in report:
        train = report["train"]["sources"]
        total = max(sum(v["tokens"] for v in train.values()), 1)
        report["mixture_tokens"] = {n: {"tokens": v["tokens"], "token_share": round(v["tokens"] / total, 4)}
                                    for n, v in train.items()}
    return datasets.DatasetDict(out), report


def _table(ds: Any) -> pa.Table | None:
    return ds.with_format("arrow")[:] if len(ds) else None


def _loss_counts(labels: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = labels.combine_chunks() if isinstance(labels, pa.ChunkedArray) else labels
    offsets = arr.offsets.to_numpy()
    values = arr.flatten().to_numpy()
    carries = np.concatenate([[0], np.cumsum(values != IGNORE)])
    return carries[offsets[1:] - offsets[0]] - carries[offsets[:-1] - offsets[0]]


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    q = np.percentile(values, [50, 90, 95, 99])
    return {"p50": float(q[0]), "p90": float(q[1]), "p95": float(q[2]), "p99": float(q[3]),
            "max": int(values.max()), "mean": round(float(values.mean()), 1)}


def token_report(before: Any, after: Any) -> dict:
    """Rows, tokens, loss tokens, length percentiles, truncated and dropped rows: per split and source."""
    t_in, t_out = _table(before), _table(after)
    src_in = Counter(t_in.column("source").to_pylist()) if t_in is not None else Counter()
    entry: dict[str, Any] = {"rows_in": len(before), "rows": len(after), "sources": {}}
    if t_out is None:  # nothing left (or nothing given)
        sources, length = np.array([], dtype=object), np.array([], dtype=np.int64)
        status, loss = np.array([], dtype=np.int8), np.array([], dtype=np.int64)
    else:
        sources = np.array(t_out.column("source").to_pylist(), dtype=object)
        length = t_out.column("length").to_numpy()
        status = t_out.column("truncated").to_numpy()
        loss = _loss_counts(t_out.column("labels"))
    entry.update(_counts(length, status, loss, len(before)))
    entry["length"] = _percentiles(length)
    for name in sorted(set(src_in) | set(sources.tolist())):
        m = sources == name
        entry["sources"][name] = {**_counts(length[m], status[m], loss[m], src_in.get(name, 0)),
                                  "rows": int(m.sum()), "length": _percentiles(length[m])}
    return entry


def _counts(length: np.ndarray, status: np.ndarray, loss: np.ndarray, rows_in: int) -> dict[str, int]:
    originals = int((status != LATER_WINDOW).sum())
    out = {"tokens": int(length.sum()), "loss_tokens": int(loss.sum()), "truncated": int((status == PROMPT_CUT).sum()),
           "split_into_windows": int((status == FIRST_WINDOW).sum()),
           "windows": int(((status == FIRST_WINDOW) | (status == LATER_WINDOW)).sum()), "dropped": rows_in - originals}
    dropped_turns, reply_cut = int((status == TURNS_DROPPED).sum()), int((status == REPLY_CUT).sum())
    if dropped_turns or reply_cut:  # conversations: earliest exchanges dropped / the last reply's tail cut
        out.update(turns_dropped=dropped_turns, reply_cut=reply_cut)
    return out


# ------------------------------------------------------------------------------------- stats


def label_distribution(ds: Any) -> dict[str, dict[str, int]]:
    """Per source: how often each completion occurs among rows that have answer choices."""
    table = _table(ds)
    if table is None:
        return {}
    import pyarrow.compute as pc

    has_choices = pc.greater(pc.list_value_length(table.column("choices")), 0)
    rows = table.filter(has_choices).select(["source", "completion"])
    if not rows.num_rows:
        return {}
    counts = rows.group_by(["source", "completion"]).aggregate([([], "count_all")]).to_pylist()
    out: dict[str, dict[str, int]] = {}
    for r in sorted(counts, key=lambda r: (r["source"], -r["count_all"], r["completion"])):
        out.setdefault(r["source"], {})[r["completion"]] = r["count_all"]
    return out


def conversation_stats(ds: Any) -> dict[str, dict[str, Any]]:
    """Per source with conversations: how many, turns per conversation (percentiles), assistant turns."""
    table = _table(ds)
    if table is None or "messages" not in table.column_names:
        return {}
    import pyarrow.compute as pc

    turns = pc.list_value_length(table.column("messages")).fill_null(0).to_numpy(zero_copy_only=False)
    sources = np.array(table.column("source").to_pylist(), dtype=object)
    out = {}
    for name in sorted(set(sources[turns > 0].tolist())):
        m = (sources == name) & (turns > 0)
        roles = pc.struct_field(pc.list_flatten(table.column("messages").filter(pa.array(m))), "role")
        out[name] = {"conversations": int(m.sum()), "turns": _percentiles(turns[m]),
                     "assistant_turns": int(pc.sum(pc.equal(roles, "assistant")).as_py() or 0)}
    return out


def describe(prepared: PreparedData, tokens: Any | None = None, token_report_: dict | None = None) -> dict:
    """Everything `ift data stats` shows, JSON-able: splits, sources, labels, tokens, leaks, mixture."""
    out = {"splits": {}, "sources": prepared.report.get("sources", {}), "leaks": prepared.report.get("leaks", {}),
           "mixture": dict(prepared.report.get("mixture", {}))}
    for split in SPLITS:
        base = prepared.report["splits"][split]
        entry = {"rows": base["rows"], "sources": {}}
        labels = label_distribution(prepared.splits[split])
        conversations = conversation_stats(prepared.splits[split])
        tok = (token_report_ or {}).get(split, {})
        for name, info in base["sources"].items():
            src = {k: info[k] for k in ("rows", "templates", "skipped", "leaks_removed") if k in info}
            if name in labels:
                src["labels"] = labels[name]
            if tok:
                src["tokens"] = tok["sources"].get(name, {})
            if name in conversations:  # assistant tokens: the loss-carrying tokens of a conversational source
                src["conversation"] = {**conversations[name],
                                       "assistant_tokens": src.get("tokens", {}).get("loss_tokens")}
            entry["sources"][name] = src
        if tok:
            entry["tokens"] = {k: v for k, v in tok.items() if k != "sources"}
        out["splits"][split] = entry
    if token_report_ and "mixture_tokens" in token_report_:
        for name, v in token_report_["mixture_tokens"].items():
            out["mixture"]["sources"][name].update(v)
        out["tokenization"] = token_report_.get("settings", {})
    return out


def preview_rows(ds: Any, tokenizer: Any, kind: str, data: DataConfig, n: int = 5, seed: int = 0) -> list[dict]:
    """`n` rows drawn (seeded) from a templated split, with their token ids and loss labels.

    Tokenized directly (no cache files): what `tokenize` would produce for these rows.
    """
    if not len(ds):
        return []
    picks = np.random.default_rng(seed).choice(len(ds), size=min(n, len(ds)), replace=False)
    table = ds.with_format("arrow")[:].take(pa.array(picks))
    encoded = _Encoder(tokenizer, kind, data)(table)
    return encoded.to_pylist()
