"""Rendering: templates (or a conversational format, or raw text) turn a split's raw rows into prepared rows."""

from __future__ import annotations

import json
import random
from typing import Any, Sequence

import numpy as np

from ift.data.cache import BATCH, CODE_VERSION, cache_file_path, conversation_cache_key, cache_fingerprint, pair_hash, stable_int
from ift.data.formats import FORMATS as CONVERSATION_FORMATS, DEFAULT_COLUMNS, conversation_tools
from ift.data.sources import format_columns, normalize_source_row, LoadedSource
from ift.errors import IftError
from ift.recipe import SPLITS, DataConfig, SourceConfig

# of every prepared split; `messages` holds a conversational row's whole conversation (empty for template rows),
# `prompt`/`completion` its last user turn and final reply (what evaluation answers and scores)
COLUMNS = ("prompt", "completion", "choices", "source", "template", "messages")


def _features() -> Any:
    import datasets

    return datasets.Features({
        "prompt": datasets.Value("string"), "completion": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")), "source": datasets.Value("string"),
        "template": datasets.Value("string"), "_pair": datasets.Value("int64"),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        # a conversation with tool calls, tool ids, reasoning or tools: the whole of it as JSON ({"messages",
        # "tools"}, what encoding reads); "" for plain {role, content} conversations and template rows
        "chat": datasets.Value("string"),
    })


def resolve_templates(data: DataConfig, library: Any) -> tuple[list[list[Any]], list[Any], list[IftError]]:
    """Template objects per source (and the fixed evaluation template), every bad ref reported."""
    per_source, eval_fixed, errors = [], [], []
    for i, src in enumerate(data.sources):
        found = []
        for j, ref in enumerate(src.templates):
            try:
                found.append(library.get(ref))
            except IftError as err:  # the key, then the template file's own location when it has one
                errors.append(IftError(err.what, _join(f"data.sources.{i}.templates.{j}", err.where), err.fix))
        fixed = None
        if src.eval_template:
            try:
                fixed = library.get(src.eval_template)
            except IftError as err:
                errors.append(IftError(err.what, _join(f"data.sources.{i}.eval_template", err.where), err.fix))
        per_source.append(found)
        eval_fixed.append(fixed)
    return per_source, eval_fixed, errors


def _join(key: str, where: str | None) -> str:
    return f"{key}: {where}" if where else key


def _template_identity(tpl: Any) -> tuple:
    return (getattr(tpl, "ref", tpl.name), tpl.id, getattr(tpl, "jinja", ""),
            getattr(tpl, "answer_choices_jinja", None))


def check_columns(source: LoadedSource, templates: list[Any], columns: Sequence[str], split: str | None = None,
                   key_field: str = "templates") -> list[IftError]:
    errors = []
    cols = set(columns)
    where = f"split '{split}' of source '{source.name}'" if split else f"source '{source.name}'"
    if source.format in ("messages", "sharegpt", "prompt_completion"):
        missing = [c for c in format_columns(source.format, source.cfg) if c not in cols]
        if missing:
            which = "conversation_column" if source.format in DEFAULT_COLUMNS else "columns"
            errors.append(IftError(
                f"{source.format} {where} has no column {', '.join(repr(m) for m in missing)}",
                f"{source.key}.{which}", f"columns are: {', '.join(sorted(cols))}; "
                + (f"set {source.key}.conversation_column to the column of turns" if which == "conversation_column"
                   else f"rename them with {source.key}.columns: {{old_name: {missing[0]}}}") + ", or set format"))
        return errors
    if not templates:
        if source.cfg.text_column not in cols:
            errors.append(IftError(
                f"raw-text {where} has no column '{source.cfg.text_column}'",
                f"{source.key}.text_column", f"columns are: {', '.join(sorted(cols))}; set text_column to one "
                "of them, or give the source templates"))
        return errors
    for tpl in templates:
        missing = sorted(tpl.variables() - cols)
        if missing:
            errors.append(IftError(
                f"template '{getattr(tpl, 'ref', tpl.name)}' uses {', '.join(repr(m) for m in missing)}, "
                f"not among the columns of {where}",
                f"{source.key}.{key_field}", f"columns are: {', '.join(sorted(cols))}; rename one with "
                f"{source.key}.columns: {{old_name: {missing[0]}}}, or choose another template"
                + (f" (or set {source.key}.splits.{split}: null to carve {split} from train)"
                   if split and split != "train" else "")))
    return errors


