"""ift.templates.library: promptsource-format parsing, rendering equal to promptsource, the sandbox,
validation findings, `new` round trips, and the shipped templates against the real data."""

from __future__ import annotations

import functools
import json
import random
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml
from jinja2 import nodes

from ift.errors import IftError
from ift.templates.checks import validate
from ift.templates.files import add_template, read_file, repo_templates_dir
from ift.templates.library import TemplateLibrary
from ift.templates.sandbox import ENV, MAX_SIZE
from ift.templates.template import PROMPTSOURCE_PREFIX, Template, render_batch, render_row

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SENTIMENT_YAML = """\
dataset: finance_headlines
templates:
  3f2a1c9e-0000-4000-8000-000000000001: !Template
    answer_choices: negative ||| neutral ||| positive
    id: 3f2a1c9e-0000-4000-8000-000000000001
    jinja: "Headline: {{headline}}\\nIs the news positive, negative or neutral? ||| {{answer_choices[label]}}"
    metadata: !TemplateMetadata
      choices_in_prompt: true
      metrics:
      - Accuracy
      original_task: true
    name: headline_sentiment
    reference: ''
  3f2a1c9e-0000-4000-8000-000000000002: !Template
    answer_choices: '{{ options | join(" ||| ") }}'
    id: 3f2a1c9e-0000-4000-8000-000000000002
    jinja: |-
      {% if label != -1 %}
      Pick one of {{ answer_choices | join(", ") }}:
      {{headline}}
      |||
      {{ answer_choices[label] }}
      {% endif %}
    metadata: !TemplateMetadata
      choices_in_prompt: true
      metrics:
      - Accuracy
      original_task: false
    name: pick/one
    reference: a paper
"""


@pytest.fixture()
def lib_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tpl" / "finance_headlines"
    folder.mkdir(parents=True)
    (folder / "templates.yaml").write_text(SENTIMENT_YAML)
    sub = tmp_path / "tpl" / "glue_like" / "sst2"
    sub.mkdir(parents=True)
    (sub / "templates.yaml").write_text(
        "dataset: glue_like\nsubset: sst2\ntemplates:\n"
        "  11111111-2222-4333-8444-555555555555: !Template\n"
        "    answer_choices: bad ||| good\n    id: 11111111-2222-4333-8444-555555555555\n"
        "    jinja: '{{sentence}} ||| {{answer_choices[label]}}'\n    name: headline_sentiment\n    reference: ''\n")
    return tmp_path / "tpl"


@pytest.fixture()
def lib(lib_dir: Path, monkeypatch: pytest.MonkeyPatch) -> TemplateLibrary:
    """Only the test's folder: the repo's own templates/ is left out."""
    monkeypatch.setattr("ift.templates.files.repo_templates_dir", lambda: lib_dir.parent / "no-repo-templates")
    return TemplateLibrary(dirs=[lib_dir], promptsource=False)


def make(jinja_text: str, choices: str | None = None, name: str = "t") -> Template:
    return Template(name=name, id="00000000-0000-4000-8000-000000000000", jinja=jinja_text,
                    answer_choices_jinja=choices, dataset="demo")


# --------------------------------------------------------------------------------------------
# Parsing and rendering
# --------------------------------------------------------------------------------------------


def test_parse_and_render_with_answer_choices(lib: TemplateLibrary) -> None:
    tpl = lib.get("finance_headlines/headline_sentiment")
    assert (tpl.name, tpl.id, tpl.dataset) == ("headline_sentiment", "3f2a1c9e-0000-4000-8000-000000000001",
                                               "finance_headlines")
    assert tpl.metadata.original_task is True and tpl.metadata.metrics == ["Accuracy"]
    assert tpl.answer_choices_jinja == "negative ||| neutral ||| positive"
    assert tpl.variables() == {"headline", "label"}
    row = {"headline": "Shares soar", "label": 2}
    assert tpl.render(row) == ("Headline: Shares soar\nIs the news positive, negative or neutral?", "positive")
    assert tpl.answer_choices(row) == ["negative", "neutral", "positive"]
    assert tpl.line == 3 and tpl.location.endswith("templates.yaml:3")


def test_answer_choices_are_jinja_per_row(lib: TemplateLibrary) -> None:
    tpl = lib.get("pick/one", dataset="finance_headlines")
    row = {"headline": "Fed holds rates", "label": 1, "options": ["down", "flat", "up"]}
    assert tpl.answer_choices(row) == ["down", "flat", "up"]
    assert tpl.render(row) == ("Pick one of down, flat, up:\nFed holds rates", "flat")
    assert tpl.variables() == {"headline", "label", "options"}
    assert tpl.reference == "a paper" and tpl.metadata.original_task is False


def test_row_skipped_when_template_renders_empty(lib: TemplateLibrary) -> None:
    tpl = lib.get("finance_headlines/pick/one")
    row = {"headline": "x", "label": -1, "options": ["a", "b"]}
    assert tpl.apply(row) == [""]
    assert tpl.render(row) == ("", "")
    assert render_row(tpl, row) is None
    assert render_row(make("{{x}} ||| {{y}}"), {"x": "a", "y": ""}) is None
    assert render_row(make("{{x}} ||| {{y}}"), {"x": "", "y": "b"}) is None
    assert render_row(make("{{x}}"), {"x": "no target"}) is None


