"""Prompt templates in promptsource's YAML format, rendered in a Jinja sandbox.

A file ``templates/<dataset>[/<subset>]/templates.yaml`` holds promptsource ``!Template`` entries.
We read it with our own YAML loader (promptsource need not be installed), and render exactly as
promptsource's ``Template.apply`` does: same Jinja settings, filters and globals, the same
``|||`` escaping and splitting, the same 2048-character truncation of every ``{{ ... }}``.
The one deliberate difference: templates are code from strangers, so they run in a hardened
``ImmutableSandboxedEnvironment`` (no Python internals, no imports, bounded sizes).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import random
import re
import types
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2 import meta, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.filters import do_center, do_format, do_indent, do_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, modifies_known_mutable
from jinja2.utils import Namespace, pass_context

from ift import atomic
from ift.errors import IftError

# promptsource's constants: every `}}` becomes `| string | truncate(2048) }}`, and a `|||` inside
# a row's string values is swapped for this marker so it cannot split prompt from target.
TEXT_VAR_LENGTH = 2048
PIPE_PROTECTOR = "3ed2dface8203c4c9dfb1a5dc58e41e0"
SEPARATOR = "|||"
PROMPTSOURCE_PREFIX = "promptsource:"
TEMPLATE_FILENAME = "templates.yaml"

# Resource bounds: a template must not be able to exhaust memory or CPU with a one-liner.
MAX_SIZE = 10_000_000  # characters / items in any string or list a template builds or outputs
MAX_RANGE_TOTAL = 100_000  # items over all range() calls of one render (stops nested range bombs)
MAX_POWER_BITS = 100_000  # bits of an integer `a ** b`

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_PERCENT_SPEC_RE = re.compile(r"%[^a-zA-Z%]*")
_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")


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
# The sandbox
# --------------------------------------------------------------------------------------------


class _RenderState:
    """Per-render state the sandbox hooks read: the caller's row, the RNG, the range budget."""

    __slots__ = ("row", "rng", "range_left", "_owned")

    def __init__(self, row: Mapping[str, Any] | None, rng: random.Random | None):
        self.row, self.rng, self.range_left = row, rng, MAX_RANGE_TOTAL
        self._owned: set[int] | None = None

    def caller_owned(self, obj: Any) -> bool:
        """Is `obj` part of the caller's row? (computed on first use: most templates never ask)"""
        if self._owned is None:
            self._owned = _caller_owned_ids(self.row)
        return id(obj) in self._owned


_STATE: ContextVar[_RenderState | None] = ContextVar("ift_template_render", default=None)
_RECOMPILE = object()  # marks template parts that draw random numbers at compile time
_FIXED = object()  # marks answer choices that are plain text (the same for every row)


class _DrawProbe:
    """Stands in for the rng while compiling, to detect filters Jinja evaluates at compile time."""

    def __init__(self) -> None:
        self.draws = 0

    def choice(self, seq: Sequence[Any]) -> Any:
        self.draws += 1
        return seq[0]


class TemplateLimitError(SecurityError):
    """A template tried to build something too large (memory/CPU bomb)."""


def _check_size(value: Any, what: str = "value") -> Any:
    if isinstance(value, (str, list, tuple, dict, set)) and len(value) > MAX_SIZE:
        raise TemplateLimitError(f"{what} of {len(value):,} items exceeds the limit of {MAX_SIZE:,}")
    return value


def _check_width(args: Iterable[Any]) -> None:
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and arg > MAX_SIZE:
            raise TemplateLimitError(f"width {arg:,} exceeds the limit of {MAX_SIZE:,}")


def _check_percent_format(fmt: str, args: Any) -> None:
    """`'%999999999s' % x` allocates before any length check could run: vet the widths first."""
    for spec in _PERCENT_SPEC_RE.findall(fmt):
        _check_width(int(n) for n in re.findall(r"\d+", spec))
        if "*" in spec:
            _check_width(args if isinstance(args, (tuple, list)) else (args,))


def _caller_owned_ids(row: Mapping[str, Any] | None) -> set[int]:
    """ids of the containers reachable from the caller's row: those a template must not modify."""
    seen: set[int] = set()
    stack: list[Any] = list(row.values()) if row is not None else []
    while stack:
        obj = stack.pop()
        if isinstance(obj, (list, dict, set, tuple)) and id(obj) not in seen:
            seen.add(id(obj))
            stack.extend(obj.values() if isinstance(obj, dict) else obj)
    return seen


