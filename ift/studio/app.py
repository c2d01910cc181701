"""The studio's web app: the templates page and the runs page, and the fragments htmx swaps into them.

Each request reads the page's fields, calls the library (ift.templates, ift.data, ift.evaluation) and renders a
fragment of HTML. Errors never leave a handler: an IftError is shown where its result would have been, and any
other exception as one line naming it; the server keeps serving.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jinja2
import markupsafe
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ift.errors import IftError, IftErrors
from ift.evaluation.compare import fmt
from ift.studio import drafts, runs, saving, sources, tokens
from ift.templates.library import TemplateLibrary
from ift.templates.template import PROMPTSOURCE_PREFIX

HERE = Path(__file__).resolve().parent
PAGE_ROWS = 10  # rows per page of the row browser
MAX_CELL = 300  # characters of a value the row browser shows
log = logging.getLogger("ift.studio")


@dataclass
class StudioConfig:
    """What `ift studio` was started with: where templates live, what to open first, where runs are."""

    templates_dirs: list[str] = field(default_factory=list)
    promptsource: bool = True
    data_map: str = ""
    source: sources.SourceSpec | None = None
    split: str = "train"
    save_path: str = ""
    runs_dir: str = "runs"
    run: str = ""
    tokenizer: str = ""
    # Host header values served (None: any). On loopback only the loopback names, so a page that rebinds its own
    # domain name to 127.0.0.1 still cannot reach the studio
    allowed_hosts: list[str] | None = None


class _Cache(OrderedDict):
    """The few most recently opened sources and tokenizers (a source's splits stay memory-mapped by datasets)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key: Any, make: Callable[[], Any]) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class Studio:
    def __init__(self, config: StudioConfig):
        self.config = config
        self.sources = _Cache(4)
        self.encoders = _Cache(3)
        self.lock = threading.Lock()  # one request at a time touches datasets and tokenizers
        self.pages = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "pages"), autoescape=True,
                                        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.pages.filters["cut"] = _cut
        self.pages.globals.update(fmt=fmt, outcome=runs.outcome)

    # -- helpers -------------------------------------------------------------------------------
    def page(self, page_name: str, **context: Any) -> str:
        return self.pages.get_template(page_name).render(**context)

    def library(self, extra: list[str] = ()) -> TemplateLibrary:
        return TemplateLibrary(dirs=[*self.config.templates_dirs, *extra], promptsource=self.config.promptsource)

    def open_source(self, spec: sources.SourceSpec) -> sources.OpenedSource:
        return self.sources.get_or(spec, lambda: sources.open_source(spec))

    def encoder(self, spec: tokens.TokenizerSpec) -> tokens.Encoder:
        return self.encoders.get_or(spec, lambda: tokens.load_encoder(spec))

    def spec_of(self, form: dict[str, Any], prefix: str = "") -> sources.SourceSpec:
        return sources.SourceSpec(
            origin=form.get(prefix + "origin") or "path", path=form.get(prefix + "source", ""),
            config=form.get(prefix + "config", ""), recipe=form.get(prefix + "recipe", ""),
            index=_int(form.get(prefix + "recipe_source"), 0), data_map=self.config.data_map)

    def opened(self, form: dict[str, Any]) -> tuple[sources.OpenedSource | None, str]:
        """The source the page has open (not the one being typed), and its split."""
        raw = form.get("opened", "")
        if not raw:
            return None, ""
        spec = sources.SourceSpec(**json.loads(raw))
        return self.open_source(spec), form.get("opened_split", "")

    def key_for(self, source: sources.OpenedSource, library: TemplateLibrary) -> str:
        """The library key of the source's templates: a recipe's own, else a local or P3 key its name matches."""
        for ref in source.template_refs:
            try:
                tpl = library.get(ref)
            except IftError:
                continue
            return (PROMPTSOURCE_PREFIX if tpl.source == "promptsource" else "") + tpl.dataset
        known = set(library.datasets())
        for key in source.dataset_keys():
            for candidate in (key, PROMPTSOURCE_PREFIX + key):
                if candidate in known:
                    return candidate
        return ""

    # -- templates page ------------------------------------------------------------------------
    def index(self, form: dict[str, Any]) -> str:
        spec = self.config.source or sources.SourceSpec(data_map=self.config.data_map)
        return self.page("index.html", spec=spec, split=self.config.split, save_path=self.config.save_path,
                         tokenizer=self.config.tokenizer, chat_choices=tokens.CHAT_CHOICES,
                         open_now=self.config.source is not None, draft=drafts.Draft(name="", jinja=""),
                         data_map=self.config.data_map)

    def source(self, form: dict[str, Any]) -> str:
        opening = form.get("action") == "open"
        if opening:
            spec = self.spec_of(form)
            split = form.get("split", "").strip()
        else:
            source, split = self.opened(form)
            if source is None:
                raise IftError("no source is open", "source", "type a file, folder, Hub id or recipe and press Open")
            spec = source.spec
        source = self.open_source(spec)
        split = split if split in source.splits else source.first_split()
        ds = source.split(split)
        page = max(0, min(_int(form.get("page"), 0), max(len(ds) - 1, 0) // PAGE_ROWS))
        selected = sorted({i for i in _ints(form.getlist("rows")) if 0 <= i < len(ds)}) if not opening else \
            list(range(min(3, len(ds))))
        label_columns = source.label_columns(split)
        label_column = form.get("label_column") if form.get("label_column") in label_columns else (
            label_columns[0] if label_columns else "")
        counts = source.label_counts(split, label_column) if label_column else []
        html = self.page(
            "source.html", source=source, spec_json=json.dumps(asdict(spec)), split=split, total=len(ds),
            columns=source.columns(split), rows=source.rows(split, page * PAGE_ROWS, PAGE_ROWS), page=page,
            pages=max(1, -(-len(ds) // PAGE_ROWS)), selected=selected, page_size=PAGE_ROWS,
            label_columns=label_columns, label_column=label_column, counts=counts,
            counted=sum(n for _, n in counts))
        if opening:  # the templates this source has, and a draft to start from when the editor is empty
            library = self.library(source.templates_dirs)
            key = self.key_for(source, library)
            html += self.start(dict(library_key=key, oob="1"), library)
            if not form.get("jinja", "").strip():
                html += self.editor_for(source, split, library, key)
        return html

    def start(self, form: dict[str, Any], library: TemplateLibrary | None = None) -> str:
        """The "start from" picker: library keys, and the templates of the chosen one."""
        source, _ = self.opened(form) if form.get("opened") else (None, "")
        library = library or self.library(source.templates_dirs if source else [])
        key = form.get("library_key", "").strip()
        options, problem = [], None
        if key:
            try:
                options = [(t.ref, t.name.strip() + (" (promptsource)" if t.source == "promptsource" else ""))
                           for t in library.list(key)]
            except IftError as err:
                problem = err
        return self.page("start.html", key=key, keys=library.datasets(), options=options, problem=problem,
                         oob=bool(form.get("oob")))

    def editor_for(self, source: sources.OpenedSource, split: str, library: TemplateLibrary, key: str) -> str:
        ref = next(iter(source.template_refs), None)
        draft = None
        if ref is not None or key:
            try:
                tpl = library.get(ref) if ref is not None else library.list(key)[0]
                draft = drafts.Draft.from_template(tpl, keep_id=tpl.source == "local")
                if tpl.source == "local" and tpl.path is not None:
                    return self.page("editor.html", draft=draft, oob=True, save_path=str(tpl.path), refresh=True)
            except (IftError, IndexError):
                draft = None
        if draft is None:
            name = key.removeprefix(PROMPTSOURCE_PREFIX) or (source.dataset_keys() or ["my_dataset"])[-1]
            draft = drafts.Draft.starter(name, source.split(split).column_names)
        return self.page("editor.html", draft=draft, oob=True, save_path=None, refresh=True)

    def load_template(self, form: dict[str, Any]) -> str:
        """The editor filled with the template picked under "start from"."""
        ref = form.get("start_from", "")
        source, split = self.opened(form) if form.get("opened") else (None, "")
        if ref == "__blank__" or not ref:
            columns = source.split(split).column_names if source else []
            key = form.get("library_key", "").removeprefix(PROMPTSOURCE_PREFIX) or form.get("dataset", "")
            return self.page("editor.html", draft=drafts.Draft.starter(key, columns), oob=False, save_path=None,
                             refresh=True)
        library = self.library(source.templates_dirs if source else [])
        tpl = library.get(ref)
        local = tpl.source == "local"
        return self.page("editor.html", draft=drafts.Draft.from_template(tpl, keep_id=local), oob=False,
                         save_path=str(tpl.path) if local and tpl.path else None, refresh=True)

    def preview(self, form: dict[str, Any]) -> str:
        draft = draft_of(form)
        tpl = draft.template()
        source, split = self.opened(form)
        context: dict[str, Any] = dict(selected=[], sample=[], token_rows=[], token_error=None, source=None,
                                       checked_rows=0, seed=_int(form.get("seed"), 0))
        if source is None:
            context["findings"] = drafts.check(tpl, None, None)
            return self.page("preview.html", **context)
        ds = source.split(split)
        head = ds.select(range(min(len(ds), drafts.VALIDATION_ROWS))).to_list()
        findings = drafts.check(tpl, head, ds.column_names)
        picked = sorted({i for i in _ints(form.getlist("rows")) if 0 <= i < len(ds)})
        sample = drafts.sample_indices(len(ds), _int(form.get("sample_n"), 3), context["seed"])
        selected = drafts.render(tpl, [(i, ds[i]) for i in picked], context["seed"])
        context.update(source=source, split=split, findings=findings, checked_rows=len(head), selected=selected,
                       sample=drafts.render(tpl, [(i, ds[i]) for i in sample], context["seed"]))
        if form.get("tokenizer", "").strip():
            try:
                spec = tokens.TokenizerSpec(form["tokenizer"].strip(), form.get("kind") or "auto",
                                            form.get("chat_template", ""), _int(form.get("max_length"), 0) or None)
                usable = [(r.index, r.prompt, r.target, r.choices) for r in selected if not r.error and not r.skipped]
                context["token_rows"] = tokens.token_rows(self.encoder(spec), usable)
                context["tokenizer_kind"] = self.encoder(spec).kind
            except IftError as err:
                context["token_error"] = err
        return self.page("preview.html", **context)

    def save(self, form: dict[str, Any]) -> str:
        tpl = draft_of(form).template()
        source, _ = self.opened(form) if form.get("opened") else (None, "")
        entry = None
        if source is not None:
            declared = source.declared
            entry = {"path": declared.path, **({"config": declared.config} if declared.config else {})}
        saved = saving.save(tpl, form.get("save_path", ""), entry)
        return self.page("saved.html", saved=saved)

    # -- runs page -----------------------------------------------------------------------------
    def runs_page(self, form: dict[str, Any]) -> str:
        found = runs.list_runs(Path(self.config.runs_dir))
        return self.page("runs.html", found=[str(p) for p in found], run=self.config.run,
                         runs_dir=self.config.runs_dir)

    def run_view(self, form: dict[str, Any]) -> str:
        path = form.get("run", "").strip()
        if not path:
            raise IftError("no run folder given", "run", "type the folder a training run wrote, e.g. runs/quickstart")
        view = runs.open_run(path)
        first = ""
        if view.predictions:
            try:
                first = self.predictions({"run": path, "predictions": view.predictions[0]})
            except IftError as err:  # a broken predictions file: the rest of the run still shows
                first = self.page("error.html", errors=errors_of(err))
        return self.page("run.html", view=view, run=path, first_predictions=markupsafe.Markup(first))

    def predictions(self, form: dict[str, Any]) -> str:
        path, name = form.get("run", "").strip(), form.get("predictions", "")
        rows = runs.read_predictions(path, name)
        every = runs.filter_predictions(rows)
        # a filter the file has no value for (another file's template) is dropped, not applied
        template = form.get("template", "") if form.get("template", "") in every.templates else ""
        label = form.get("label", "") if form.get("label", "") in every.labels else ""
        result = form.get("result", "") if form.get("result", "") in ("right", "wrong", "not scored") else ""
        found = runs.filter_predictions(rows, template, label, result)
        return self.page("predictions.html", found=found, shown=found.rows[:runs.SHOWN], name=name,
                         template=template, label=label, result=result, oob=False)


# ------------------------------------------------------------------------------------------------
# Reading the page's fields
# ------------------------------------------------------------------------------------------------


class _Form(dict):
    """Form fields: the last value of each, and every value of repeated ones (checkboxes)."""

    def __init__(self, items: list[tuple[str, str]]):
        super().__init__()
        self.multi: dict[str, list[str]] = {}
        for key, value in items:
            value = value.replace("\r\n", "\n") if isinstance(value, str) else ""  # textareas post CRLF
            self[key] = value
            self.multi.setdefault(key, []).append(value)

    def getlist(self, key: str) -> list[str]:
        return self.multi.get(key, [])


def draft_of(form: dict[str, Any]) -> drafts.Draft:
    return drafts.Draft(
        dataset=form.get("dataset", ""), name=form.get("name", ""), jinja=form.get("jinja", ""),
        choices=form.get("choices", ""), id=form.get("tpl_id", "") or drafts.Draft().id,
        original_task=form.get("original_task") == "on", choices_in_prompt=form.get("choices_in_prompt") == "on",
        metrics=[m.strip() for m in form.get("metrics", "").split(",") if m.strip()],
        languages=[m.strip() for m in form.get("languages", "").split(",") if m.strip()],
        reference=form.get("reference", ""))


def _int(value: Any, default: int) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return default


def _ints(values: list[str]) -> list[int]:
    return [int(v) for v in values if str(v).strip().lstrip("-").isdigit()]


def _cut(value: Any, limit: int = MAX_CELL) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "…"


def errors_of(err: IftError) -> list[IftError]:
    return list(err.errors) if isinstance(err, IftErrors) else [err]


# ------------------------------------------------------------------------------------------------
# The Starlette app
# ------------------------------------------------------------------------------------------------


def create_app(config: StudioConfig) -> Starlette:
    studio = Studio(config)

    def guarded(work: Callable[[dict[str, Any]], str]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if request.method == "POST" and not _same_origin(request):
                return HTMLResponse(studio.page("error.html", errors=[IftError(
                    "request from another site refused", request.headers.get("origin"),
                    "use the studio from its own page")]), status_code=403)
            if request.method == "POST":
                async with request.form(max_files=0, max_fields=5000, max_part_size=10 * 2**20) as raw:
                    form = _Form(list(raw.multi_items()))
            else:
                form = _Form(list(request.query_params.multi_items()))

            def run() -> str:
                with studio.lock:
                    return work(form)

            try:
                return HTMLResponse(await run_in_threadpool(run))
            except IftError as err:
                return HTMLResponse(studio.page("error.html", errors=errors_of(err)))
            except Exception as err:  # noqa: BLE001 - the page says what failed; the server keeps serving
                log.exception("ift studio: %s failed", request.url.path)
                problem = IftError(f"{type(err).__name__}: {err}"[:500], request.url.path,
                                   "this is a bug in ift studio; the terminal running it has the details")
                return HTMLResponse(studio.page("error.html", errors=[problem]))
        return endpoint

    async def plot(request: Request) -> Response:
        try:
            path = runs.plot_path(request.query_params.get("run", ""), request.query_params.get("name", ""))
        except IftError as err:
            return Response(err.line(), status_code=404, media_type="text/plain")
        return FileResponse(path, media_type="image/png")

    routes = [
        Route("/", guarded(studio.index)),
        Route("/source", guarded(studio.source), methods=["POST"]),
        Route("/start", guarded(studio.start), methods=["POST"]),
        Route("/template", guarded(studio.load_template), methods=["POST"]),
        Route("/preview", guarded(studio.preview), methods=["POST"]),
        Route("/save", guarded(studio.save), methods=["POST"]),
        Route("/runs", guarded(studio.runs_page)),
        Route("/runs/view", guarded(studio.run_view), methods=["POST"]),
        Route("/runs/predictions", guarded(studio.predictions), methods=["POST"]),
        Route("/runs/plot", plot),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=config.allowed_hosts)] \
        if config.allowed_hosts else []
    app = Starlette(routes=routes, middleware=middleware)
    app.state.studio = studio
    return app


def _same_origin(request: Request) -> bool:
    """A POST from the studio's own page (or from no page at all: curl, tests). Another site's page in the same
    browser cannot make the studio write files."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    return urlparse(origin).netloc == request.headers.get("host", "")