def test_separator_inside_data_does_not_split() -> None:
    tpl = make("{{a}} ||| {{b}}", "{{a}} ||| other")
    row = {"a": "x ||| y", "b": "z"}
    assert tpl.render(row) == ("x ||| y", "z")
    assert tpl.answer_choices(row) == ["x ||| y", "other"]


def test_more_than_one_separator_is_an_error() -> None:
    with pytest.raises(IftError) as err:
        make("a ||| b ||| c", name="three").render({}, index=7)
    assert err.value.line() == ("template 'demo/three' failed: the template rendered 3 parts separated by '|||' "
                                "(demo/three, row 7) — use '|||' exactly once, between the prompt and the target")


def test_truncation_matches_promptsource_and_can_be_disabled() -> None:
    tpl = make("{{text}} ||| {{label}}")
    long = "w" * 3000
    prompt, _ = tpl.render({"text": long, "label": "a"})
    assert prompt == "w" * 2045 + "..."  # jinja's truncate(2048) with its 5-character leeway
    assert tpl.render({"text": "w" * 2053, "label": "a"})[0] == "w" * 2053
    assert tpl.render({"text": long, "label": "a"}, truncate=False)[0] == long


def test_reserved_answer_choices_column() -> None:
    with pytest.raises(IftError, match="column named 'answer_choices'"):
        make("{{a}} ||| b").render({"a": 1, "answer_choices": 2})


def test_render_error_names_template_row_and_line(lib: TemplateLibrary) -> None:
    tpl = make("line one\n{{ rows[5].x }} ||| t", name="bad")
    with pytest.raises(IftError) as err:
        tpl.render({"rows": []}, index=12)
    assert err.value.line() == (
        "template 'demo/bad' failed: UndefinedError: list object has no element 5 (demo/bad, row 12, jinja line 2)"
        " — fix the template, or check that the row has the fields it uses (`ift templates validate REF --data ...`)")


def test_rng_makes_choice_reproducible() -> None:
    tpl = make("{{ ['a', 'b', 'c', 'd', 'e'] | choice }} {{ x | choice }} ||| {{ [1, 2, 3] | random }}")
    row = {"x": list("abcdefgh")}
    first = [tpl.render(row, rng=random.Random(3)) for _ in range(3)]
    assert first == [tpl.render(row, rng=random.Random(3)) for _ in range(3)]
    # promptsource draws `choice` of constants anew on every apply, and so do we
    assert len({tpl.render(row, rng=random.Random(s))[0] for s in range(20)}) > 1


def test_templates_may_build_their_own_lists_but_not_modify_the_row() -> None:
    tpl = make("{% set xs = [] %}{% for a in items %}{{ xs.append(a * 2) or '' }}{% endfor %}{{ xs }} ||| ok")
    row = {"items": [1, 2]}
    assert tpl.render(row) == ("[2, 4]", "ok")
    with pytest.raises(IftError, match="unsafe operation blocked"):
        make("{{ items.append(3) }} ||| x").render(row)
    with pytest.raises(IftError, match="unsafe operation blocked"):
        make("{{ d.nested.update({'k': 1}) }} ||| x").render({"d": {"nested": {}}})
    assert row == {"items": [1, 2]}


def test_render_batch_and_speed() -> None:
    tpl = make("Review: {{sentence}}\nSentiment? ||| {{answer_choices[label]}}", "negative ||| positive")
    batch = {"sentence": ["good", "bad", ""], "label": [1, 0, 1]}
    assert render_batch(tpl, batch) == [("Review: good\nSentiment?", "positive"),
                                        ("Review: bad\nSentiment?", "negative"),
                                        ("Review: \nSentiment?", "positive")]
    rows = [{"sentence": f"sentence number {i} is fine", "label": i % 2} for i in range(20_000)]
    start = time.perf_counter()
    out = [render_row(tpl, row, i) for i, row in enumerate(rows)]
    rate = len(rows) / (time.perf_counter() - start)
    assert all(out) and rate > 5_000, f"{rate:.0f} rows/s"


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def test_references(lib: TemplateLibrary) -> None:
    by_path = lib.get("finance_headlines/headline_sentiment")
    assert lib.get("headline_sentiment", dataset="finance_headlines") is by_path
    assert lib.get("3f2a1c9e-0000-4000-8000-000000000001") is by_path
    assert lib.get("finance_headlines/pick/one").name == "pick/one"  # names may contain '/'
    sub = lib.get("glue_like/sst2/headline_sentiment")
    assert (sub.dataset, sub.ref) == ("glue_like/sst2", "glue_like/sst2/headline_sentiment")
    assert lib.get("pick/one").ref == "finance_headlines/pick/one"  # bare unique name
    assert lib.datasets() == ["finance_headlines", "glue_like/sst2"]
    assert [t.name for t in lib.list("finance_headlines")] == ["headline_sentiment", "pick/one"]
    assert len(lib.list()) == 3