@pass_context
def _range(context: Any, *args: int) -> range:
    """range() with a budget shared by all calls of one render, so nested loops cannot explode."""
    result = range(*args)
    state = _STATE.get()
    if state is not None:
        state.range_left -= len(result)
        if state.range_left < 0:
            raise TemplateLimitError(f"range() calls exceed {MAX_RANGE_TOTAL:,} items in one render")
    elif len(result) > MAX_RANGE_TOTAL:
        raise TemplateLimitError(f"range() of {len(result):,} items exceeds {MAX_RANGE_TOTAL:,}")
    return result


def _rng() -> Any:
    state = _STATE.get()
    return state.rng if state is not None and state.rng is not None else random


# promptsource's three filters, same behaviour (`choice` draws from the global `random` unless
# the caller passes an rng, exactly like promptsource, so seeded runs match).
def _highlight(value: Any) -> str:
    return "<span style='color: #F08080'>" + value + "</span>"


def _choice(choices: Any) -> Any:
    return _rng().choice(choices)


def _most_frequent(items: Any) -> list[Any] | None:
    if not items:
        return None
    counts = Counter(items).most_common()
    top = counts[0][1]
    return [item for item, count in counts if count == top]


@pass_context
def _random_filter(context: Any, seq: Any) -> Any:
    """Jinja's own `random` filter, drawing from the render's rng."""
    try:
        return _rng().choice(seq)
    except IndexError:
        return context.environment.undefined("No random item, sequence was empty.")


def _center(value: str, width: int = 80) -> str:
    _check_width((width,))
    return do_center(value, width)


def _indent(s: str, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    if isinstance(width, int):
        _check_width((width * (str(s).count("\n") + 1),))
    return _check_size(do_indent(s, width, first, blank), "indented text")


def _format(value: str, *args: Any, **kwargs: Any) -> str:
    _check_percent_format(str(value), kwargs or args)
    return do_format(value, *args, **kwargs)


@jinja2.pass_eval_context
def _join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
    return _check_size(do_join(eval_ctx, value, d, attribute), "joined text")


class _BoundedNamespace(Namespace):
    """`namespace()` whose attributes cannot grow without bound (`{% set ns.s = ns.s ~ ns.s %}`)."""

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, _check_size(value, f"namespace attribute {name!r}"))


