"""One prompt template (promptsource's `Template`): compiling, rendering rows, render errors."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.exceptions import SecurityError, TemplateSyntaxError

from ift.errors import IftError
from ift.templates.sandbox import RENDER_STATE, ENV, MAX_SIZE, TemplateLimitError, RenderState

# promptsource's constants: every `}}` becomes `| string | truncate(2048) }}`, and a `|||` inside
# a row's string values is swapped for this marker so it cannot split prompt from target.
TEXT_VAR_LENGTH = 2048
PIPE_PROTECTOR = "3ed2dface8203c4c9dfb1a5dc58e41e0"
SEPARATOR = "|||"
PROMPTSOURCE_PREFIX = "promptsource:"

_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")

_RECOMPILE = object()  # marks template parts that draw random numbers at compile time
_FIXED = object()  # marks answer choices that are plain text (the same for every row)


class _DrawProbe:
    """Stands in for the rng while compiling, to detect filters Jinja evaluates at compile time."""

    def __init__(self) -> None:
        self.draws = 0

    def choice(self, seq: Sequence[Any]) -> Any:
        self.draws += 1
        return seq[0]



@dataclass
class TemplateMetadata:
    """promptsource's `!TemplateMetadata` (plus `languages`, which newer promptsource writes)."""

    original_task: bool | None = None
    choices_in_prompt: bool | None = None
    metrics: list[str] | None = None
    languages: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> TemplateMetadata:
        data = dict(data or {})
        known = {k: data.pop(k) for k in ("original_task", "choices_in_prompt", "metrics", "languages") if k in data}
        return cls(**known, extra=data)

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "choices_in_prompt": self.choices_in_prompt, "metrics": self.metrics, "original_task": self.original_task,
        }
        if self.languages is not None:
            out["languages"] = self.languages
        return {**out, **self.extra}