def test_unknown_and_ambiguous_references(lib: TemplateLibrary) -> None:
    with pytest.raises(IftError) as err:
        lib.get("finance_headlines/headline_sentimnt")
    assert err.value.line() == ("unknown template 'finance_headlines/headline_sentimnt' — did you mean: "
                                "finance_headlines/headline_sentiment")
    with pytest.raises(IftError) as err:
        lib.get("finance_headlines/zzz")
    assert err.value.line() == ("unknown template 'finance_headlines/zzz' — templates of finance_headlines: "
                                "headline_sentiment, pick/one")
    with pytest.raises(IftError) as err:
        lib.get("finance_headline/headline_sentiment")
    assert err.value.line() == ("unknown template 'finance_headline/headline_sentiment' — did you mean: "
                                "finance_headlines/headline_sentiment, glue_like/sst2/headline_sentiment, "
                                "finance_headlines/pick/one")
    with pytest.raises(IftError) as err:
        lib.get("headline_sentiment")
    assert err.value.line() == ("template name 'headline_sentiment' is ambiguous — use one of: "
                                "finance_headlines/headline_sentiment, glue_like/sst2/headline_sentiment")
    with pytest.raises(IftError) as err:
        lib.get("nope", dataset="finance_headlines")
    assert err.value.line() == ("unknown template 'nope' for dataset 'finance_headlines' — available: "
                                "headline_sentiment, pick/one")
    with pytest.raises(IftError, match="no templates for dataset 'finance_headline'.*did you mean: finance_headlines"):
        lib.list("finance_headline")


def test_repo_templates_are_always_included(lib_dir: Path) -> None:
    lib = TemplateLibrary(dirs=[lib_dir], promptsource=False)
    assert repo_templates_dir() in lib.dirs
    assert "financial_phrasebank" in lib.datasets()
    with pytest.raises(IftError, match="templates folder not found"):
        TemplateLibrary(dirs=[lib_dir / "missing"])


def test_promptsource_reference_without_importing_promptsource() -> None:
    lib = TemplateLibrary()
    if lib.promptsource_dir is None:
        pytest.skip("promptsource is not installed")
    tpl = lib.get("promptsource:ag_news/classify_question_first")
    assert tpl.render({"text": "Rain in Spain.", "label": 0}) == (
        "What label best describes this news article?\nRain in Spain.", "World politics")
    assert lib.get("promptsource:anli/guaranteed/possible/impossible").name == "guaranteed/possible/impossible"
    assert lib.get(tpl.id) is tpl
    with pytest.raises(IftError, match="did you mean: promptsource:ag_news/classify_question_first"):
        lib.get("ag_news/classify_question_first")


def test_every_p3_template_is_reachable_by_the_names_users_write() -> None:
    """Some P3 names end in a space (`imdb/Sentiment with choices `); a YAML recipe drops it. Every template of
    the collection resolves to itself by its reference, by its exact name and by its name without the space; a
    near-miss is told names that resolve, never the very name it gave."""
    lib = TemplateLibrary()
    if lib.promptsource_dir is None:
        pytest.skip("promptsource is not installed")
    templates = [t for t in lib.list() if t.source == "promptsource"]
    assert len(templates) > 2000
    spaced = [t for t in templates if t.name != t.name.strip()]
    refs = {t.ref for t in templates}
    assert len(spaced) == 19 and "promptsource:imdb/Sentiment with choices" in {t.ref for t in spaced}
    for tpl in templates:
        exact = f"{PROMPTSOURCE_PREFIX}{tpl.dataset}/{tpl.name}"
        assert not tpl.ref.endswith(" ") and lib.get(tpl.ref) is tpl
        assert lib.get(exact) is tpl and lib.get(exact.strip()) is tpl
        assert lib.get(tpl.name, dataset=PROMPTSOURCE_PREFIX + tpl.dataset) is tpl
        assert lib.get(tpl.name.strip(), dataset=PROMPTSOURCE_PREFIX + tpl.dataset) is tpl
    for tpl in spaced:  # a misspelling: every suggestion resolves, and none is the refused reference
        wrong = tpl.ref[:-1]
        with pytest.raises(IftError) as err:
            lib.get(wrong)
        assert err.value.fix.startswith("did you mean: ")
        listed = f", {err.value.fix.removeprefix('did you mean: ')}, "  # names may hold ", " themselves
        items = sorted((ref for ref in refs if f", {ref}, " in listed), key=listed.index)
        assert f", {', '.join(items)}, " == listed  # each suggestion is a reference that resolves
        assert tpl.ref in items and wrong not in items


# --------------------------------------------------------------------------------------------
# Equality with promptsource over its whole P3 collection
# --------------------------------------------------------------------------------------------

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()
LIST_FILTERS = {"join", "length", "count", "first", "last", "list", "random", "choice", "map", "select",
                "reject", "selectattr", "rejectattr", "sort", "unique", "sum", "max", "min", "batch", "slice",
                "most_frequent", "reverse", "groupby"}
