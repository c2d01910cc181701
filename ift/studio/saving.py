"""The draft saved into a templates.yaml (its id kept), the file validated as `ift templates validate FILE` does,
and the lines a recipe needs to use it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from ift.errors import IftError
from ift.templates.checks import validate
from ift.templates.files import TEMPLATE_FILENAME, read_file, save_template
from ift.templates.template import Template


@dataclass
class Saved:
    path: Path
    template: Template
    findings: list[IftError]  # what `ift templates validate PATH` reports on the written file
    snippet: str


def save(tpl: Template, path: str, source: dict | None = None) -> Saved:
    """Write `tpl` into the file at `path` (and no other file); `source`: the recipe source the snippet names."""
    if not path.strip():
        raise IftError("no file to save to", "save to", f"name a file, e.g. my_templates/<dataset>/{TEMPLATE_FILENAME}")
    target = Path(path.strip()).expanduser()
    written = save_template(target, tpl, tpl.dataset)
    return Saved(target, written, validate_file(target), recipe_snippet(target, written, source))


def validate_file(path: Path) -> list[IftError]:
    """`ift templates validate PATH`: the file's structural problems, duplicates, syntax, missing '|||'."""
    try:
        file = read_file(path)
    except IftError as err:
        return [err]
    return validate(file.templates, files=[file])


def recipe_snippet(path: Path, tpl: Template, source: dict | None = None) -> str:
    """The `data` lines that use the saved template: templates_dir is the folder the library searches, the
    reference `dataset/name` as the library resolves it."""
    key = tpl.dataset
    parts = key.split("/") if key else []
    note = ""
    if path.name == TEMPLATE_FILENAME and parts and list(path.parent.parts[-len(parts):]) == parts:
        root = Path(*path.parent.parts[:-len(parts)]) if len(path.parent.parts) > len(parts) else Path(".")
    else:
        root = path.parent
        if path.name != TEMPLATE_FILENAME:
            note = (f"# recipes find files named {TEMPLATE_FILENAME}: save as {root / key / TEMPLATE_FILENAME} "
                    "to use this one\n")
    entry = dict(source or {"path": "<your data>"})
    entry["templates"] = [f"{key}/{tpl.name}" if key else tpl.name]
    body = yaml.safe_dump({"data": {"templates_dir": [root.as_posix()], "sources": [entry]}}, sort_keys=False,
                          default_flow_style=None, allow_unicode=True)
    return note + body
