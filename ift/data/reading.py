"""Reading data files: the datasets builders, and a file that cannot be read diagnosed as one line naming it.

Every command that reads data files (training, `ift data`, `ift validate`, `ift templates preview|validate`)
reads them here, so the same file fails the same way everywhere: one line naming the file, the line or row,
and the fix.
"""

from __future__ import annotations

import codecs
import json
import logging
from pathlib import Path
from typing import Any

from ift.errors import IftError

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


def first_line(err: BaseException | str, limit: int = 300) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else ""


def path_key(key: str) -> str:
    """Where a source's path problems are reported: the recipe key, or a command-line flag as it is."""
    return key if key.startswith("-") else f"{key}.path"


def read_split(builder: str, split: str, files: list[str], key: str) -> Any:
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
        raise IftError(f"data file {path} is empty", path_key(key),
                       "put rows in it (one JSON object per line for .jsonl, a header row then rows for .csv), "
                       "or remove it from the source")
    if builder in TEXT_BUILDERS:
        problem = _utf8_problem(path)
        if problem:
            source = "utf-16" if "UTF-16" in problem else "latin1"  # latin1: the usual other encoding
            raise IftError(f"cannot read {path}: it is not UTF-8 text ({problem})", path_key(key),
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
                return IftError(found, path_key(key), "fix or remove that line: each line of a .jsonl file is "
                                "one complete JSON object, e.g. {\"text\": \"...\", \"label\": \"...\"}")
    cause = err.__cause__ or err
    return IftError(f"cannot read {', '.join(files)} as {builder}: {type(cause).__name__}: {first_line(cause)}",
                    path_key(key), READ_FIXES.get(builder, f"check that every file is valid {builder}"))


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