@dataclass(eq=False)
class Template:
    """One prompt template. `render(row)` equals promptsource's `Template.apply(row)`."""

    name: str
    id: str
    jinja: str
    answer_choices_jinja: str | None = None
    metadata: TemplateMetadata = field(default_factory=TemplateMetadata)
    reference: str = ""
    dataset: str = ""  # the dataset key: "glue_sst2", "glue/sst2" (dataset/subset)
    path: Path | None = None
    line: int | None = None  # line of the entry in `path`
    source: str = "local"  # "local" or "promptsource"
    # compiled once per part ("jinja", "truncated", "choices"), reused for every row
    _compiled: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _fixed_choices: list[str] | None = field(default=None, init=False, repr=False)

    # -- identity ------------------------------------------------------------------------------
    @property
    def ref(self) -> str:
        """The reference that `TemplateLibrary.get` resolves back to this template, as a recipe writes it: the
        name without the trailing space some of promptsource's names have (YAML drops it)."""
        prefix = PROMPTSOURCE_PREFIX if self.source == "promptsource" else ""
        return f"{prefix}{self.dataset}/{self.name.strip()}" if self.dataset else self.name.strip()

    @property
    def location(self) -> str:
        """`file:line` of the entry, or the reference for templates built in code."""
        if self.path is None:
            return self.ref
        return f"{display_path(self.path)}:{self.line}" if self.line else display_path(self.path)

    def __repr__(self) -> str:
        return f"Template({self.ref!r}, id={self.id!r})"

    def __getstate__(self) -> dict[str, Any]:
        # compiled Jinja code does not pickle (datasets.map with num_proc, dill fingerprints): drop it
        state = dict(self.__dict__)
        state["_compiled"], state["_fixed_choices"] = {}, None
        return state

    # -- compiling -----------------------------------------------------------------------------
    def compile(self) -> None:
        """Compile every part (both truncation variants, answer choices); IftError on syntax errors."""
        for part in ("jinja", "truncated", "choices"):
            self._get(part)

    def _source(self, part: str) -> str | None:
        if part == "choices":
            return self.answer_choices_jinja
        if part == "truncated":  # promptsource's own (textual) truncation, kept byte-for-byte
            return self.jinja.replace("}}", f" | string | truncate({TEXT_VAR_LENGTH}) }}}}")
        return self.jinja

    def _get(self, part: str) -> jinja2.Template | None:
        """The compiled part. Jinja folds `["a", "b"] | choice` while compiling; promptsource
        compiles on every apply, so such templates draw anew per row: we then recompile per row."""
        compiled = self._compiled.get(part)
        if compiled is None:
            compiled = self._compiled[part] = self._compile(part)
        if compiled is _RECOMPILE:
            return ENV.from_string(self._source(part))  # type: ignore[arg-type]
        return compiled

    def _compile(self, part: str) -> Any:
        source = self._source(part)
        if source is None:
            return False  # no answer choices
        probe = RenderState(None, _DrawProbe())
        token = RENDER_STATE.set(probe)
        try:
            tree = ENV.parse(source)
            if part == "choices" and _plain_text(tree):  # "no ||| yes": no need to compile at all
                self._fixed_choices = _split_choices("".join(n.data for n in tree.find_all(nodes.TemplateData)))
                return _FIXED
            compiled = ENV.from_string(tree)
        except TemplateSyntaxError as err:
            raise self._syntax_error(err, part) from None
        finally:
            RENDER_STATE.reset(token)
        if probe.rng.draws:  # type: ignore[union-attr]
            return _RECOMPILE
        if part == "choices" and _is_constant(tree):  # e.g. "no ||| yes": render once
            self._fixed_choices = _split_choices(_run(compiled, {}))
        return compiled

    def _syntax_error(self, err: TemplateSyntaxError, part: str) -> IftError:
        if part == "truncated":
            self._get("jinja")  # a plain syntax error is reported as such, not as the rewrite's
            return IftError(
                f"Jinja syntax error in template {self.ref!r} at line {err.lineno} after promptsource's "
                f"truncation rewrite ('}}}}' -> '| string | truncate(2048) }}}}'): {err.message}",
                self.location, "don't use '-}}' whitespace control, or render with truncate=False")
        what = "answer_choices" if part == "choices" else "jinja"
        return IftError(f"Jinja syntax error in {what} of template {self.ref!r} at line {err.lineno}: {err.message}",
                        self.location, "fix the Jinja syntax")

    def variables(self) -> set[str]:
        """Row fields the template (prompt, target and answer choices) reads."""
        found: set[str] = set()
        for source in (self.jinja, self.answer_choices_jinja):
            if source is not None:
                try:
                    found |= meta.find_undeclared_variables(ENV.parse(source))
                except TemplateSyntaxError:
                    self.compile()  # raises the IftError with line numbers
        return found - set(ENV.globals) - {"answer_choices"}

    # -- rendering -----------------------------------------------------------------------------
    def answer_choices(self, row: Mapping[str, Any], *, rng: random.Random | None = None) -> list[str] | None:
        """The answer choices for `row` (promptsource's `get_answer_choices_list`), or None."""
        token = RENDER_STATE.set(RenderState(row, rng))
        try:
            return self._choices(_escape_pipe(row), None)
        finally:
            RENDER_STATE.reset(token)

    def apply(self, row: Mapping[str, Any], *, truncate: bool = True, rng: random.Random | None = None,
              index: int | None = None) -> list[str]:
        """Exactly promptsource's `Template.apply(row)`: the rendered text split on `|||`, stripped."""
        protected = _escape_pipe(row)
        if "answer_choices" in protected:
            raise self._error("the row has a column named 'answer_choices', which templates reserve",
                              index, "rename that column")
        token = RENDER_STATE.set(RenderState(row, rng))
        try:
            protected["answer_choices"] = self._choices(protected, index)
            text = self._render(self._get("truncated" if truncate else "jinja"), protected, index)
        finally:
            RENDER_STATE.reset(token)
        return [part.replace(PIPE_PROTECTOR, SEPARATOR).strip() for part in text.split(SEPARATOR)]

    def render(self, row: Mapping[str, Any], *, truncate: bool = True, rng: random.Random | None = None,
               index: int | None = None) -> tuple[str, str]:
        """(prompt, target) for `row`. An empty string means the template skips the row."""
        parts = self.apply(row, truncate=truncate, rng=rng, index=index)
        if len(parts) == 1:  # promptsource renders [""] for rows a template does not apply to
            return parts[0], ""
        if len(parts) > 2:
            raise self._error(f"the template rendered {len(parts)} parts separated by '|||'", index,
                              "use '|||' exactly once, between the prompt and the target")
        return parts[0], parts[1]

    def _choices(self, protected: dict[str, Any], index: int | None) -> list[str] | None:
        compiled = self._get("choices")
        if not compiled:
            return None
        if self._fixed_choices is not None:
            return list(self._fixed_choices)  # a copy: the template may append to its own list
        return _split_choices(self._render(compiled, protected, index, part="answer_choices"))

    def _render(self, compiled: jinja2.Template, variables: dict[str, Any], index: int | None,
                part: str = "jinja") -> str:
        try:
            return _run(compiled, variables)
        except IftError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure inside a template is the template's
            line = _template_line(err, compiled)
            where_line = f", {part} line {line}" if line else ""
            raise self._error(_describe(err), index, _fix_for(err), extra_where=where_line) from None

    def _error(self, problem: str, index: int | None, fix: str, extra_where: str = "") -> IftError:
        row = f", row {index}" if index is not None else ""
        return IftError(f"template {self.ref!r} failed: {problem}", f"{self.location}{row}{extra_where}", fix)