STR_FILTERS = {"lower", "upper", "capitalize", "title", "trim", "replace", "wordcount", "truncate", "center"}
STR_METHODS = {"split", "lower", "upper", "strip", "rstrip", "lstrip", "replace", "startswith", "endswith",
               "capitalize", "title", "find", "index", "count", "splitlines", "join", "isdigit", "isupper"}


class Shape:
    """How a template uses a value: read fields (dict), index or loop over it (list), compare it..."""

    def __init__(self) -> None:
        self.items: Shape | None = None
        self.max_index = 0
        self.fields: dict[str, Shape] = {}
        self.kind: str | None = None
        self.consts: list[Any] = []

    def item(self) -> Shape:
        self.items = self.items or Shape()
        return self.items


class RowBuilder:
    """Builds rows for a template from its Jinja AST, so that most P3 templates render."""

    def __init__(self, sources: list[str]):
        self.shapes: dict[str, Shape] = {}
        for source in sources:
            tree = ENV.parse(source)
            self.parents: dict[int, nodes.Node] = {}
            stack: list[nodes.Node] = [tree]
            while stack:  # one pass over the tree (jinja2.meta would run a whole code generator)
                node = stack.pop()
                for child in node.iter_child_nodes():
                    self.parents[id(child)] = node
                    stack.append(child)
            names = list(tree.find_all(nodes.Name))
            stored = {n.name for n in names if n.ctx != "load"}
            self.undeclared = {n.name for n in names if n.ctx == "load"} - stored - {"answer_choices"} - set(ENV.globals)
            self.loop_vars: dict[str, Shape] = {}
            for loop in tree.find_all(nodes.For):  # `for a in X`: a is an item of X
                shape = self.shape(loop.iter)
                if shape is not None and isinstance(loop.target, nodes.Name):
                    self.loop_vars[loop.target.name] = shape.item()
            for name in names:
                if name.ctx == "load":
                    self.usage(name)

    def shape(self, node: nodes.Node) -> Shape | None:
        if isinstance(node, nodes.Name):
            if node.name in self.loop_vars:
                return self.loop_vars[node.name]
            return self.shapes.setdefault(node.name, Shape()) if node.name in self.undeclared else None
        if isinstance(node, (nodes.Getattr, nodes.Getitem)):
            base = self.shape(node.node)
            key = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
            if base is None or (isinstance(node, nodes.Getattr) and key in STR_METHODS | {"keys", "values", "items"}):
                return None
            if isinstance(key, str):
                return base.fields.setdefault(key, Shape())
            if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
                base.kind = base.kind or "list"
                return None
            base.max_index = max(base.max_index, abs(key)) if isinstance(key, int) else base.max_index
            base.kind = base.kind or "list"
            return base.item()
        return None

    def usage(self, node: nodes.Node) -> None:
        parent = self.parents.get(id(node))
        while isinstance(parent, (nodes.Getattr, nodes.Getitem)) and parent.node is node:
            if isinstance(parent, nodes.Getattr) and parent.attr in STR_METHODS | {"keys", "values", "items"}:
                target = self.shape(node)
                if target is not None and parent.attr in STR_METHODS and not target.fields and not target.items:
                    target.kind = target.kind or "str"
                return
            node, parent = parent, self.parents.get(id(parent))
        target = self.shape(node)
        if target is None:
            return
        if isinstance(parent, nodes.Filter) and parent.node is node:
            target.kind = target.kind or ("list" if parent.name in LIST_FILTERS else
                                          "str" if parent.name in STR_FILTERS else None)
        elif isinstance(parent, nodes.Getitem) and parent.arg is node:
            target.kind = "int"
        elif isinstance(parent, nodes.Compare):
            target.consts += [op.value for op in [parent.expr, *[o.expr for o in parent.ops]]
                              if isinstance(op, nodes.Const) and op.value is not None]
        elif isinstance(parent, nodes.BinExpr):
            other = parent.right if parent.left is node else parent.left
            if isinstance(other, nodes.Const) and type(other.value) in (int, float):
                target.kind = target.kind or "int"

    def build(self, shape: Shape, rng: random.Random, variant: int) -> Any:
        if shape.fields:
            return {k: self.build(v, rng, variant) for k, v in shape.fields.items()}
        if shape.kind == "list" or shape.items is not None:
            return [self.build(shape.items or Shape(), rng, variant) for _ in range(shape.max_index + 2 + variant)]
        if shape.consts and (variant == 0 or rng.random() < 0.5):
            return rng.choice(shape.consts)
        if shape.kind == "int":
            return variant % 2
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))

    def rows(self, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        inferred = [{k: self.build(v, rng, variant) for k, v in sorted(self.shapes.items())} for variant in (0, 1)]
        naive = {k: " ".join(rng.choice(WORDS) for _ in range(3)) for k in sorted(self.shapes)}  # many fail
        return [*inferred, naive]


def rows_for(jinja_text: str, choices: str | None, seed: int) -> list[dict[str, Any]]:
    try:
        return RowBuilder([jinja_text] + ([choices] if choices else [])).rows(seed)
    except jinja2.TemplateSyntaxError:
        return [{}]


def outcome(fn: Any, seed: int) -> tuple[str, Any]:
    random.seed(seed)  # promptsource's `choice` filter draws from the global random module
    try:
        return "ok", fn()
    except IftError as err:
        return "error", err.what
    except Exception as err:  # noqa: BLE001 - promptsource raises whatever Jinja raises
        return "error", type(err).__name__


@pytest.fixture(scope="module")
def promptsource_collection(request: pytest.FixtureRequest) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pst = pytest.importorskip("promptsource.templates")
    # promptsource compiles the template on every apply(); compiling is deterministic, so we reuse
    # compiled templates - except those that draw random numbers while compiling (Jinja folds
    # `["a", "b"] | choice`): promptsource draws anew for those on every apply, so we must too.
    original = pst.env.from_string
    cache: dict[str, Any] = {}

    @functools.wraps(original)
    def from_string(source: str, *args: Any, **kwargs: Any) -> Any:
        if source in cache:
            return cache[source]
        before = random.getstate()
        compiled = original(source, *args, **kwargs)
        if random.getstate() == before:
            cache[source] = compiled
        return compiled

    pst.env.from_string = from_string
    request.addfinalizer(lambda: setattr(pst.env, "from_string", original))
    return pst.TemplateCollection()


def test_rendering_equals_promptsource_on_the_whole_p3_collection(promptsource_collection: Any) -> None:
    state = random.getstate()
    lib = TemplateLibrary(promptsource=True)
    ours = {t.id: t for t in lib.list() if t.source == "promptsource"}
    theirs = {tid: t for dt in promptsource_collection.datasets_templates.values() for tid, t in dt.templates.items()}
    assert ours.keys() == theirs.keys() and len(ours) > 2000
    mismatches: list[Any] = []
    rendered: set[str] = set()  # templates with at least one row rendered to a non-empty pair
    compared = 0
    for tid, ps_tpl in theirs.items():
        tpl = ours[tid]
        assert (tpl.name, tpl.jinja, tpl.answer_choices_jinja) == (ps_tpl.name, ps_tpl.jinja, ps_tpl.answer_choices)
        for i, row in enumerate(rows_for(ps_tpl.jinja, ps_tpl.answer_choices, zlib.crc32(tid.encode()))):
            expected = outcome(lambda: ps_tpl.apply(row), i)
            got = outcome(lambda: tpl.apply(row), i)
            if expected[0] == "ok" and len(expected[1]) == 2:
                got_render = outcome(lambda: list(tpl.render(row)), i)
                if got_render != got:
                    mismatches.append((tpl.ref, i, "render", got_render, got))
            if expected[0] == "ok" and ps_tpl.answer_choices:
                choices = (outcome(lambda: ps_tpl.get_answer_choices_list(row), i),
                           outcome(lambda: tpl.answer_choices(row), i))
                if choices[0] != choices[1]:
                    mismatches.append((tpl.ref, i, "answer_choices", *choices))
            compared += 1
            if (expected[0], got[0]) == ("error", "error"):
                continue  # both fail: agreement
            if expected != got:
                mismatches.append((tpl.ref, i, row, expected, got))
            elif len(got[1]) == 2 and all(got[1]):
                rendered.add(tid)
    random.setstate(state)
    assert not mismatches, mismatches[:5]
    assert compared >= 3 * len(theirs) - 10
    # the built rows must exercise the templates, not just fail on them (about 87% render today)
    assert len(rendered) > 0.8 * len(theirs), f"only {len(rendered)} of {len(theirs)} templates rendered"


# --------------------------------------------------------------------------------------------
# Security: template injection payloads fail safely
# --------------------------------------------------------------------------------------------

INJECTIONS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ text.__class__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__['os'] }}",
    "{{ namespace.__init__.__globals__.__builtins__.__import__('os') }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__init__.__globals__ }}",
    "{{ lipsum.__globals__.os.popen('id').read() }}",
    "{{ range.__globals__ }}",
    "{{ zip.__self__.__import__('os') }}",
    "{{ text | attr('__class__') }}",
    "{{ items | attr('__class__') | attr('__base__') }}",
    "{{ '{0.__class__.__mro__}'.format(text) }}",
    "{{ '{0.__globals__}'.format_map({'0': cycler.__init__}) }}",
    "{{ ('{0.' ~ '__cl' ~ 'ass__}').format(text) }}",
    "{% import 'os' as os %}{{ os }}",
    "{% include '/etc/passwd' %}",
    "{% extends '/etc/passwd' %}",
    "{% from 'os' import system %}{{ system('id') }}",
    "{{ items.append('x') }}",
    "{{ mapping.clear() }}",
    "{{ mapping.update({'a': 1}) }}",
    "{{ items.__setitem__(0, 'x') }}",
    "{{ text.__len__() }}",
    "{{ config.items() }}{{ request.application.__globals__ }}",
    "{% set x = namespace() %}{{ x.__class__.__init__.__globals__ }}",
    "{{ dict.__base__.__subclasses__() }}",
    "{{ (items | map('upper') ).gi_frame }}",
]


