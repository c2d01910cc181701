"""Sources: local files/folders and Hub datasets loaded into their own splits, their values and format checked."""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import pyarrow as pa

from ift.data.cache import BATCH, source_name
from ift.data.formats import (FORMATS as CONVERSATION_FORMATS, DEFAULT_COLUMNS, TOOLS_COLUMN, conversation_tools,
                              detect_format, normalize_row)
from ift.data.reading import first_line, path_key, read_split
from ift.errors import IftError
from ift.locations import connection_errors, looks_local
from ift.recipe import SPLITS, SourceConfig

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}


@dataclass
class LoadedSource:
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


def is_url(path: str) -> bool:
    """A data file published on the web (e.g. a file of a GitHub repository at a commit), read by datasets."""
    return path.startswith(("https://", "http://"))


def is_local_source(path: str) -> bool:
    """A path we should find on disk (so a missing one is a missing file, not a Hub id); for data also
    `folder/name` when `folder` is here (a data folder's file named without its suffix)."""
    if is_url(path):
        return False
    head, sep, _ = path.partition("/")
    return looks_local(path, FORMATS) or (bool(sep) and Path(head).is_dir())


def _split_of(file: Path) -> str | None:
    """Which split a file holds, from its name: train.jsonl, dev.csv, test-00000-of-00001.parquet ..."""
    stem = file.name.split(".")[0].lower()
    for sep in ("-", "_"):
        stem = stem.split(sep)[0] if stem.split(sep)[0] in SPLIT_ALIASES else stem
    return SPLIT_ALIASES.get(stem)


