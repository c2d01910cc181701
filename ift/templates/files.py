"""promptsource's templates.yaml files: where they live, reading them, appending a new entry."""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ift import atomic
from ift.errors import IftError
from ift.templates.template import SEPARATOR, Template, TemplateMetadata, display_path

TEMPLATE_FILENAME = "templates.yaml"


# --------------------------------------------------------------------------------------------
# Where template folders are
# --------------------------------------------------------------------------------------------


def repo_templates_dir() -> Path:
    """The repository's own `templates/` folder (next to the `ift` package in a checkout)."""
    return Path(__file__).resolve().parents[2] / "templates"  # the repo root's templates/


def promptsource_templates_dir() -> Path | None:
    """promptsource's template folder, found without importing promptsource (slow, needs pandas)."""
    try:
        spec = importlib.util.find_spec("promptsource")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "templates"
        if folder.is_dir():
            return folder
    return None


# --------------------------------------------------------------------------------------------
# Reading template files
# --------------------------------------------------------------------------------------------


_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _TemplateLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe YAML loader that understands promptsource's two tags (and nothing else exotic)."""


class _RawTemplate(dict):
    line: int = 0


class _RawMetadata(dict):
    pass


def _construct_template(loader: Any, node: yaml.Node) -> _RawTemplate:
    raw = _RawTemplate(loader.construct_mapping(node, deep=True))
    raw.line = node.start_mark.line + 1
    return raw


def _construct_metadata(loader: Any, node: yaml.Node) -> _RawMetadata:
    return _RawMetadata(loader.construct_mapping(node, deep=True))


_TemplateLoader.add_constructor("!Template", _construct_template)
_TemplateLoader.add_constructor("!TemplateMetadata", _construct_metadata)


@dataclass
class TemplateFile:
    """One templates.yaml: its templates and any structural problems found while reading it."""

    path: Path
    key: str
    dataset: str
    subset: str | None
    templates: list[Template]
    problems: list[IftError]


def _subset(value: Any) -> str | None:
    return None if value in (None, "", "None") else str(value)