def _escape_pipe(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.replace(SEPARATOR, PIPE_PROTECTOR) if isinstance(v, str) else v for k, v in row.items()}


def _split_choices(text: str) -> list[str]:
    return [choice.strip().replace(PIPE_PROTECTOR, SEPARATOR) for choice in text.split(SEPARATOR)]


def _plain_text(tree: nodes.Template) -> bool:
    return all(isinstance(n, (nodes.Output, nodes.TemplateData)) for n in tree.find_all(nodes.Node))


def _is_constant(tree: nodes.Template) -> bool:
    """No variables, calls or filters: the output is the same for every row (and draws no random)."""
    if meta.find_undeclared_variables(tree):
        return False
    return not any(True for _ in tree.find_all((nodes.Call, nodes.Filter, nodes.Test)))


def _run(compiled: jinja2.Template, variables: dict[str, Any]) -> str:
    """Render with an output budget (a loop printing forever stops at MAX_SIZE characters)."""
    out: list[str] = []
    size = 0
    for chunk in compiled.root_render_func(compiled.new_context(variables)):
        size += len(chunk)
        if size > MAX_SIZE:
            raise TemplateLimitError(f"output exceeds {MAX_SIZE:,} characters")
        out.append(chunk)
    return "".join(out)


def _template_line(err: BaseException, compiled: jinja2.Template) -> int | None:
    """The template line where `err` was raised (Jinja compiles templates to Python code)."""
    line = None
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = compiled.get_corresponding_lineno(tb.tb_lineno)
        tb = tb.tb_next
    return line


def _describe(err: BaseException) -> str:
    kind = "unsafe operation blocked" if isinstance(err, SecurityError) else type(err).__name__
    message = _ADDRESS_RE.sub("", str(err))  # object addresses say nothing useful to users
    if len(message) > 300:
        message = message[:300] + "..."
    return f"{kind}: {message}" if message else kind


def _fix_for(err: BaseException) -> str:
    if isinstance(err, TemplateLimitError):
        return "templates may not build huge strings, lists or loops"
    if isinstance(err, SecurityError):
        return "templates may only read the row's fields; Python internals are off limits"
    if isinstance(err, TypeError) and "loader" in str(err):
        return "templates cannot import or include other templates"
    return "fix the template, or check that the row has the fields it uses (`ift templates validate REF --data ...`)"


def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------
# Rendering helpers for the data pipeline
# --------------------------------------------------------------------------------------------


def render_row(tpl: Template, row: Mapping[str, Any], index: int | None = None, *, truncate: bool = True,
               rng: random.Random | None = None) -> tuple[str, str] | None:
    """(prompt, target), or None when the template renders an empty prompt or target for this row
    (promptsource templates do that on purpose for rows they do not apply to). Template bugs raise
    IftError naming the template and row."""
    prompt, target = tpl.render(row, truncate=truncate, rng=rng, index=index)
    if not prompt or not target:
        return None
    return prompt, target


def render_batch(tpl: Template, batch: Mapping[str, Sequence[Any]], start_index: int = 0, *,
                 truncate: bool = True, rng: random.Random | None = None) -> list[tuple[str, str] | None]:
    """`render_row` over a column batch (`datasets.map(batched=True)` format)."""
    columns = list(batch)
    size = len(batch[columns[0]]) if columns else 0
    values = [batch[c] for c in columns]
    return [
        render_row(tpl, dict(zip(columns, [v[i] for v in values])), start_index + i, truncate=truncate, rng=rng)
        for i in range(size)
    ]


def render_rows(tpl: Template, rows: Iterable[Mapping[str, Any]], *, truncate: bool = True,
                rng: random.Random | None = None) -> Iterator[tuple[str, str] | None]:
    """`render_row` over an iterable of rows, with row indices in errors."""
    for i, row in enumerate(rows):
        yield render_row(tpl, row, i, truncate=truncate, rng=rng)