def _folder_files(folder: Path, key: str) -> tuple[str, dict[str, list[str]], list[str]]:
    """(builder, {split: files}, ignored files) for a folder of data files."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in FORMATS)
    if not files:
        others = sorted(f.name for f in folder.iterdir() if not f.name.startswith("."))[:8]
        raise IftError(f"no data files in folder {folder}", path_key(key),
                       f"put .jsonl/.json/.csv/.parquet/.txt files there (found: {', '.join(others) or 'nothing'}), "
                       "or point to a folder written by Dataset.save_to_disk")
    builders = {FORMATS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise IftError(f"folder {folder} mixes formats ({', '.join(sorted(builders))})", path_key(key),
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
        raise IftError(f"data file or folder not found: {src.path}", path_key(key),
                       f"check the path (relative paths start from {Path.cwd()}), or give a Hub dataset id")
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - any failure to read a saved dataset is the user's folder
            raise IftError(f"cannot read save_to_disk folder {src.path}: {type(err).__name__}: {first_line(err)}",
                           path_key(key), "re-save it with Dataset.save_to_disk / DatasetDict.save_to_disk"
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
            raise IftError(f"unknown data format '{path.suffix or path.name}'", path_key(key),
                           "use .jsonl, .json, .csv, .parquet or .txt files, or a Dataset.save_to_disk folder")
        data_files, ignored, origin = {"train": [str(path)]}, [], "file"
    # one split at a time: splits may have different columns (DialogSum's test has summary1..3)
    loaded = {split: read_split(builder, split, files, key) for split, files in data_files.items()}
    return datasets.DatasetDict(loaded), origin, ignored, data_files


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


def check_source_values(source: LoadedSource, templates: Sequence[Any], fixed: Any | None) -> None:
    """The values the templates (or the raw-text column) read, in every split the recipe uses."""
    from ift.templates.sandbox import MAX_SIZE

    inverse = {new: old for old, new in source.cfg.columns.items()}
    for ours, ds, where in _splits_read(source):
        use = [fixed] if fixed is not None and ours != "train" else list(templates)
        columns = {inverse.get(v, v) for t in use for v in t.variables()} if use else {source.cfg.text_column}
        _check_values(ds, columns, where, MAX_SIZE if use else None)


def _splits_read(source: LoadedSource) -> Iterator[tuple[str, Any, str]]:
    """(our split, the source's dataset, where: its file or split) for each of its splits the recipe reads, once."""
    seen = set()
    for ours in SPLITS:
        theirs = getattr(source.cfg.splits, ours)
        if theirs is None or theirs not in source.raw or theirs in seen:
            continue
        seen.add(theirs)
        files = source.files.get(theirs, [])
        where = f"{path_key(source.key)}: {files[0]}" if len(files) == 1 else \
            f"{path_key(source.key)}: split '{theirs}' of {source.cfg.path}"
        yield ours, source.raw[theirs], where


# ------------------------------------------------------------------------------------- formats


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
    candidates = [f for f in CONVERSATION_FORMATS if detect_format({*format_columns(f)})]
    raise IftError(f"cannot tell what the rows of source '{source_name(cfg)}' are (columns: "
                   f"{', '.join(sorted(cols)) or 'none'})", f"{key}.format",
                   "give it templates, or set format: " + ", ".join(["text", *candidates])
                   + f" (text reads column '{cfg.text_column}'; rename columns with {key}.columns)")


def format_columns(fmt: str, cfg: SourceConfig | None = None) -> list[str]:
    """The columns a conversational format reads."""
    if fmt in DEFAULT_COLUMNS:
        return [(cfg.conversation_column if cfg else None) or DEFAULT_COLUMNS[fmt]]
    return {"prompt_completion": ["prompt", "completion"], "alpaca": ["instruction", "output"]}.get(fmt, [])


def normalize_source_row(cfg: SourceConfig, fmt: str, row: dict, where: str, index: int,
               system_prompt: str | None) -> list[dict[str, str]]:
    return normalize_row(row, fmt, source=where, index=index, column=cfg.conversation_column,
                         system_prompt=system_prompt)


def check_conversations(source: LoadedSource, system_prompt: str | None) -> None:
    """Every row of every split the recipe reads is a conversation there is something to learn from: the first
    that is not is an error naming the file (or split) and the row as the file numbers it, before any carving."""
    if source.format not in ("messages", "sharegpt", "prompt_completion"):
        return
    for _, ds, where in _splits_read(source):
        wanted = [c for c in format_columns(source.format, source.cfg) if c in ds.column_names]
        if len(wanted) < len(format_columns(source.format, source.cfg)):
            continue  # reported by _check_columns, with the columns there are
        if TOOLS_COLUMN in ds.column_names:
            wanted.append(TOOLS_COLUMN)
        table = ds.with_format("arrow").select_columns(wanted) if len(ds) else None
        for start in range(0, len(ds), BATCH):
            rows = table[start:start + BATCH].to_pylist()
            for k, row in enumerate(rows):
                normalize_source_row(source.cfg, source.format, row, where, start + k, system_prompt)
                conversation_tools(row, source=where, index=start + k, default=source.cfg.tools)


# ------------------------------------------------------------------------------------- loading


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a connection to the Hub? (A quick probe: datasets itself retries for ~25 s.)"""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE and reachable(constants.ENDPOINT, timeout)


def reachable(address: str, timeout: float = 3.0) -> bool:
    """Can we open a connection to the host of `address` (a URL)?"""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; let datasets try
    url = urlparse(address)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _subset(src: SourceConfig) -> str:
    parts = [f"{k} '{v}'" for k, v in (("config", src.config), ("data_dir", src.data_dir)) if v]
    return f" ({', '.join(parts)})" if parts else ""


def _hub_error(src: SourceConfig, key: str, detail: str = "") -> IftError:
    return IftError(
        f"the Hugging Face Hub is not reachable, so dataset '{src.path}'{_subset(src)} cannot be loaded{detail}",
        path_key(key),
        "check your network (or set HF_HUB_OFFLINE=1 to use a copy already in the datasets cache); or read a copy "
        "on disk: a data map (data.data_map=FILE, docs/data.md), or the source's path set to a local "
        ".jsonl/.csv/.parquet file or save_to_disk folder",
    )


def _load_hub(src: SourceConfig, key: str, split: str | None = None) -> Any:
    """The Hub dataset's splits (only `split` when given) as a DatasetDict."""
    import datasets
    from huggingface_hub import constants

    if is_url(src.path):
        return _load_url(src, key, split)
    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        raise _hub_error(src, key)
    try:
        loaded = datasets.load_dataset(src.path, name=src.config, data_dir=src.data_dir, revision=src.revision,
                                       split=split)
    except connection_errors() as err:
        raise _hub_error(src, key, f" ({first_line(err, 200)})") from None
    except Exception as err:  # noqa: BLE001 - not found, bad config, gated ...
        raise IftError(f"cannot load Hub dataset '{src.path}'" + _subset(src) + f": {first_line(err)}",
                       path_key(key), "check the dataset id, its config (data.sources.N.config, or --data ID:CONFIG),"
                       " revision and split; or use a local path") from None
    return datasets.DatasetDict({split: loaded}) if split is not None else loaded


def _load_url(src: SourceConfig, key: str, split: str | None = None) -> Any:
    """A data file on the web as the source's train split (datasets downloads and caches it)."""
    import datasets

    builder = FORMATS.get(Path(urlparse(src.path).path).suffix.lower())
    if builder is None:
        raise IftError(f"unknown data format of {src.path}", path_key(key),
                       f"point at a {', '.join(sorted(FORMATS))} file")
    offline = ("read a local copy: a data map (data.data_map=FILE, docs/data.md), or the source's path set to the "
               "downloaded file")
    if not reachable(src.path):
        raise IftError(f"{urlparse(src.path).hostname} is not reachable, so the data file {src.path} cannot be "
                       "downloaded", path_key(key), offline)
    try:
        loaded = datasets.load_dataset(builder, data_files={"train": src.path}, split=split)
    except Exception as err:  # noqa: BLE001 - not found, moved, not the format it says
        raise IftError(f"cannot read {src.path}: {first_line(err)}", path_key(key), offline) from None
    return datasets.DatasetDict({split: loaded}) if split is not None else loaded


def load_source(index: int, src: SourceConfig, templates: Sequence[Any] = (), fixed: Any | None = None,
                 rename: bool = True) -> LoadedSource:
    """Load a source's own splits, check the values its templates read, rename its columns."""
    key = f"data.sources.{index}"
    files: dict[str, list[str]] = {}
    if is_local_source(src.path):
        loaded, origin, ignored, files = _load_local(src, key)
    else:
        loaded, origin, ignored = _load_hub(src, key), "hub", []
    raw = dict(loaded.items())
    source = LoadedSource(index, src, source_name(src), raw, origin, ignored, files)
    _name_labels(source)
    check_source_values(source, templates, fixed)
    if rename:
        _rename(source)
    return source


def _name_labels(source: LoadedSource) -> None:
    """The source's `labels`: each listed column's label ids (or names) become the names, in every split."""
    for column, names in source.cfg.labels.items():
        if not any(column in ds.column_names for ds in source.raw.values()):
            raise IftError(f"column '{column}' given label names is not in the source", f"{source.key}.labels",
                           f"name one of its columns as the source serves it (before renames): "
                           f"{', '.join(source.columns())}")
        for split, ds in source.raw.items():
            if column in ds.column_names:
                source.raw[split] = _named(ds, column, names, f"{source.key}.labels.{column}", split)


def _named(ds: Any, column: str, names: list[str], key: str, split: str) -> Any:
    """`column` of one split as label names: id i -> names[i], a name kept, -1 or null -> null."""
    import datasets
    import pyarrow.compute as pc

    data = ds.with_format("arrow")[column]
    values = [v for v in pc.unique(data).to_pylist() if v is not None]
    if pa.types.is_string(data.type) or pa.types.is_large_string(data.type):
        bad = next((v for v in values if v not in names), None)
        if bad is None:
            return ds  # already the names
    elif pa.types.is_integer(data.type):
        bad = next((v for v in values if not -1 <= v < len(names)), None)
    else:
        raise IftError(f"column '{column}' holds {data.type} values, not label ids or names", key,
                       "give labels only for a column of whole-number ids or of label names")
    if bad is not None:
        row = pc.index(data, pa.scalar(bad, data.type)).as_py()
        raise IftError(f"value {bad!r} of column '{column}' is not one of its {len(names)} labels",
                       f"{key}, split '{split}', row {row}", "list every label name, in the order of the ids "
                       f"(now ids 0 to {len(names) - 1} name {', '.join(names)})")
    lookup: dict[Any, str | None] = {**dict(enumerate(names)), **{n: n for n in names}, -1: None}
    features = ds.features.copy()
    features[column] = datasets.Value("string")
    fingerprint = hashlib.blake2b(repr(("labels", ds._fingerprint, column, names)).encode(), digest_size=16)
    return ds.map(lambda batch: {column: [None if v is None else lookup[v] for v in batch[column]]}, batched=True,
                  features=features, new_fingerprint=fingerprint.hexdigest(), desc=f"naming {column} labels")


def _rename(source: LoadedSource) -> None:
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


# ------------------------------------------------------------------------------------- peeking
# what `ift validate` and `ift templates preview|validate --data` read of a source, as training reads it


def peek_columns(index: int, src: SourceConfig, templates: Sequence[Any], fixed: Any | None) -> dict[str, list[str]] | None:
    """{split: columns (before renames)}: local data read with the training loader (its errors, its cache);
    a Hub dataset from its metadata (None when only a download could say)."""
    key = f"data.sources.{index}"
    if not is_local_source(src.path) and not is_url(src.path):  # a file on the web is read as training reads it
        from huggingface_hub import constants

        if not constants.HF_HUB_OFFLINE and not hub_reachable():
            raise _hub_error(src, key)
        return _peek_hub(src, key)
    source = load_source(index, src, templates, fixed, rename=False)
    return {split: list(ds.column_names) for split, ds in source.raw.items()}


def _peek_hub(src: SourceConfig, key: str) -> dict[str, list[str]] | None:
    import datasets

    try:
        builder = datasets.load_dataset_builder(src.path, name=src.config, data_dir=src.data_dir,
                                                revision=src.revision)
    except connection_errors():
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
    from ift.templates.sandbox import MAX_SIZE

    key = "--data"
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a preview prints rows, not progress bars
    try:
        if is_local_source(source):
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


def load_source_splits(src: SourceConfig) -> dict[str, Any]:
    """{split: Dataset}: the source's own splits as training reads them (the same loader and errors, label names
    applied, columns renamed), before any split is carved. For tools that browse a source (`ift studio`)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return dict(load_source(0, src).raw)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