class _BoundedCodeGenerator(CodeGenerator):
    """Routes `~` concatenation through a size check (doubling a string 40 times is 1 TB)."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class PromptSandbox(ImmutableSandboxedEnvironment):
    """The Jinja environment for templates: promptsource's settings inside a hardened sandbox.

    - promptsource's globals and filters (`zip`, `choice`, `most_frequent`, `highlight`).
    - Unsafe attributes (`__class__`, `__globals__`, `_private`, ...) raise at once instead of
      rendering as an empty string, so probing templates fail loudly.
    - Immutable for the caller's data: a template cannot modify the row it is given. Lists and
      dicts the template builds itself may be modified (`{% set xs = [] %}{{ xs.append(1) }}`):
      hundreds of promptsource templates do this, and it touches nothing outside the render.
    - Sizes are bounded: range() budget, `*`, `**`, `+`, `%`, `~`, join, padding, namespace.
    - No loader: `{% import %}`, `{% include %}`, `{% extends %}` cannot reach any file.
    """

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def __init__(self) -> None:
        super().__init__()
        self.globals.pop("lipsum", None)  # lipsum(10**6) is a memory bomb and no template needs it
        self.globals.update(zip=zip, range=_range, namespace=_BoundedNamespace)
        self.filters.update(
            highlight=_highlight, choice=_choice, most_frequent=_most_frequent, random=_random_filter,
            center=_center, indent=_indent, format=_format, join=_join,
        )

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if attr.startswith("_") or jinja2.sandbox.is_internal_attribute(obj, attr):
            return False
        if modifies_known_mutable(obj, attr):
            state = _STATE.get()
            return state is not None and not state.caller_owned(obj)
        return True

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    _check_width((len(seq) * times,))
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                _check_pow(left, right)
        elif operator == "%" and isinstance(left, str):
            _check_percent_format(left, right)
        result = self.binop_table[operator](left, right)
        return _check_size(result, "result") if operator in ("+", "*") else result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        # str.center/ljust/rjust/zfill/expandtabs(10**10) allocate gigabytes: vet the widths.
        if isinstance(__obj, types.BuiltinMethodType) and isinstance(getattr(__obj, "__self__", None), str):
            if __obj.__name__ in ("center", "ljust", "rjust", "zfill", "expandtabs"):
                _check_width(args)
                _check_width(kwargs.values())
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_brace_format(fmt, args, kwargs)
            return wrapped(*args, **kwargs)

        return checked

    @staticmethod
    def bounded_concat(parts: Iterable[Any]) -> str:
        return _check_size("".join(map(str, parts)), "concatenated text")


def _check_pow(base: int, exponent: int) -> None:
    if exponent > 0 and base.bit_length() * exponent > MAX_POWER_BITS:
        raise TemplateLimitError(f"{base} ** {exponent} is too large")


def _check_brace_format(fmt: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """`'{:>999999999}'.format(x)`: vet widths in str.format specs (nested specs: vet the args)."""
    import string

    try:
        specs = [spec for _, name, spec, _ in string.Formatter().parse(fmt) if name is not None and spec]
    except ValueError:
        return  # str.format will raise the same error itself
    for spec in specs:
        _check_width(int(n) for n in re.findall(r"\d+", spec))
        if "{" in spec:
            _check_width([*args, *kwargs.values()])


ENV = PromptSandbox()


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------


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
        """The reference that `TemplateLibrary.get` resolves back to this template."""
        prefix = PROMPTSOURCE_PREFIX if self.source == "promptsource" else ""
        return f"{prefix}{self.dataset}/{self.name}" if self.dataset else self.name

    @property
    def location(self) -> str:
        """`file:line` of the entry, or the reference for templates built in code."""
        if self.path is None:
            return self.ref
        return f"{_display_path(self.path)}:{self.line}" if self.line else _display_path(self.path)

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
        probe = _RenderState(None, _DrawProbe())
        token = _STATE.set(probe)
        try:
            tree = ENV.parse(source)
            if part == "choices" and _plain_text(tree):  # "no ||| yes": no need to compile at all
                self._fixed_choices = _split_choices("".join(n.data for n in tree.find_all(nodes.TemplateData)))
                return _FIXED
            compiled = ENV.from_string(tree)
        except TemplateSyntaxError as err:
            raise self._syntax_error(err, part) from None
        finally:
            _STATE.reset(token)
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
        token = _STATE.set(_RenderState(row, rng))
        try:
            return self._choices(_escape_pipe(row), None)
        finally:
            _STATE.reset(token)

    def apply(self, row: Mapping[str, Any], *, truncate: bool = True, rng: random.Random | None = None,
              index: int | None = None) -> list[str]:
        """Exactly promptsource's `Template.apply(row)`: the rendered text split on `|||`, stripped."""
        protected = _escape_pipe(row)
        if "answer_choices" in protected:
            raise self._error("the row has a column named 'answer_choices', which templates reserve",
                              index, "rename that column")
        token = _STATE.set(_RenderState(row, rng))
        try:
            protected["answer_choices"] = self._choices(protected, index)
            text = self._render(self._get("truncated" if truncate else "jinja"), protected, index)
        finally:
            _STATE.reset(token)
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


def _display_path(path: Path) -> str:
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
    where = _display_path(path)
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
    where = f"{_display_path(file.path)}:{line}" if line else _display_path(file.path)
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
# The library
# --------------------------------------------------------------------------------------------