@pytest.mark.parametrize("payload", INJECTIONS)
def test_injection_fails_safely(payload: str) -> None:
    row = {"text": "hello", "items": ["a", "b"], "mapping": {"k": "v"}}
    snapshot = json.dumps(row)
    for truncate in (True, False):
        with pytest.raises(IftError) as err:
            make(payload + " ||| x", name="evil").render(row, truncate=truncate, index=0)
        line = err.value.line()
        assert line.startswith("template 'demo/evil' failed: ") and "(demo/evil, row 0, jinja line 1)" in line
        assert "0x" not in line and "Traceback" not in line and "posix" not in line
    assert json.dumps(row) == snapshot  # the row was not modified


BOMBS = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ range(10**9) | list }}",
    "{% set s = 'a' * 10**9 %}",
    "{% set n = 9 ** 999999 %}",
    "{% set s = '%0999999999d' % 1 %}",
    "{% set s = '{:>999999999}'.format('x') %}",
    "{% set s = 'x'.center(10**10) %}",
    "{% set s = 'x'.ljust(10**10) %}",
    "{{ 'x' | center(10**10) }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(s=['ab']) %}{% for i in range(60) %}{% set ns.s = [ns.s, ns.s] | join %}{% endfor %}",
    "{% set a = 'abcdefghij' * 1000 %}{% set b = a ~ a ~ a ~ a %}{% set c = b ~ b ~ b ~ b %}"
    "{% set d = c ~ c ~ c ~ c %}{% set e = d ~ d ~ d ~ d %}{% set f = e ~ e ~ e ~ e %}{{ f ~ f }}",
    "{% for i in range(99999) %}{{ 'x' * 999 }}{% endfor %}",
    "{{ lipsum(10**6) }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
]


