"""Local copies of Hub datasets: a data map, a YAML file that `data.data_map` names, lets a recipe keep naming its
data the way users get it (a Hub id) while tests, benchmarks and offline machines read a copy on disk. It is
applied first when data loads (build_splits, check_sources): the prepared data's `data` section, which a run
saves in its recipe, names the copies read and no map.

    # tests/shared_data.yaml (paths are relative to the map file)
    takala/financial_phrasebank:sentences_allagree:    # ID, or ID:SUBSET (the source's config or data_dir)
      path: ../../shared/data/financial_phrasebank_allagree
      columns: {sentiment: label}                      # the copy's column -> the Hub's name for it
    knkarthick/dialogsum:
      path: ../../shared/data/dialogsum

A source whose path is ID (and whose config or data_dir is SUBSET, or who has neither when the key has no
SUBSET) reads the copy instead. The copy is taken as if it were the Hub's rows: its `columns` rename it (and its
`labels` name its label values) the way the Hub serves it, then the recipe's own `columns` and `labels` apply.
The result is one local source, the two renamings composed into one `columns` mapping, with the source's name
kept, so that its prepared rows are those of the copy spelled directly in the recipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ift.errors import IftError, IftErrors
from ift.recipe import DataConfig, SourceConfig

FIX = "write one entry per dataset, `ID: {path: FOLDER}` or `ID:SUBSET: {path: FOLDER, columns: {...}}` (docs/data.md)"


class LocalCopy(BaseModel):
    """One entry of a data map."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str  # the copy: a file or folder, relative to the map file
    columns: dict[str, str] = {}  # the copy's column -> the Hub's name for it
    labels: dict[str, list[str]] = {}  # the copy's column -> label names, as a source's `labels`


@dataclass(frozen=True)
class DataMap:
    path: Path
    copies: dict[str, LocalCopy]  # "ID" or "ID:SUBSET" -> its copy

    def entry_for(self, source: dict[str, Any]) -> str | None:
        """The key of the entry that stands in for a source (a recipe's source as a mapping), or None."""
        subset = source.get("config") or source.get("data_dir")
        key = f"{source['path']}:{subset}" if subset else source["path"]
        return key if key in self.copies else None

    def local_source(self, source: dict[str, Any], where: str) -> dict[str, Any] | None:
        """The source reading its local copy (None: the map has no entry for it). `where`: the source's key."""
        key = self.entry_for(source)
        if key is None:
            return None
        copy = self.copies[key]
        local = Path(copy.path).expanduser()
        local = Path(os.path.abspath(local if local.is_absolute() else self.path.parent / local))
        if not local.exists():
            raise IftError(f"the local copy of '{key}' is not there: {local}", f"{self.path}: {key}.path",
                           f"fix the path (relative to {self.path.name}), or remove the entry so that {where} "
                           "loads from the Hub")
        out = {k: v for k, v in source.items() if k not in ("config", "revision", "data_dir", "columns", "labels")}
        out["path"] = str(local)
        out["name"] = source.get("name") or Path(source["path"].rstrip("/\\")).stem or source["path"]
        columns, labels = compose(copy, source.get("columns") or {}, source.get("labels") or {},
                                  f"{self.path}: {key}.labels")
        if columns:
            out["columns"] = columns
        if labels:
            out["labels"] = labels
        return out


def compose(copy: LocalCopy, columns: dict[str, str], labels: dict[str, list[str]],
            where: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(columns, labels) of the copy for a source whose own `columns` and `labels` name the Hub's columns: the
    copy's renames to the Hub's names, then the source's renames, as one mapping keyed by the copy's columns."""
    made = {hub: mine for mine, hub in copy.columns.items()}  # a Hub column -> the copy's column it comes from
    out: dict[str, str] = {}
    for mine, hub in copy.columns.items():
        if columns.get(hub, hub) != mine:
            out[mine] = columns.get(hub, hub)
    for hub, new in columns.items():
        if hub not in made and hub not in copy.columns:  # a column the copy has under the Hub's name
            out[hub] = new
    named = {made.get(hub, hub): names for hub, names in labels.items()}
    for mine, names in copy.labels.items():
        if named.setdefault(mine, names) != names:
            raise IftError(f"the data map names the labels of column '{mine}' {names}, the recipe "
                           f"{named[mine]}", where, "give the copy's labels the names the recipe uses, or drop "
                           "them from the map")
    return out, named


def read_data_map(path: str | Path) -> DataMap:
    """Read and check a data map; every bad entry is reported at once."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise IftError(f"data map not found: {path}", "data.data_map",
                       "give a YAML file naming local copies of Hub datasets (docs/data.md), e.g. "
                       "data.data_map=tests/shared_data.yaml")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(file)
        raise IftError(f"YAML syntax error in the data map: {getattr(exc, 'problem', None) or exc}", where,
                       "fix the indentation or quoting there") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IftError(f"cannot read the data map: {exc}", str(file), "check the file's permissions and encoding "
                       "(UTF-8)") from None
    if not isinstance(raw, dict) or not raw:
        raise IftError("a data map is a mapping of Hub dataset ids to local copies", str(file), FIX)
    copies: dict[str, LocalCopy] = {}
    errors: list[IftError] = []
    for key, value in raw.items():
        if not isinstance(value, dict):
            errors.append(IftError(f"entry '{key}' is not a mapping", f"{file}: {key}", FIX))
            continue
        try:
            copies[str(key)] = LocalCopy.model_validate(value)
        except ValidationError as exc:
            for err in exc.errors():
                field = ".".join(str(p) for p in err["loc"])
                what = {"missing": f"missing required key '{field}'", "extra_forbidden": f"unknown key '{field}'"
                        }.get(err["type"], f"wrong value {err.get('input')!r}: {err['msg'].lower()}")
                errors.append(IftError(what, f"{file}: {key}.{field}", "an entry has a path (a file or folder, "
                                       "relative to the map), and may have columns and labels (docs/data.md)"))
    if errors:
        raise IftErrors(errors)
    return DataMap(file, copies)


def apply_data_map(data: DataConfig) -> DataConfig:
    """The data section with every source its data map names reading the local copy instead, and no map (as is
    when `data.data_map` is unset); every problem reported at once."""
    if not data.data_map:
        return data
    data_map = read_data_map(data.data_map)
    sources, errors = [], []
    for i, src in enumerate(data.sources):
        key = f"data.sources.{i}"
        try:
            local = data_map.local_source(src.model_dump(exclude_unset=True), key)
            sources.append(src if local is None else SourceConfig.model_validate(local))
        except IftError as err:
            errors.append(err)
        except ValidationError as exc:  # e.g. label names the map gives twice
            errors.append(IftError(f"its local copy makes an invalid source: {exc.errors()[0]['msg']}",
                                   f"{key} ({data.data_map})", "fix that entry of the data map"))
    if errors:
        raise IftErrors(errors)
    return data.model_copy(update={"sources": sources, "data_map": None})