class TemplateLibrary:
    """All templates we can reach: user folders, the repo's templates/, promptsource's P3 collection.

    References: `name` (with `dataset=`), `dataset/name`, `dataset/subset/name`,
    `promptsource:dataset[/subset]/name`, or a template id (uuid). User folders come first, so a
    user's template shadows a shipped one of the same dataset and name.
    """

    def __init__(self, dirs: Iterable[str | Path] = (), promptsource: bool = True):
        self.dirs: list[Path] = []
        for d in dirs:
            path = Path(d)
            if not path.is_dir():
                raise IftError("templates folder not found", str(d), "pass an existing folder to --templates-dir")
            self.dirs.append(path)
        repo = repo_templates_dir()
        if repo.is_dir() and all(repo.resolve() != d.resolve() for d in self.dirs):
            self.dirs.append(repo)
        self.promptsource_dir = promptsource_templates_dir() if promptsource else None
        self._local: dict[str, list[Path]] = {}
        for root in self.dirs:
            for key, path in find_template_files(root).items():
                if key:  # a templates.yaml directly in the folder: key from its header
                    self._local.setdefault(key, []).append(path)
                else:
                    self._local.setdefault(read_file(path).key, []).append(path)
        self._promptsource: dict[str, Path] = (
            find_template_files(self.promptsource_dir) if self.promptsource_dir else {}
        )
        self._files: dict[Path, TemplateFile] = {}

    # -- reading -------------------------------------------------------------------------------
    def _file(self, path: Path, key: str, source: str) -> TemplateFile:
        file = self._files.get(path)
        if file is None:
            file = self._files[path] = read_file(path, key, source)
            if file.problems and source == "local":
                raise file.problems[0]
        return file

    def _templates(self, key: str, source: str) -> list[Template]:
        if source == "promptsource":
            path = self._promptsource.get(key)
            return self._file(path, key, source).templates if path else []
        return [t for path in self._local.get(key, []) for t in self._file(path, key, source).templates]

    def datasets(self) -> list[str]:
        """Dataset keys: local ones, then promptsource's (prefixed `promptsource:`)."""
        return sorted(self._local) + [PROMPTSOURCE_PREFIX + k for k in sorted(self._promptsource)]

    def list(self, dataset: str | None = None) -> list[Template]:
        """Templates of one dataset (`key` or `promptsource:key`), or of every dataset."""
        if dataset is None:
            return [t for key in self.datasets() for t in self._templates(*_split_source(key))]
        key, source = _split_source(dataset.strip("/"))
        if key not in (self._promptsource if source == "promptsource" else self._local):
            raise IftError(f"no templates for dataset {dataset!r}", None, self._dataset_hint(dataset))
        return self._templates(key, source)

    def _dataset_hint(self, dataset: str) -> str:
        if dataset in self._promptsource:
            return f"promptsource has it: use 'promptsource:{dataset}'"
        close = difflib.get_close_matches(dataset, self.datasets(), n=5, cutoff=0.5)
        if close:
            return "did you mean: " + ", ".join(close)
        return "known datasets: " + (", ".join(sorted(self._local)) or "none") + (
            f" (and {len(self._promptsource)} promptsource datasets)" if self._promptsource else "")

    # -- references ----------------------------------------------------------------------------
    def get(self, ref: str, dataset: str | None = None) -> Template:
        """Resolve a template reference (see the class docstring). Unknown: IftError with close matches."""
        ref = ref.strip()
        body, source = _split_source(ref)
        sources = [source] if ref.startswith(PROMPTSOURCE_PREFIX) else ["local"]
        if _UUID_RE.match(body):
            found = self._by_id(body)
            if found:
                return found
        if dataset is not None:
            key, source = _split_source(dataset.strip("/"))
            found = self._named(key, source, body)
        else:
            found = next((t for s in sources for t in self._by_path(body, s)), None) or self._by_bare_name(body, sources[0])
        if found is None:
            raise IftError(f"unknown template {ref!r}" + (f" for dataset {dataset!r}" if dataset else ""),
                           None, self._ref_hint(ref, dataset))
        return found

    def _named(self, key: str, source: str, name: str) -> Template | None:
        return next((t for t in self._templates(key, source) if t.name == name), None)

    def _by_path(self, body: str, source: str) -> Iterator[Template]:
        """`a/b/c/name`: try the longest dataset key first (names may contain '/')."""
        keys = self._promptsource if source == "promptsource" else self._local
        candidates = sorted((k for k in keys if body.startswith(k + "/")), key=len, reverse=True)
        for key in candidates:
            found = self._named(key, source, body[len(key) + 1:])
            if found:
                yield found

    def _by_bare_name(self, name: str, source: str) -> Template | None:
        if source != "local":
            return None
        matches = [t for key in self._local for t in self._templates(key, "local") if t.name == name]
        if len(matches) > 1:
            raise IftError(f"template name {name!r} is ambiguous", None,
                           "use one of: " + ", ".join(t.ref for t in matches))
        return matches[0] if matches else None

    def _by_id(self, template_id: str) -> Template | None:
        for key in self._local:
            found = next((t for t in self._templates(key, "local") if t.id == template_id), None)
            if found:
                return found
        for key in self._promptsource:
            found = next((t for t in self._templates(key, "promptsource") if t.id == template_id), None)
            if found:
                return found
        return None

    def _ref_hint(self, ref: str, dataset: str | None) -> str:
        if dataset is not None:
            try:
                names = [t.name for t in self.list(dataset)]
            except IftError as err:
                return err.fix or ""
            close = difflib.get_close_matches(ref, names, n=5, cutoff=0.4)
            return ("did you mean: " + ", ".join(close)) if close else ("available: " + ", ".join(names))
        body, source = _split_source(ref)
        keys = self._promptsource if source == "promptsource" else self._local
        key = max((k for k in keys if body.startswith(k + "/")), key=len, default=None)
        if key is not None:  # a known dataset: suggest among its names
            names = [t.name for t in self._templates(key, source)]
            close = difflib.get_close_matches(body[len(key) + 1:], names, n=5, cutoff=0.6)
            prefix = (PROMPTSOURCE_PREFIX if source == "promptsource" else "") + key + "/"
            return ("did you mean: " + ", ".join(prefix + n for n in close)) if close else \
                f"templates of {prefix[:-1]}: " + ", ".join(names)
        refs = [t.ref for t in self.list()]
        close = difflib.get_close_matches(ref, refs, n=5, cutoff=0.5)
        if not close and not ref.startswith(PROMPTSOURCE_PREFIX):
            close = difflib.get_close_matches(PROMPTSOURCE_PREFIX + ref, refs, n=5, cutoff=0.5)
        if close:
            return "did you mean: " + ", ".join(close)
        local = [r for r in refs if not r.startswith(PROMPTSOURCE_PREFIX)]
        return "available: " + (", ".join(local[:20]) or "none") + (" ..." if len(local) > 20 else "") + \
            "; `ift templates list` shows them all"