@pytest.mark.parametrize("payload", BOMBS)
def test_resource_bombs_fail_fast(payload: str) -> None:
    start = time.perf_counter()
    with pytest.raises(IftError) as err:
        make(payload + " ||| x", name="bomb").render({}, truncate=False, index=3)
    assert time.perf_counter() - start < 5
    assert err.value.line().startswith("template 'demo/bomb' failed: ")


def test_size_limit_is_generous_for_real_text() -> None:
    text = "word " * 200_000  # 1 MB of text renders fine
    assert make("{{ t }} ||| {{ t | upper }}").render({"t": text}, truncate=False)[0] == text.strip()
    assert MAX_SIZE >= 10 * len(text)


# --------------------------------------------------------------------------------------------
# Validation findings
# --------------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def entry(tid: str, name: str, jinja_text: str, choices: str | None = None) -> str:
    return ("  {id}: !Template\n    answer_choices: {c}\n    id: {id}\n    jinja: {j}\n"
            "    metadata: !TemplateMetadata\n      original_task: true\n    name: {n}\n    reference: ''\n"
            ).format(id=tid, c=json.dumps(choices) if choices else "null", j=json.dumps(jinja_text), n=name)


UID = "aaaaaaaa-0000-4000-8000-{:012d}"


def findings_for(path: Path, rows: list[dict[str, Any]] | None = None) -> list[str]:
    file = read_file(path, path.parent.name)
    return [f.line() for f in validate(file.templates, rows, None, [file])]


def test_validate_clean(tmp_path: Path) -> None:
    path = write(tmp_path / "news" / "templates.yaml",
                 "dataset: news\ntemplates:\n" + entry(UID.format(1), "ok", "{{h}} ||| {{l}}", "neg ||| pos"))
    assert findings_for(path, [{"h": "a", "l": "neg"}, {"h": "b", "l": "pos"}]) == []


