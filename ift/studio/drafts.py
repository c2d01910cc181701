"""The template being edited: built from the page's fields, rendered on rows, checked as `ift templates validate`."""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ift.errors import IftError
from ift.templates.checks import validate
from ift.templates.template import PROMPTSOURCE_PREFIX, Template, TemplateMetadata

VALIDATION_ROWS = 1000  # rows a draft is checked on, as `ift templates validate --data` reads by default


@dataclass
class Draft:
    """A template as the page holds it: plain strings and flags."""

    dataset: str = ""
    name: str = ""
    jinja: str = ""
    choices: str = ""  # answer choices, Jinja; "" = none
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    original_task: bool | None = None
    choices_in_prompt: bool | None = None
    metrics: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=lambda: ["en"])
    reference: str = ""

    def template(self) -> Template:
        """The draft as a `Template`: rendered by the library, in its sandbox."""
        return Template(
            name=self.name.strip(), id=self.id.strip() or str(uuid.uuid4()), jinja=self.jinja,
            answer_choices_jinja=self.choices if self.choices.strip() else None,
            metadata=TemplateMetadata(original_task=self.original_task, choices_in_prompt=self.choices_in_prompt,
                                      metrics=list(self.metrics) or None, languages=list(self.languages) or None),
            reference=self.reference, dataset=self.dataset.strip().strip("/"),
        )

    @classmethod
    def from_template(cls, tpl: Template, *, keep_id: bool) -> Draft:
        """A draft of `tpl`; a copy of someone else's template (promptsource's) gets an id of its own."""
        md = tpl.metadata
        return cls(dataset=tpl.dataset.removeprefix(PROMPTSOURCE_PREFIX), name=tpl.name.strip(), jinja=tpl.jinja,
                   choices=tpl.answer_choices_jinja or "", id=tpl.id if keep_id else str(uuid.uuid4()),
                   original_task=md.original_task, choices_in_prompt=md.choices_in_prompt,
                   metrics=list(md.metrics or []), languages=list(md.languages or ["en"]), reference=tpl.reference)

    @classmethod
    def starter(cls, dataset: str, columns: Sequence[str]) -> Draft:
        """A first template over the source's own columns: the first text column, then the label."""
        label = next((c for c in columns if c == "label"), None) or next(
            (c for c in columns if "label" in c), None) or (columns[-1] if columns else "label")
        text = next((c for c in columns if c != label), "text")
        return cls(dataset=dataset, name="my_template", jinja=f"{{{{{text}}}}}\n|||\n{{{{{label}}}}}")


@dataclass
class RenderedRow:
    index: int
    prompt: str = ""
    target: str = ""
    choices: list[str] | None = None
    error: IftError | None = None

    @property
    def skipped(self) -> bool:
        """promptsource templates render an empty prompt or target on purpose for rows they do not apply to."""
        return self.error is None and (not self.prompt or not self.target)


def render(tpl: Template, rows: Sequence[tuple[int, Mapping[str, Any]]], seed: int = 0) -> list[RenderedRow]:
    """Each row rendered by `tpl` (prompt, target, answer choices), or the error it fails with."""
    out = []
    for index, row in rows:
        rng = random.Random(f"{seed}-{index}")  # templates that draw (`| choice`) draw the same on every refresh
        try:
            prompt, target = tpl.render(row, index=index, rng=rng)
            out.append(RenderedRow(index, prompt, target, tpl.answer_choices(row, rng=rng)))
        except IftError as err:
            out.append(RenderedRow(index, error=err))
    return out


def check(tpl: Template, rows: Sequence[Mapping[str, Any]] | None, columns: Sequence[str] | None) -> list[IftError]:
    """Every problem `ift templates validate --data` reports for this template on these rows."""
    findings = []
    if not tpl.name:
        findings.append(IftError("the template has no name", "name", "give it a short name, unique in its file"))
    return findings + validate([tpl], rows, columns)


def sample_indices(total: int, n: int, seed: int) -> list[int]:
    """`n` row indices drawn without replacement, the same for the same seed."""
    n = max(0, min(n, total))
    return sorted(random.Random(seed).sample(range(total), n))
