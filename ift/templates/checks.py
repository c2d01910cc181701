"""`ift templates validate`: every problem in a set of templates, optionally checked on rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ift.errors import IftError
from ift.templates.files import TemplateFile
from ift.templates.template import SEPARATOR, Template


def validate(templates: Sequence[Template], rows: Sequence[Mapping[str, Any]] | None = None,
             columns: Sequence[str] | None = None, files: Sequence[TemplateFile] = ()) -> list[IftError]:
    """Every problem found, one IftError each: structure, duplicates, Jinja syntax, missing '|||';
    with rows: unknown variables, render failures, empty prompts/targets, targets not in choices."""
    findings: list[IftError] = [p for f in files for p in f.problems]
    findings += _duplicates(templates)
    if rows is not None and columns is None:
        columns = sorted({c for row in rows for c in row})
    for tpl in templates:
        findings += _check_template(tpl, rows, columns)
    return findings


def _duplicates(templates: Sequence[Template]) -> list[IftError]:
    findings = []
    by_name: dict[tuple[str, str, str], list[Template]] = {}
    by_id: dict[str, list[Template]] = {}
    for tpl in templates:
        by_name.setdefault((tpl.source, tpl.dataset, tpl.name), []).append(tpl)
        by_id.setdefault(tpl.id, []).append(tpl)
    for (_, dataset, name), same in by_name.items():
        if len(same) > 1:
            findings.append(IftError(f"duplicate template name {name!r} in dataset {dataset!r}",
                                     ", ".join(t.location for t in same), "give each template a unique name"))
    for template_id, same in by_id.items():
        if len(same) > 1:
            findings.append(IftError(f"duplicate template id {template_id!r}", ", ".join(t.location for t in same),
                                     "give each template a fresh uuid (python -c 'import uuid; print(uuid.uuid4())')"))
    return findings


def _check_template(tpl: Template, rows: Sequence[Mapping[str, Any]] | None,
                    columns: Sequence[str] | None) -> list[IftError]:
    try:
        tpl.compile()
    except IftError as err:
        return [err]
    findings = []
    if SEPARATOR not in tpl.jinja:
        findings.append(IftError(f"template {tpl.ref!r} has no '|||' separator", tpl.location,
                                 "write the prompt, then '|||', then the target"))
    if columns is not None:
        for var in sorted(tpl.variables() - set(columns)):
            findings.append(IftError(
                f"template {tpl.ref!r} uses unknown variable {var!r}", tpl.location,
                f"the data has no column {var!r}; available columns: {', '.join(columns) or 'none'}"))
    if rows is not None and not findings:
        findings += _check_rows(tpl, rows)
    return findings


def _check_rows(tpl: Template, rows: Sequence[Mapping[str, Any]]) -> list[IftError]:
    failures: list[IftError] = []
    empty: dict[str, list[int]] = {"prompt": [], "target": []}
    off_choices: list[tuple[int, str, list[str]]] = []
    for i, row in enumerate(rows):
        try:
            prompt, target = tpl.render(row, index=i)
            choices = tpl.answer_choices(row)
        except IftError as err:
            failures.append(err)
            continue
        for part, text in (("prompt", prompt), ("target", target)):
            if not text:
                empty[part].append(i)
        if target and choices is not None and target not in choices:
            off_choices.append((i, target, choices))
    findings = failures[:1]
    if len(failures) > 1:  # one line per template: the first failure, and how many rows fail
        findings[0] = IftError(findings[0].what, f"{findings[0].where}; {len(failures)} of {len(rows)} rows fail",
                               findings[0].fix)
    for part, indices in empty.items():
        if indices:
            findings.append(IftError(
                f"template {tpl.ref!r} renders an empty {part} for {len(indices)} of {len(rows)} rows",
                f"{tpl.location}, first row {indices[0]}",
                "rows with an empty prompt or target are skipped; check the fields the template uses"))
    if off_choices:
        i, target, choices = off_choices[0]
        findings.append(IftError(
            f"template {tpl.ref!r}: target {target!r} is not among answer_choices for "
            f"{len(off_choices)} of {len(rows)} rows", f"{tpl.location}, first row {i}",
            f"answer_choices are {choices}; make the target one of them (e.g. {{{{answer_choices[label]}}}})"))
    return findings