def test_validate_reports_every_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    text = "dataset: news\ntemplates:\n" + "".join([
        entry(UID.format(1), "unknown_var", "{{headlin}} ||| {{label}}"),
        entry(UID.format(2), "empty_prompt", "{{ maybe }} ||| {{label}}"),
        entry(UID.format(3), "empty_target", "{{headline}} ||| {% if label == 'pos' %}{{label}}{% endif %}"),
        entry(UID.format(4), "off_choices", "{{headline}} ||| {{label}}", "negative ||| positive"),
        entry(UID.format(5), "dup", "{{headline}} ||| {{label}}"),
        entry(UID.format(6), "dup", "{{headline}} ||| {{label}}"),
        entry(UID.format(7), "syntax", "{{headline}\n||| {{label}}"),
        entry(UID.format(8), "no_separator", "{{headline}} {{label}}"),
        entry(UID.format(9), "fails", "{{headline}} ||| {{ label.missing.deeper }}"),
        entry(UID.format(10), "three_parts", "{{headline}} ||| {{label}} ||| more"),
        entry(UID.format(11), "bad_choices", "{{headline}} ||| {{label}}", "{% if %}"),
    ])
    path = write(tmp_path / "news" / "templates.yaml", text)
    rows = [{"headline": "up", "label": "pos", "maybe": "x"}, {"headline": "down", "label": "neg", "maybe": ""}]
    found = findings_for(path, rows)
    at = {k: f"news/templates.yaml:{3 + 8 * (k - 1)}" for k in range(1, 12)}  # each entry is 8 lines
    assert found == [
        f"duplicate template name 'dup' in dataset 'news' ({at[5]}, {at[6]}) — give each template a unique name",
        f"template 'news/unknown_var' uses unknown variable 'headlin' ({at[1]}) — the data has no column 'headlin';"
        " available columns: headline, label, maybe",
        f"template 'news/empty_prompt' renders an empty prompt for 1 of 2 rows ({at[2]}, first row 1) — rows with an"
        " empty prompt or target are skipped; check the fields the template uses",
        f"template 'news/empty_target' renders an empty target for 1 of 2 rows ({at[3]}, first row 1) — rows with an"
        " empty prompt or target are skipped; check the fields the template uses",
        f"template 'news/off_choices': target 'pos' is not among answer_choices for 2 of 2 rows ({at[4]}, first row 0)"
        " — answer_choices are ['negative', 'positive']; make the target one of them (e.g. {{answer_choices[label]}})",
        f"Jinja syntax error in jinja of template 'news/syntax' at line 1: unexpected '}}' ({at[7]}) — fix the Jinja"
        " syntax",
        f"template 'news/no_separator' has no '|||' separator ({at[8]}) — write the prompt, then '|||', then the target",
        f"template 'news/fails' failed: UndefinedError: 'str object' has no attribute 'missing' ({at[9]}, row 0, jinja"
        " line 1; 2 of 2 rows fail) — fix the template, or check that the row has the fields it uses (`ift templates"
        " validate REF --data ...`)",
        f"template 'news/three_parts' failed: the template rendered 3 parts separated by '|||' ({at[10]}, row 0; 2 of 2"
        " rows fail) — use '|||' exactly once, between the prompt and the target",
        f"Jinja syntax error in answer_choices of template 'news/bad_choices' at line 1: Expected an expression, got "
        f"'end of statement block' ({at[11]}) — fix the Jinja syntax",
    ]


def test_validate_duplicate_ids_structure_and_yaml_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    a = write(tmp_path / "a" / "templates.yaml", "dataset: a\ntemplates:\n" + entry(UID.format(1), "x", "{{t}} ||| y"))
    b = write(tmp_path / "b" / "templates.yaml", "dataset: wrong\ntemplates:\n" + entry(UID.format(1), "x", "{{t}} ||| y")
              + "  bbbbbbbb-0000-4000-8000-000000000000: !Template\n    name: no_jinja\n"
              + "  cccccccc-0000-4000-8000-000000000000: !Template\n    name: off\n    jinja: a ||| b\n")
    files = [read_file(a, "a"), read_file(b, "b")]
    found = [f.line() for f in validate([t for f in files for t in f.templates], None, None, files)]
    assert found == [
        "file says dataset 'wrong' but lives in folder 'b' (b/templates.yaml) — put it in templates/wrong/ "
        "or fix the 'dataset'/'subset' keys",
        "template 'bbbbbbbb-0000-4000-8000-000000000000' has no jinja (b/templates.yaml:11) — add a non-empty "
        "`jinja:` string",
        "template 'cccccccc-0000-4000-8000-000000000000': name must be a string, got False (b/templates.yaml:13) — "
        "quote it: name: '...'",
        f"duplicate template id '{UID.format(1)}' (a/templates.yaml:3, b/templates.yaml:3) — give each template a fresh"
        " uuid (python -c 'import uuid; print(uuid.uuid4())')",
    ]
    bad = write(tmp_path / "c" / "templates.yaml", "dataset: c\ntemplates:\n  x: !Template\n    name: [unclosed\n")
    with pytest.raises(IftError) as err:
        read_file(bad)
    assert err.value.line().startswith("YAML syntax error: ") and "(c/templates.yaml:5)" in err.value.line()


def test_truncation_rewrite_breaking_a_template_is_explained() -> None:
    tpl = make("{{ text -}} ||| x", name="ws")
    assert tpl.render({"text": "a "}, truncate=False) == ("a", "x")
    with pytest.raises(IftError, match="after promptsource's truncation rewrite"):
        tpl.render({"text": "a"})


# --------------------------------------------------------------------------------------------
# `new`: append-only, atomic, loadable by promptsource
# --------------------------------------------------------------------------------------------