class _Renderer:
    """datasets.map function: raw rows -> prompt/completion/choices/source/template/_pair rows."""

    def __init__(self, source: str, templates: list[Any], picks: np.ndarray | None, text_column: str, seed: tuple,
                 fmt: str = "template", cfg: SourceConfig | None = None, system_prompt: str | None = None):
        self.source, self.templates, self.picks = source, templates, picks
        self.text_column, self.seed = text_column, seed
        self.fmt, self.cfg, self.system_prompt = fmt, cfg, system_prompt

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        from ift.templates.template import render_row

        out: dict[str, list] = {k: [] for k in ("prompt", "completion", "choices", "source", "template", "_pair",
                                                "messages", "chat")}
        columns = list(batch)
        if self.fmt in ("messages", "sharegpt", "prompt_completion"):
            for pos, index in enumerate(indices):  # every row was checked on load (check_conversations)
                row = {c: batch[c][pos] for c in columns}
                messages = normalize_source_row(self.cfg, self.fmt, row, self.source, index, self.system_prompt)
                tools = conversation_tools(row, source=self.source, index=index, default=self.cfg.tools)
                self._add_conversation(out, messages, [], f"({self.fmt})", tools)
            return out
        if not self.templates:
            for text in batch[self.text_column]:
                if text is None or not str(text).strip():
                    continue  # nothing to learn from: skipped (counted from the row totals)
                self._add(out, "", str(text), [], "")
            return out
        # `choice`/`random` inside templates draw from this rng: seeded per batch, so reruns match
        rng = random.Random(f"{self.seed}-{indices[0] if indices else 0}")
        for pos, index in enumerate(indices):
            row = {c: batch[c][pos] for c in columns}
            chosen = self.templates if self.picks is None else [self.templates[self.picks[index]]]
            for tpl in chosen:
                pair = render_row(tpl, row, index, rng=rng, truncate=False)
                if pair is None:
                    continue  # the template does not apply to this row (promptsource convention)
                choices = tpl.answer_choices(row, rng=rng) or []
                if self.fmt == "alpaca":  # the template's pair is a one-exchange conversation
                    messages = [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
                    if self.system_prompt is not None:
                        messages.insert(0, {"role": "system", "content": self.system_prompt})
                    self._add_conversation(out, messages, choices, tpl.ref)
                else:
                    self._add(out, pair[0], pair[1], choices, tpl.ref)
        return out

    def _add(self, out: dict[str, list], prompt: str, completion: str, choices: list[str], template: str) -> None:
        out["prompt"].append(prompt)
        out["completion"].append(completion)
        out["choices"].append(list(choices))
        out["source"].append(self.source)
        out["template"].append(template)
        out["_pair"].append(pair_hash(prompt, completion))
        out["messages"].append([])
        out["chat"].append("")

    def _add_conversation(self, out: dict[str, list], messages: list[dict], choices: list[str], template: str,
                          tools: list[dict] | None = None) -> None:
        """A conversation hashed whole (leak check); prompt/completion are its last user turn and final reply;
        `messages` holds role and content, `chat` the whole conversation when it has more (calls, reasoning, tools)."""
        out["prompt"].append(next(m["content"] for m in reversed(messages[:-1]) if m["role"] != "assistant"))
        out["completion"].append(messages[-1]["content"])
        out["choices"].append(list(choices))
        out["source"].append(self.source)
        out["template"].append(template)
        out["_pair"].append(conversation_cache_key(messages))
        plain = not tools and all(set(m) <= {"role", "content"} for m in messages)
        out["messages"].append([{"role": m["role"], "content": m["content"]} for m in messages])
        out["chat"].append("" if plain else json.dumps({"messages": messages, "tools": tools}, ensure_ascii=False))


def render_split(ds: Any, source: LoadedSource, split: str, templates: list[Any], data: DataConfig) -> tuple[Any, dict]:
    """Render one split; also returns how many rows each template was expected to produce."""
    cfg = source.cfg
    mode = "all" if cfg.template_mode == "all" and len(templates) > 1 else "sample"
    picks = None
    expected: dict[str, int] = {}
    if templates and mode == "sample":
        rng = np.random.default_rng([data.seed, stable_int(source.name), SPLITS.index(split)])
        picks = rng.integers(0, len(templates), size=len(ds))
        counts = np.bincount(picks, minlength=len(templates))
        for tpl, count in zip(templates, counts):
            expected[tpl.ref] = expected.get(tpl.ref, 0) + int(count)
    elif templates:
        expected = {tpl.ref: len(ds) for tpl in templates}
    elif source.format in ("messages", "sharegpt", "prompt_completion"):
        expected = {f"({source.format})": len(ds)}
    else:
        expected = {"": len(ds)}
    seed = (data.seed, source.name, split)
    conversational = source.format in CONVERSATION_FORMATS
    fp = cache_fingerprint("render", ds._fingerprint, seed, mode, [_template_identity(t) for t in templates],
                      cfg.text_column if not templates else None, source.format,
                      (cfg.conversation_column, data.system_prompt, cfg.tools) if conversational else None,
                      CODE_VERSION)
    fn = _Renderer(source.name, templates, picks, cfg.text_column, seed, source.format, cfg,
                   data.system_prompt if conversational else None)
    if not len(ds):  # datasets skips the function on empty input and keeps no columns
        import datasets

        empty = datasets.Dataset.from_dict({k: [] for k in _features()}, features=_features())
        return empty, expected
    try:
        out = ds.map(fn, batched=True, batch_size=BATCH, with_indices=True, remove_columns=ds.column_names,
                     features=_features(), new_fingerprint=fp, cache_file_name=cache_file_path("render", fp),
                     desc=f"templating {source.name}/{split}")
    except IftError as err:
        raise IftError(err.what, f"{source.key} ({source.name}), split {split}: {err.where}", err.fix) from None
    return out, expected