def read_file(path: Path, key: str | None = None, source: str = "local") -> TemplateFile:
    """Parse a promptsource templates.yaml. `key` defaults to `dataset[/subset]` from the file.
    Raises IftError for unreadable files and YAML errors; per-template problems are collected."""
    where = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise IftError(f"cannot read template file: {err.__class__.__name__}: {err}", where,
                       "check the path and that the file is UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_TemplateLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise IftError(f"YAML syntax error: {problem}", f"{where}{line}", "fix the YAML") from None
    if not isinstance(data, dict) or not isinstance(data.get("templates", {}) or {}, dict):
        raise IftError("not a promptsource template file", where,
                       "expected top-level keys 'dataset' and 'templates' (a mapping of id -> !Template)")
    dataset, subset = str(data.get("dataset") or ""), _subset(data.get("subset"))
    header_key = dataset + (f"/{subset}" if subset else "")
    file = TemplateFile(path, key or header_key or path.parent.name, dataset, subset, [], [])
    if not dataset:
        file.problems.append(IftError("template file has no 'dataset' key", where,
                                      "add `dataset: <name>` at the top of the file"))
    elif key and header_key != key and source == "local":
        file.problems.append(IftError(f"file says dataset {header_key!r} but lives in folder {key!r}", where,
                                      f"put it in templates/{header_key}/ or fix the 'dataset'/'subset' keys"))
    for entry_id, raw in (data.get("templates") or {}).items():
        tpl = _template_from_raw(str(entry_id), raw, file, source)
        if isinstance(tpl, IftError):
            file.problems.append(tpl)
        else:
            file.templates.append(tpl)
    return file


def _template_from_raw(entry_id: str, raw: Any, file: TemplateFile, source: str) -> Template | IftError:
    line = getattr(raw, "line", 0)
    where = f"{display_path(file.path)}:{line}" if line else display_path(file.path)
    if not isinstance(raw, dict):
        return IftError(f"entry {entry_id!r} is not a !Template mapping", where, "see docs/templates.md")
    name, jinja_text, choices = raw.get("name"), raw.get("jinja"), raw.get("answer_choices")
    for fld, value in (("name", name), ("jinja", jinja_text)):
        if value is not None and not isinstance(value, str):  # YAML reads `name: off` as False
            return IftError(f"template {entry_id!r}: {fld} must be a string, got {value!r}", where,
                            f"quote it: {fld}: '...'")
        if not value or not value.strip():
            return IftError(f"template {entry_id!r} has no {fld}", where, f"add a non-empty `{fld}:` string")
    if choices is not None and not isinstance(choices, str):
        return IftError(f"template {name!r}: answer_choices must be a string like 'no ||| yes'", where,
                        "separate the choices with '|||' in one string")
    tpl_id = str(raw.get("id") or entry_id)
    if tpl_id != entry_id:
        return IftError(f"template {name!r}: id {tpl_id!r} differs from its key {entry_id!r}", where,
                        "use the same uuid for the key and the `id:` field")
    metadata = raw.get("metadata")
    return Template(
        name=name, id=tpl_id, jinja=jinja_text, answer_choices_jinja=choices,
        metadata=TemplateMetadata.from_mapping(metadata if isinstance(metadata, dict) else None),
        reference=str(raw.get("reference") or ""), dataset=file.key, path=file.path, line=line or None,
        source=source,
    )


def find_template_files(root: Path) -> dict[str, Path]:
    """`<root>/<dataset>[/<subset>]/templates.yaml` files by dataset key (the folder path)."""
    found: dict[str, Path] = {}
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if TEMPLATE_FILENAME in filenames:
            rel = Path(folder).relative_to(root).as_posix()
            found["" if rel == "." else rel] = Path(folder) / TEMPLATE_FILENAME
    return found


# --------------------------------------------------------------------------------------------
# Writing: `ift templates new`
# --------------------------------------------------------------------------------------------


class _Entry(dict):
    pass


class _MetadataEntry(dict):
    pass


class _EntryDumper(yaml.SafeDumper):
    """Writes entries in promptsource's layout (tags, sorted keys), multi-line text as `|-` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None  # PyYAML falls back to quoting when a block cannot hold it
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_EntryDumper.add_representer(str, _represent_str)
_EntryDumper.add_representer(_Entry, lambda d, v: d.represent_mapping("!Template", dict(v)))
_EntryDumper.add_representer(_MetadataEntry, lambda d, v: d.represent_mapping("!TemplateMetadata", dict(v)))


def _dump_entry(tpl: Template, indent: int) -> str:
    entry = _Entry(
        answer_choices=tpl.answer_choices_jinja, id=tpl.id, jinja=tpl.jinja,
        metadata=_MetadataEntry(tpl.metadata.to_mapping()), name=tpl.name, reference=tpl.reference,
    )
    text = yaml.dump({tpl.id: entry}, Dumper=_EntryDumper, default_flow_style=False, sort_keys=True,
                     allow_unicode=True, width=100)
    pad = " " * indent
    return "".join(pad + line if line.strip() else line for line in text.splitlines(keepends=True))


def _append_entry(text: str, entry_of: Any) -> str:
    """Append an entry to the file's `templates:` mapping without touching a byte of the rest."""
    try:
        root = yaml.compose(text, Loader=_TemplateLoader)
    except yaml.YAMLError as err:
        raise IftError(f"existing template file is not valid YAML: {err}", None, "fix it first") from None
    if root is None or not isinstance(root, yaml.MappingNode):
        raise IftError("existing template file is not a mapping", None, "fix it first")
    keys = [k.value for k, _ in root.value]
    if "templates" not in keys:
        return text.rstrip("\n") + "\ntemplates:\n" + entry_of(2)
    value = root.value[keys.index("templates")][1]
    if isinstance(value, yaml.MappingNode) and value.value and not value.flow_style:
        if keys[-1] != "templates":
            raise IftError("cannot append: 'templates:' is not the last key of the file", None,
                           "move the 'templates:' block to the end of the file")
        indent = value.value[0][0].start_mark.column
        return (text if text.endswith("\n") else text + "\n") + entry_of(indent)
    if (isinstance(value, yaml.MappingNode) and not value.value) or (
            isinstance(value, yaml.ScalarNode) and value.tag == "tag:yaml.org,2002:null"):
        head, tail = text[:value.start_mark.index].rstrip(" "), text[value.end_mark.index:]
        return head + "\n" + entry_of(2) + tail.lstrip("\n")
    raise IftError("cannot append: 'templates' is not a block mapping", None, "write it as `templates:` + entries")


def add_template(dataset: str, name: str, jinja_text: str, answer_choices: str | None = None, *,
                 templates_dir: str | Path | None = None, original_task: bool = False,
                 choices_in_prompt: bool | None = None, metrics: Sequence[str] | None = None,
                 languages: Sequence[str] = ("en",), reference: str = "") -> Template:
    """Add a template with a fresh uuid to `<templates_dir>/<dataset>/templates.yaml`.

    Existing entries stay byte-for-byte identical (the entry is appended); the write is atomic;
    the result is checked by re-reading it and stays loadable by promptsource itself.
    """
    dataset = dataset.strip().strip("/")
    if not dataset or any(p in ("", ".", "..") for p in dataset.split("/")):
        raise IftError(f"bad dataset name {dataset!r}", None, "use `name` or `name/subset`")
    if not name.strip() or "\n" in name:
        raise IftError(f"bad template name {name!r}", None, "use a short single-line name")
    root = Path(templates_dir) if templates_dir is not None else default_templates_dir()
    path = root / dataset / TEMPLATE_FILENAME
    tpl = Template(
        name=name.strip(), id=str(uuid.uuid4()), jinja=jinja_text, answer_choices_jinja=answer_choices,
        metadata=TemplateMetadata(original_task=original_task,
                                  choices_in_prompt=choices_in_prompt if choices_in_prompt is not None
                                  else _mentions_choices(jinja_text),
                                  metrics=list(metrics) if metrics else (["Accuracy"] if answer_choices else ["ROUGE"]),
                                  languages=list(languages)),
        reference=reference, dataset=dataset, path=path, source="local",
    )
    tpl.compile()
    if SEPARATOR not in jinja_text:
        raise IftError(f"template {name!r} has no '|||' separator", None,
                       "write the prompt, then '|||', then the target, e.g. '{{text}} ||| {{label}}'")
    if path.exists():
        existing = read_file(path, dataset)
        if any(t.name == tpl.name for t in existing.templates):
            raise IftError(f"template {tpl.name!r} already exists for dataset {dataset!r}", display_path(path),
                           "choose another --name")
        text = _append_entry(path.read_text(encoding="utf-8"), lambda indent: _dump_entry(tpl, indent))
    else:
        text = _new_file_text(dataset, tpl)
    _check_written(text, path, tpl)
    atomic.write_text(path, text)
    written = read_file(path, dataset)
    return next(t for t in written.templates if t.id == tpl.id)


def default_templates_dir() -> Path:
    """Where `ift templates new` writes: the repo's templates/ in a checkout, else ./templates."""
    repo = repo_templates_dir()
    return repo if repo.is_dir() else Path("templates")


def _new_file_text(dataset: str, tpl: Template) -> str:
    """A new templates.yaml holding `tpl`, with the `dataset`/`subset` header of `dataset` ("name[/subset]")."""
    dataset_name, _, subset = dataset.partition("/")
    header = yaml.safe_dump({"dataset": dataset_name}, default_flow_style=False)
    header += yaml.safe_dump({"subset": subset}, default_flow_style=False) if subset else ""
    return header + "templates:\n" + _dump_entry(tpl, 2)


def _mentions_choices(jinja_text: str) -> bool:
    prompt = jinja_text.split(SEPARATOR)[0]
    return "answer_choices" in prompt


def _check_written(text: str, path: Path, tpl: Template) -> None:
    """Read the new text back before writing it: the entry must come back exactly as given."""
    data = yaml.load(text, Loader=_TemplateLoader)
    entry = (data or {}).get("templates", {}).get(tpl.id)
    if not entry or entry.get("jinja") != tpl.jinja or entry.get("answer_choices") != tpl.answer_choices_jinja:
        raise IftError("internal check failed: the new entry does not read back unchanged", display_path(path),
                       "please report this with the template text")


# --------------------------------------------------------------------------------------------
# Writing: a template saved by id (`ift studio`)
# --------------------------------------------------------------------------------------------


def save_template(path: str | Path, tpl: Template, dataset: str | None = None) -> Template:
    """Write `tpl` into the templates.yaml at `path`: the entry with its id is replaced, else the entry is
    appended (a new file gets the `dataset`/`subset` header of `dataset`, "name[/subset]"). Every other entry
    stays byte-for-byte as it was; the write is atomic, and the file is read back before it is written.
    Returns the template as read back from the file."""
    path = Path(path)
    where = display_path(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise IftError("a templates file ends in .yaml", where, "name a file like my_templates/<dataset>/templates.yaml")
    if not tpl.name.strip() or "\n" in tpl.name:
        raise IftError(f"bad template name {tpl.name!r}", where, "use a short single-line name")
    tpl.compile()
    if SEPARATOR not in tpl.jinja:
        raise IftError(f"template {tpl.name!r} has no '|||' separator", where,
                       "write the prompt, then '|||', then the target")
    if path.is_dir():
        raise IftError("the path is a folder", where, f"name the file inside it, e.g. {where}/{TEMPLATE_FILENAME}")
    if path.exists():
        existing = read_file(path)
        clash = next((t for t in existing.templates if t.name.strip() == tpl.name.strip() and t.id != tpl.id), None)
        if clash is not None:
            raise IftError(f"template {tpl.name!r} already exists in this file (id {clash.id})", where,
                           "choose another name, or open that template to edit it")
        text = path.read_text(encoding="utf-8")
        replaced = _replace_entry(text, tpl.id, lambda indent: _dump_entry(tpl, indent))
        text = replaced if replaced is not None else _append_entry(text, lambda indent: _dump_entry(tpl, indent))
        key = existing.key
    else:
        key = (dataset or "").strip().strip("/")
        if not key or any(p in ("", ".", "..") for p in key.split("/")):
            raise IftError(f"bad dataset name {key!r} for a new templates file", where, "use `name` or `name/subset`")
        text = _new_file_text(key, tpl)
    _check_written(text, path, tpl)
    atomic.write_text(path, text)
    return next(t for t in read_file(path).templates if t.id == tpl.id)


def _replace_entry(text: str, entry_id: str, entry_of: Any) -> str | None:
    """The text with the `templates:` entry keyed `entry_id` rewritten (None when there is none); the lines of
    every other entry are kept as they are."""
    try:
        root = yaml.compose(text, Loader=_TemplateLoader)
    except yaml.YAMLError as err:
        raise IftError(f"existing template file is not valid YAML: {err}", None, "fix it first") from None
    if not isinstance(root, yaml.MappingNode):
        return None
    value = next((v for k, v in root.value if k.value == "templates"), None)
    if not isinstance(value, yaml.MappingNode) or value.flow_style:
        return None
    pairs = value.value
    for i, (key, _) in enumerate(pairs):
        if str(key.value) != entry_id:
            continue
        start = text.rfind("\n", 0, key.start_mark.index) + 1  # the start of the key's line
        if i + 1 < len(pairs):
            nxt = pairs[i + 1][0].start_mark.index
            end = text.rfind("\n", 0, nxt) + 1
        else:
            end = value.end_mark.index  # where the mapping ends: the next top-level key's line, or the end of file
            if end < len(text) and text[end - 1:end] != "\n":
                end = text.rfind("\n", 0, end) + 1
        return text[:start] + entry_of(key.start_mark.column) + text[end:]
    return None
