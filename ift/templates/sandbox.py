"""The Jinja sandbox templates run in: promptsource's settings, hardened, with bounded sizes."""

from __future__ import annotations

import random
import re
import types
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.filters import do_center, do_format, do_indent, do_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, modifies_known_mutable
from jinja2.utils import Namespace, pass_context

# Resource bounds: a template must not be able to exhaust memory or CPU with a one-liner.
MAX_SIZE = 10_000_000  # characters / items in any string or list a template builds or outputs
MAX_RANGE_TOTAL = 100_000  # items over all range() calls of one render (stops nested range bombs)
MAX_POWER_BITS = 100_000  # bits of an integer `a ** b`

_PERCENT_SPEC_RE = re.compile(r"%[^a-zA-Z%]*")


class RenderState:
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


RENDER_STATE: ContextVar[RenderState | None] = ContextVar("ift_template_render", default=None)


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
    state = RENDER_STATE.get()
    if state is not None:
        state.range_left -= len(result)
        if state.range_left < 0:
            raise TemplateLimitError(f"range() calls exceed {MAX_RANGE_TOTAL:,} items in one render")
    elif len(result) > MAX_RANGE_TOTAL:
        raise TemplateLimitError(f"range() of {len(result):,} items exceeds {MAX_RANGE_TOTAL:,}")
    return result


def _rng() -> Any:
    state = RENDER_STATE.get()
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
            state = RENDER_STATE.get()
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