def test_new_round_trip(tmp_path: Path, lib_dir: Path) -> None:
    path = lib_dir / "finance_headlines" / "templates.yaml"
    before = path.read_bytes()
    tpl = add_template("finance_headlines", "short", "{{headline}}\n\nSentiment?\n|||\n{{answer_choices[label]}}",
                       "negative ||| neutral ||| positive", templates_dir=lib_dir, original_task=True)
    after = path.read_bytes()
    assert after.startswith(before) and len(after) > len(before)  # existing entries byte-for-byte unchanged
    assert [p.name for p in path.parent.iterdir()] == ["templates.yaml"]  # no temp file left behind
    lib = TemplateLibrary(dirs=[lib_dir], promptsource=False)
    again = lib.get("finance_headlines/short")
    assert again.id == tpl.id and again.metadata.original_task and again.metadata.choices_in_prompt is False
    assert [t.name for t in lib.list("finance_headlines")] == ["headline_sentiment", "pick/one", "short"]
    assert again.render({"headline": "Up", "label": 2}) == ("Up\n\nSentiment?", "positive")
    # a second one, in a new file with a subset
    add_template("brand_new/sub", "first", "{{a}} ||| {{b}}", templates_dir=lib_dir)
    assert (lib_dir / "brand_new" / "sub" / "templates.yaml").read_text().startswith(
        "dataset: brand_new\nsubset: sub\ntemplates:\n")
    with pytest.raises(IftError, match="already exists"):
        add_template("finance_headlines", "short", "{{a}} ||| b", templates_dir=lib_dir)
    with pytest.raises(IftError, match="no '|||' separator"):
        add_template("finance_headlines", "other", "{{a}}", templates_dir=lib_dir)
    with pytest.raises(IftError, match="Jinja syntax error"):
        add_template("finance_headlines", "other", "{{a ||| b", templates_dir=lib_dir)
    assert path.read_bytes() == after  # failed attempts leave the file alone


def test_new_appends_to_files_promptsource_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pst = pytest.importorskip("promptsource.templates")
    monkeypatch.setattr(pst, "TEMPLATES_FOLDER_PATH", str(tmp_path))
    theirs = pst.DatasetTemplates("ps_written")
    theirs.add_template(pst.Template("by_promptsource", "{{x}} ||| {{y}}", "", answer_choices="a ||| b"))
    path = tmp_path / "ps_written" / "templates.yaml"
    before = path.read_bytes()
    ours = add_template("ps_written", "by_ift", "Q: {{x}}\nA:\n|||\n{{answer_choices[y]}}", "a ||| b",
                        templates_dir=tmp_path)
    assert path.read_bytes().startswith(before)
    reloaded = pst.DatasetTemplates("ps_written")  # promptsource itself reads the file we wrote
    assert sorted(reloaded.all_template_names) == ["by_ift", "by_promptsource"]
    row = {"x": "why?", "y": 1}
    assert reloaded["by_ift"].apply(row) == list(ours.render(row)) == ["Q: why?\nA:", "b"]
    assert reloaded["by_ift"].get_answer_choices_list(row) == ours.answer_choices(row) == ["a", "b"]
    assert reloaded["by_ift"].metadata.original_task is False


def test_new_into_empty_templates_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "empty" / "templates.yaml", "dataset: empty\ntemplates: {}\n")
    add_template("empty", "one", "{{a}} ||| {{b}}", templates_dir=tmp_path)
    data = yaml.safe_load(path.read_text().replace("!TemplateMetadata", "").replace("!Template", ""))
    assert [t["name"] for t in data["templates"].values()] == ["one"]
    assert read_file(path).templates[0].name == "one"


# --------------------------------------------------------------------------------------------
# Shipped templates
# --------------------------------------------------------------------------------------------

SHIPPED = {  # dataset key -> (data file, split file or None)
    "dialogsum": ("dialogsum", "train.jsonl"),
    "financial_phrasebank": ("financial_phrasebank_allagree", "all.jsonl"),
    "tweet_eval_emotion": ("tweet_eval_emotion", "validation.jsonl"),
    "glue_sst2": ("glue_sst2", "validation.jsonl"),
    "pubmedqa_pqal": ("pubmedqa_pqal", "test.jsonl"),
}


def test_shipped_templates_are_valid_promptsource_files() -> None:
    lib = TemplateLibrary(promptsource=False)
    keys = set(SHIPPED) | {"finance_news", "support_summaries"}
    assert keys <= set(lib.datasets())
    for key in keys:
        templates = lib.list(key)
        assert 3 <= len(templates) <= 5, key
        assert any(t.metadata.original_task for t in templates), key
        file = read_file(repo_templates_dir() / key / "templates.yaml", key)
        assert validate(file.templates, files=[file]) == []


def test_project_templates_render_project_columns() -> None:
    lib = TemplateLibrary(promptsource=False)
    news = [render_row(t, {"headline": "Profit falls 20%", "label": "negative"}) for t in lib.list("finance_news")]
    assert all(pair and pair[1] == "negative" for pair in news)
    support = [render_row(t, {"text": "Customer: my card was charged twice.", "summary": "Refund issued."})
               for t in lib.list("support_summaries")]
    assert all(pair and pair[1] == "Refund issued." for pair in support)


@pytest.mark.parametrize("key", sorted(SHIPPED))
def test_shipped_templates_against_real_rows(key: str) -> None:
    folder, filename = SHIPPED[key]
    path = DATA / folder / filename
    if not path.exists():
        pytest.skip(f"{path} not present")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:500]]
    templates = TemplateLibrary(promptsource=False).list(key)
    assert validate(templates, rows) == []
    for tpl in templates:
        assert all(render_row(tpl, row, i) for i, row in enumerate(rows))