def _split_source(ref: str) -> tuple[str, str]:
    if ref.startswith(PROMPTSOURCE_PREFIX):
        return ref[len(PROMPTSOURCE_PREFIX):], "promptsource"
    return ref, "local"


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
            raise IftError(f"template {tpl.name!r} already exists for dataset {dataset!r}", _display_path(path),
                           "choose another --name")
        text = _append_entry(path.read_text(encoding="utf-8"), lambda indent: _dump_entry(tpl, indent))
    else:
        dataset_name, _, subset = dataset.partition("/")
        header = yaml.safe_dump({"dataset": dataset_name}, default_flow_style=False)
        header += yaml.safe_dump({"subset": subset}, default_flow_style=False) if subset else ""
        text = header + "templates:\n" + _dump_entry(tpl, 2)
    _check_written(text, path, tpl)
    atomic.write_text(path, text)
    written = read_file(path, dataset)
    return next(t for t in written.templates if t.id == tpl.id)


def default_templates_dir() -> Path:
    """Where `ift templates new` writes: the repo's templates/ in a checkout, else ./templates."""
    repo = repo_templates_dir()
    return repo if repo.is_dir() else Path("templates")


def _mentions_choices(jinja_text: str) -> bool:
    prompt = jinja_text.split(SEPARATOR)[0]
    return "answer_choices" in prompt


def _check_written(text: str, path: Path, tpl: Template) -> None:
    """Read the new text back before writing it: the entry must come back exactly as given."""
    data = yaml.load(text, Loader=_TemplateLoader)
    entry = (data or {}).get("templates", {}).get(tpl.id)
    if not entry or entry.get("jinja") != tpl.jinja or entry.get("answer_choices") != tpl.answer_choices_jinja:
        raise IftError("internal check failed: the new entry does not read back unchanged", _display_path(path),
                       "please report this with the template text")


# --------------------------------------------------------------------------------------------
# Validation: `ift templates validate`
# --------------------------------------------------------------------------------------------


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
