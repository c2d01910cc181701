"""The model card: RUN_DIR/README.md built with huggingface_hub's `ModelCard` / `ModelCardData`.

Metadata (base_model, library_name, pipeline_tag, tags, datasets, license, model-index) parses back with
`ModelCard.load(path).data`. model-index holds this model's test scores only, one entry per source (its
dataset, config and the split the rows came from); the base model's scores are in the body's table.
The body says what was trained on which data with which templates, compares base and fine-tuned,
shows the curves, holds the resolved recipe and tells how to load the weights.

Everything comes from the run folder (recipe.yaml, metrics.json, data_report.json, predictions/,
plots/, final/) and the recipe; the body is plain text, never a Jinja template, so template text
copied into it is shown, not executed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ift import atomic
from ift.errors import IftError
from ift.locations import looks_like_hub_id
from ift.metrics import METRICS, SCORES, recorded_module_figures
from ift.modeling.model_source import base_hub_id
from ift.recipe import ALPACA_TEMPLATE, SPLITS, Recipe
from ift.run import RunDir

if TYPE_CHECKING:
    from ift.templates.library import TemplateLibrary

# The base vs fine-tuned table (the headline scores) and every figure put in model-index: from the registry.
TABLE_METRICS = tuple(m for m in SCORES if m != "accuracy_norm")
INDEX_METRICS = tuple(METRICS)
METRIC_NAMES = {name: m.label for name, m in METRICS.items()}
DATA_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt"}
MISSING = "—"
METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA"}


def write_model_card(run_dir: Path, recipe: Recipe, *, library: TemplateLibrary | None = None, merged: bool = False,
                     repo_id: str | None = None, path: Path | None = None, metrics: dict | None = None,
                     data_report: dict | None = None) -> Path:
    """Write the card (default RUN_DIR/README.md) atomically and return its path.

    merged: describe the merged model (library transformers) instead of the adapter in final/.
    repo_id: the Hub repository the card is for (defaults to recipe.hub.repo_id); used in the snippets.
    metrics, data_report: the run's metrics.json and data_report.json as the caller holds them (the end of a
    training run); read from the run folder when not given.
    """
    card = build_model_card(run_dir, recipe, library=library, merged=merged, repo_id=repo_id, metrics=metrics,
                            data_report=data_report)
    path = Path(path) if path is not None else RunDir(run_dir).card
    return atomic.write_text(path, str(card))


def build_model_card(run_dir: Path, recipe: Recipe, *, library: TemplateLibrary | None = None, merged: bool = False,
                     repo_id: str | None = None, metrics: dict | None = None, data_report: dict | None = None):
    """The ModelCard object (metadata + Markdown body) for a run folder."""
    from huggingface_hub import ModelCard

    rd = RunDir(run_dir)
    facts = _Facts.gather(rd, recipe, library, merged, repo_id or recipe.hub.repo_id,
                          metrics=_read_json(rd.metrics_file) if metrics is None else metrics,
                          data_report=_read_json(rd.data_report) if data_report is None else data_report)
    data = _card_data(facts)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(facts)}")


# ---------------------------------------------------------------- what the card is about


@dataclass
class _Facts:
    """Everything the card states, read once from the run folder and the recipe."""

    run_dir: Path
    recipe: Recipe
    merged: bool  # describes the merged model rather than final/
    adapter: bool  # the weights are a peft adapter
    repo_id: str | None
    name: str
    kind: str  # causal | seq2seq
    method: str  # lora | qlora | full
    base: str  # how the body names the base model
    base_hub_id: str | None
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    sources: list[dict[str, Any]]
    leaks_removed: int | None
    templates: list[dict[str, Any]]
    example: str | None  # a test prompt for the usage snippet
    license: str | None
    chat_setup: dict[str, Any]  # data_report.json's "chat": the chat template trained with, end of turn, added tokens
    token_report: dict[str, Any]  # data_report.json's "tokens": rows, tokens, per-turn rows of each split
    chat_template: str | None  # the template text saved with the run's tokenizer
    template_tokens: dict[str, str]  # the special tokens a template may write (bos_token, eos_token)
    source_columns: dict[str, list[str]]  # each source's columns, as the split report lists them
    has_loss_plot: bool
    other_plots: list[str] = field(default_factory=list)

    @classmethod
    def gather(cls, rd: RunDir, recipe: Recipe, library: Any | None, merged: bool, repo_id: str | None, *,
               metrics: dict, data_report: dict) -> "_Facts":
        run_dir = rd.path
        report = _split_report(data_report)
        leaks = report.get("leaks") if isinstance(report.get("leaks"), dict) else {}
        final = rd.final
        adapter = recipe.adapter.method != "none" and not merged
        hub_id = base_hub_id(recipe.model)
        return cls(
            run_dir=run_dir, recipe=recipe, merged=merged, adapter=adapter, repo_id=repo_id,
            name=(repo_id or "").split("/")[-1] or run_dir.resolve().name,
            kind=_model_kind(final, recipe),
            method={"none": "full"}.get(recipe.adapter.method, recipe.adapter.method),
            base=_base_label(recipe, hub_id), base_hub_id=hub_id,
            metrics=metrics, history=metrics.get("history") or [],
            sources=_sources(recipe, report), leaks_removed=leaks.get("train"),
            templates=_templates(recipe, library),
            example=_example_prompt(rd),
            license=_base_license(recipe),
            chat_setup=(data_report.get("chat") or {}),
            token_report=data_report.get("tokens") if isinstance(data_report.get("tokens"), dict) else {},
            chat_template=_saved_chat_template(rd),
            template_tokens=_template_tokens(rd),
            source_columns={name: list(info.get("columns") or []) for name, info in
                            (report.get("sources") or {}).items() if isinstance(info, dict)},
            has_loss_plot=(rd.plots / "loss.png").exists(),
            other_plots=sorted(p.name for p in rd.plots.glob("*.png")
                               if p.name not in ("loss.png", "confusion_matrix.png")),  # the latter: in Results
        )

    @property
    def task(self) -> str:
        return "text2text-generation" if self.kind == "seq2seq" else "text-generation"

    @property
    def auto_class(self) -> str:
        return "AutoModelForSeq2SeqLM" if self.kind == "seq2seq" else "AutoModelForCausalLM"

    @property
    def load_id(self) -> str:
        return self.repo_id or "your-name/your-model"

    @property
    def chat(self) -> bool:
        """Prompts were wrapped in the tokenizer's chat template in training and evaluation."""
        return self.recipe.data.chat_run and self.kind == "causal"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IftError(f"cannot read {path.name}: {exc}", str(path),
                       "restore the file or rerun the step that writes it") from None
    return data if isinstance(data, dict) else {}


def _saved_chat_template(rd: RunDir) -> str | None:
    """The chat template saved with the run's tokenizer (final/, else tokenizer/): a .jinja file or the
    tokenizer_config.json entry."""
    for folder in (rd.final, rd.tokenizer):
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        text = _read_json(folder / "tokenizer_config.json").get("chat_template")
        if isinstance(text, str) and text:
            return text
    return None


def _template_tokens(rd: RunDir) -> dict[str, str]:
    for folder in (rd.final, rd.tokenizer):
        config = _read_json(folder / "tokenizer_config.json")
        if config:
            return {k: config[k] for k in ("bos_token", "eos_token") if isinstance(config.get(k), str)}
    return {}


def _model_kind(final: Path, recipe: Recipe) -> str:
    """causal or seq2seq: forced in the recipe, else what final/ says (peft task type or config)."""
    if recipe.model.kind != "auto":
        return recipe.model.kind
    task = _read_json(final / "adapter_config.json").get("task_type", "")
    if task:
        return "seq2seq" if "SEQ_2_SEQ" in str(task).upper() else "causal"
    config = _read_json(final / "config.json")
    return "seq2seq" if config.get("is_encoder_decoder") else "causal"


def _base_label(recipe: Recipe, hub_id: str | None = None) -> str:
    m = recipe.model
    if m.init == "scratch":
        return "a model initialised from scratch (random weights)"
    if m.gguf_file:
        if hub_id:
            return f"{hub_id} (from the GGUF file {Path(m.gguf_file).name}, dequantised to full precision)"
        where = f"{m.name_or_path}/" if m.name_or_path else ""
        return f"{where}{m.gguf_file} (GGUF, dequantised to full precision)"
    return m.name_or_path or "unknown"


def _base_license(recipe: Recipe) -> str | None:
    """The base model's license when its local folder has a card that says so."""
    from huggingface_hub import ModelCard

    path = recipe.model.name_or_path
    readme = Path(path) / "README.md" if path else None
    if readme is None or not readme.is_file():
        return None
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.license
    except Exception:  # a malformed base card must not stop ours
        return None


def _sources(recipe: Recipe, report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = _rows_per_source(report)
    per_source = report.get("sources") if isinstance(report.get("sources"), dict) else {}
    out = []
    for s in recipe.data.sources:
        name = s.name or Path(s.path).stem
        info = per_source.get(name) if isinstance(per_source.get(name), dict) else {}
        carved = info.get("carved") if isinstance(info.get("carved"), dict) else None
        if carved is None:  # no split report: the run's recipe pins carved splits to null
            carved = {split: None for split in SPLITS[1:] if getattr(s.splits, split) is None}
        out.append({"name": name, "path": s.path, "config": s.config, "revision": s.revision, "weight": s.weight,
                    "hub": looks_like_hub_id(s.path, DATA_SUFFIXES), "rows": rows.get(name, {}),
                    "splits": {split: getattr(s.splits, split) for split in SPLITS}, "carved": carved,
                    "templates": list(s.templates), "eval_template": s.eval_template})
    return out


def _split_report(saved: dict[str, Any]) -> dict[str, Any]:
    """ift.data.prepare's split report, as training saves it: data_report.json = {"splits": <report>, "tokens": ...}."""
    inner = saved.get("splits")
    return inner if isinstance(inner, dict) and isinstance(inner.get("splits"), dict) else saved


def _rows_per_source(report: dict[str, Any]) -> dict[str, dict[str, int]]:
    """{source: {split: rows}} from the split report ({"splits": {split: {"sources": {name: {"rows"}}}}})."""
    found: dict[str, dict[str, int]] = {}
    splits = report.get("splits")
    for split, entry in (splits.items() if isinstance(splits, dict) else ()):
        per_source = entry.get("sources") if isinstance(entry, dict) else None
        for name, info in (per_source.items() if isinstance(per_source, dict) else ()):
            rows = info.get("rows") if isinstance(info, dict) else None
            if isinstance(rows, int) and not isinstance(rows, bool):
                found.setdefault(name, {})[split] = rows
    return found


def _templates(recipe: Recipe, library: Any | None) -> list[dict[str, Any]]:
    """Every template the recipe uses, with its Jinja text and answer choices (or why they are missing)."""
    refs: list[tuple[str, str]] = []
    for s in recipe.data.sources:
        name = s.name or Path(s.path).stem
        shipped = [ALPACA_TEMPLATE] if s.format == "alpaca" and not s.templates else []  # format: alpaca's own
        for ref in [*s.templates, *shipped, *([s.eval_template] if s.eval_template else [])]:
            if (name, ref) not in refs:
                refs.append((name, ref))
    if not refs:
        return []
    problem = None
    if library is None:
        try:
            from ift.templates.library import TemplateLibrary

            library = TemplateLibrary(dirs=tuple(recipe.data.templates_dir))
        except IftError as err:
            problem = err.what
    out = []
    for source, ref in refs:
        entry: dict[str, Any] = {"source": source, "ref": ref, "jinja": None, "choices": None,
                                 "original_task": None, "problem": problem}
        if library is not None:
            try:
                tpl = library.get(ref)
                entry.update(ref=getattr(tpl, "ref", ref), jinja=tpl.jinja,
                             choices=getattr(tpl, "answer_choices_jinja", None),
                             original_task=getattr(getattr(tpl, "metadata", None), "original_task", None))
            except IftError as err:
                entry["problem"] = err.what
        out.append(entry)
    return out


def _example_prompt(rd: RunDir) -> str | None:
    """The first test prompt (what a user's input should look like), if predictions were saved."""
    for split in ("test", "validation"):
        path = rd.predictions(split)
        if not path.exists():
            continue
        try:
            with path.open(encoding="utf-8") as fh:
                first = json.loads(fh.readline() or "{}")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        prompt = first.get("prompt") if isinstance(first, dict) else None
        if isinstance(prompt, str) and prompt.strip():
            return prompt if len(prompt) <= 600 else prompt[:600] + "…"
    return None


# ---------------------------------------------------------------- metadata


def _card_data(f: _Facts):
    from huggingface_hub import EvalResult, ModelCardData

    datasets = [s["path"] for s in f.sources if s["hub"]]
    tags = ["ift", "instruction-tuning", f.method, *(["merged"] if f.merged else [])]
    tags += [_tag(s["name"]) for s in f.sources]
    return ModelCardData(
        model_name=f.name,
        base_model=f.base_hub_id,
        library_name="peft" if f.adapter else "transformers",
        pipeline_tag=f.task,
        tags=[t for t in tags if t],
        datasets=datasets or None,
        license=f.license,
        eval_results=_eval_results(f, EvalResult) or None,
    )


def _tag(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _eval_results(f: _Facts, EvalResult) -> list:
    """This model's test scores, one model-index entry per source.

    Only the test split: validation chose the checkpoint, so its scores are optimistic. The base model's
    scores stay in the body (model-index is read as this model's results). Totals over several sources
    (and the loss, which is only kept in total) are not a score on any one dataset, so with several sources
    only the per-source figures go in.
    """
    test = f.metrics.get("test")
    if not isinstance(test, dict):
        return []
    if f.merged and f.recipe.adapter.method == "qlora":
        return []  # measured on the 4-bit base: not these (unquantized, merged) weights
    by_source = test.get("by_source") if isinstance(test.get("by_source"), dict) else {}
    out = []
    for s in f.sources:
        values = test if len(f.sources) == 1 else by_source.get(s["name"])
        if not isinstance(values, dict):
            continue
        split, held_out = _origin(s, "test")
        name = s["name"] if s["hub"] else f"{s['name']} (local data)"
        if held_out:
            name += f", {held_out}"
        for metric in INDEX_METRICS:
            value = _number(values.get(metric))
            if value is None:
                continue
            out.append(EvalResult(
                task_type=f.task, dataset_type=s["path"] if s["hub"] else s["name"], dataset_name=name,
                dataset_config=s["config"], dataset_split=split, dataset_revision=s["revision"] if s["hub"] else None,
                metric_type=metric, metric_value=round(value, 4),
                metric_name=f"{METRIC_NAMES[metric]}, {held_out or split + ' split'}",
            ))
    return out


def _origin(source: dict[str, Any], split: str) -> tuple[str, str | None]:
    """The source's own split our `split` came from, and how it was held out when it was carved from train."""
    train = source["splits"]["train"] or "train"
    if split in source["carved"]:
        rows = source["carved"][split]
        size = f"{rows} rows" if isinstance(rows, int) and not isinstance(rows, bool) else "rows"
        return train, f"{size} held out from {train} (not the official {split} split)"
    return source["splits"][split] or split, None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ---------------------------------------------------------------- body


def _body(f: _Facts) -> str:
    parts = [f"# {f.name}\n", _summary(f), _base_section(f), _data_section(f), _chat_section(f),
             _templates_section(f), _results_section(f), _curves_section(f), _recipe_section(f), _use_section(f),
             _load_section(f)]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def _summary(f: _Facts) -> str:
    a, t = f.recipe.adapter, f.recipe.training
    if f.merged:
        what = (f"a standalone model: a {METHOD_NAMES[a.method]} adapter (r={a.r}, alpha={a.alpha:g}) merged into "
                "the base weights (unquantized)")
    elif f.adapter:
        quant = f", base quantised to 4-bit {a.quant_type}" if a.method == "qlora" else ""
        what = f"a {METHOD_NAMES[a.method]} adapter (r={a.r}, alpha={a.alpha:g}, dropout {a.dropout:g}{quant})"
    else:
        what = "a fully fine-tuned model (every weight trained)"
    steps = max((int(h.get("step", 0)) for h in f.history if isinstance(h, dict)), default=0)
    length = f"{steps} optimizer steps" if steps else (
        f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.num_train_epochs:g} epochs")
    batch = t.per_device_train_batch_size * t.gradient_accumulation_steps
    names = ", ".join(f"`{s['name']}`" for s in f.sources)
    return (f"This is {what} of **{f.base}**, instruction-tuned with `ift` on {names} "
            f"for {length} (learning rate {t.learning_rate:g}, {t.lr_scheduler_type} schedule, "
            f"batch {batch} per device including accumulation, seed {t.seed}).\n")


def _base_section(f: _Facts) -> str:
    m = f.recipe.model
    link = f"[{f.base_hub_id}](https://huggingface.co/{f.base_hub_id})" if f.base_hub_id else f"`{f.base}`"
    lines = ["## Base model\n", f"- {link} ({'encoder-decoder' if f.kind == 'seq2seq' else 'decoder-only'}, "
             f"{f.task})"]
    if m.gguf_file and f.base_hub_id:
        lines.append(f"- trained on its GGUF file `{m.gguf_file}`, dequantised to full precision")
    if m.revision:
        lines.append(f"- revision `{m.revision}`")
    return "\n".join(lines) + "\n"


def _data_section(f: _Facts) -> str:
    d = f.recipe.data
    lines = ["## Training data\n", "| source | path | train | validation | test |", "|---|---|---:|---:|---:|"]
    for s in f.sources:
        path = f"[{s['path']}](https://huggingface.co/datasets/{s['path']})" if s["hub"] else f"`{s['path']}`"
        if s["config"]:
            path += f" (`{s['config']}`)"
        counts = [str(s["rows"][k]) if k in s["rows"] else MISSING for k in SPLITS]
        lines.append(f"| {s['name']} | {path} | " + " | ".join(counts) + " |")
    if len(f.sources) > 1:
        totals = [str(sum(s["rows"][k] for s in f.sources)) if all(k in s["rows"] for s in f.sources) else MISSING
                  for k in SPLITS]
        lines.append("| **total** | | " + " | ".join(totals) + " |")
    leaks = "not checked"
    if d.leak_check:
        n = f.leaks_removed
        leaks = "removed from training" + (f" ({n})" if isinstance(n, int) and not isinstance(n, bool) else "")
    notes = [f"Splits carved from train where a source lacks them: validation {d.validation_size:g}, "
             f"test {d.test_size:g} (seed {d.seed}); examples present in two splits were {leaks}."]
    if len(f.sources) > 1:
        weights = ", ".join(f"{s['name']} {s['weight']:g}" for s in f.sources if s["weight"] is not None)
        notes.append(f"Mixture: {d.mixture.strategy}" + (f" ({weights})" if weights else "") + ".")
    if d.conversational:
        notes.append(f"Conversations up to {d.max_length} tokens (earliest exchanges dropped first); loss on "
                     + ("every assistant reply" if d.train_on == "all_assistant" else "the last assistant reply")
                     + " (its tool calls included) and its end-of-turn token, never on system, user or tool text "
                       "or the tools block.")
    if not d.conversational or any(s.get("templates") for s in f.sources):
        notes.append(f"Sequences up to {d.max_length} tokens; " + (
            "loss on every token." if d.train_on_prompt else "loss on the completion only (prompt masked)."))
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


# a request and its call, rendered by the run's chat template to show its tools block and call syntax
EXAMPLE_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
EXAMPLE_CALL = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}]


def _chat_section(f: _Facts) -> str:
    """The chat template trained with and, for conversations, the tool format, reasoning and per-turn rows."""
    chat = f.chat_setup
    if not (f.chat and chat):
        return ""
    d = f.recipe.data
    named = chat.get("chat_template")
    what = {"auto": "the base tokenizer's own", "tokenizer": "the base tokenizer's own"}.get(named, f"`{named}`")
    lines = ["## Chat format\n",
             f"- Chat template: {what}, saved with the tokenizer (serve with it)"
             + (f"; end of turn `{chat['end_of_turn']}`" if chat.get("end_of_turn") else "")
             + (f"; tokens added: {', '.join(f'`{t}`' for t in chat['added_tokens'])}"
                if chat.get("added_tokens") else "") + "."]
    if not d.conversational:
        return "\n".join(lines) + "\n"
    tools = _tool_origins(f)
    example = _tool_example(f.chat_template, f.template_tokens) if tools else None
    if tools:
        lines.append(f"- Tools: each conversation's function schemas ({' and '.join(tools)}) were handed to the chat "
                     "template, and the assistant's calls trained as the template writes them"
                     + (": a request with one schema and its call render as\n" if example else
                        " (the saved template could not render an example here)."))
        if example:
            lines.append(_indented(_fenced(example.rstrip("\n"), "text")))
    if d.train_on_reasoning:
        lines.append("- Reasoning, where a reply has it (`reasoning_content`, or a reply that starts with "
                     "`<think>…</think>`), carried loss with the answer and calls (`data.train_on_reasoning: true`).")
    else:
        lines.append("- Reasoning carried no loss: each reply's loss starts after its `</think>`, on the answer and "
                     "calls only (`data.train_on_reasoning: false`).")
    extra = _turn_rows(f.token_report)
    if extra:
        lines.append(f"- Each assistant turn was trained in the context the template gives it at inference (it "
                     f"renders earlier turns differently once later ones follow): {extra} training rows beyond one "
                     "per conversation.")
    else:
        lines.append("- One training row per conversation: no assistant turn needed a row of its own (each renders "
                     "the same once later turns follow, or the conversation has one reply).")
    return "\n".join(lines) + "\n"


def _tool_origins(f: _Facts) -> list[str]:
    """Where the conversations' tools came from (a source's `tools:` list, a `tools` column); also tools where the
    run's figures score tool calls."""
    from ift.data.formats import TOOLS_COLUMN

    found = []
    for s in f.recipe.data.sources:
        name = s.name or Path(s.path).stem
        columns = f.source_columns.get(name) or []
        if s.tools:
            found.append(f"source `{name}`'s `tools:` list")
        if TOOLS_COLUMN in columns:
            found.append(f"the `{TOOLS_COLUMN}` column of `{name}`")
    scored = any("tool_call_exact_match" in (section or {})
                 for section in (f.metrics.get("test"), f.metrics.get("validation")))
    return found or (["the rows' own"] if scored else [])


def _tool_example(template: str | None, tokens: dict[str, str]) -> str | None:
    """EXAMPLE_CALL with EXAMPLE_TOOLS rendered by `template` (transformers' own renderer, as apply_chat_template
    renders); None where it cannot."""
    if not template or "tools" not in template:
        return None
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(conversations=[EXAMPLE_CALL], tools=EXAMPLE_TOOLS, chat_template=template,
                                            **tokens)
    except Exception:  # a template that needs what an example cannot give must not stop the card
        return None
    return rendered[0] if rendered and "get_weather" in rendered[0] else None


def _indented(block: str) -> str:
    """A fenced block inside a list item."""
    return "\n".join(("  " + line) if line else line for line in block.rstrip("\n").split("\n")) + "\n"


def _turn_rows(token_report: dict[str, Any]) -> int:
    train = token_report.get("train") if isinstance(token_report.get("train"), dict) else {}
    rows = train.get("turn_rows")
    return rows if isinstance(rows, int) and not isinstance(rows, bool) else 0


def _templates_section(f: _Facts) -> str:
    conversations = [s.name or Path(s.path).stem for s in f.recipe.data.sources
                     if s.format in ("messages", "sharegpt", "prompt_completion")]
    if not f.templates:
        if conversations:
            return ("## Prompt templates\n\nNo promptsource templates: the sources are conversations ("
                    + ", ".join(f"`{n}`" for n in conversations) + "), rendered in the chat template named under "
                    "Chat format.\n")
        return "## Prompt templates\n\nNo templates: the sources were used as raw text.\n"
    lines = ["## Prompt templates\n",
             "Rows were turned into prompt/completion pairs with these promptsource-format templates "
             "(`|||` separates the prompt from the target):\n"]
    for t in f.templates:
        title = f"### `{t['ref']}` (source `{t['source']}`"
        title += ", original task)" if t["original_task"] else ")"
        lines.append(title + "\n")
        if t["jinja"] is None:
            lines.append(f"Template text unavailable here ({t['problem'] or 'not found'}).\n")
            continue
        lines.append(_fenced(t["jinja"], "jinja"))
        if t["choices"]:
            lines.append(f"Answer choices: {_inline(t['choices'])}\n")
    return "\n".join(lines)


def _results_section(f: _Facts) -> str:
    test, val = f.metrics.get("test") or {}, f.metrics.get("validation") or {}
    base = (f.metrics.get("base") or {}).get("test") or {}
    if not (test or val or base):
        return "## Results\n\nNo evaluation results were recorded for this run.\n"
    modules = recorded_module_figures(test, base, val)
    scale = ("All scores on a 0–1 scale, except those of `evaluate` modules (marked, on the module's own scale, "
             "computed on the generated answers). " if modules else "All scores on a 0–1 scale. ")
    lines = ["## Results\n", scale + "Accuracy ranks the answer choices by log-likelihood "
             "where a template has them, else compares the greedy generation; macro-F1 and balanced accuracy "
             "average each answer choice's F1 and recall over the ranked rows (equal to scikit-learn's); ROUGE is "
             "the mean F-measure "
             "(ROUGE-Lsum with one sentence per line) over rouge_score's tokens widened to every script: words of "
             "letters, digits and combining marks, one token per character in Chinese, Japanese and Thai, the Porter "
             "stemmer on English words. The metadata (model-index) lists this model's test "
             "scores per source; the base model's are in this table only.\n",
             "| metric | base model (test) | fine-tuned (test) | change | fine-tuned (validation) |",
             "|---|---:|---:|---:|---:|"]
    for metric in (*TABLE_METRICS, *modules):
        b, t, v = _number(base.get(metric)), _number(test.get(metric)), _number(val.get(metric))
        change = f"{t - b:+.3f}" if b is not None and t is not None else MISSING
        name = METRIC_NAMES.get(metric) or f"`{metric}` (evaluate)"
        lines.append(f"| {name} | {_fmt(b)} | {_fmt(t)} | {change} | {_fmt(v)} |")
    lines.append("")
    for key, label in (("by_source", "source"), ("by_template", "template")):
        table = _breakdown(test.get(key), label)
        if table:
            lines += [f"Fine-tuned, test split, by {label}:\n", table]
    lines += _classes_section(f, test or val, base, "test" if test else "validation")
    lines += _benchmarks_section(f.metrics.get("benchmarks"))
    best = f.metrics.get("best")
    if isinstance(best, dict) and best.get("step") is not None:
        lines.append(f"The weights are those of the best validation checkpoint (step {best['step']}, "
                     f"{f.recipe.training.metric_for_best_model} {_fmt(_number(best.get('value')))}); the "
                     "validation column is that evaluation.\n")
    lines.append(_provenance(f, test, base))
    return "\n".join(lines)


def _classes_section(f: _Facts, tuned: dict, base: dict, split: str) -> list[str]:
    """Per-class precision / recall / F1 / support (base F1 beside them) and the confusion matrix, where the rows
    had answer choices."""
    per_class = tuned.get("per_class")
    cm = tuned.get("confusion_matrix")
    if not isinstance(per_class, dict) or not per_class:
        return []
    base_classes = base.get("per_class") if isinstance(base.get("per_class"), dict) else {}
    lines = [f"Fine-tuned, {split} split, per class (the gold answer choice; macro-F1 and balanced accuracy above "
             "average these over the classes that occur):\n",
             "| class | support | precision | recall | F1 |" + (" F1, base model |" if base_classes else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if base_classes else "")]
    for label, v in per_class.items():
        if not isinstance(v, dict):
            continue
        support = v.get("support")
        figures = " | ".join(_fmt(_number(v.get(k))) for k in ("precision", "recall", "f1"))
        row = f"| {_cell(label)} | {support if isinstance(support, int) else MISSING} | {figures} |"
        if base_classes:
            b = base_classes.get(label)
            row += f" {_fmt(_number(b.get('f1')) if isinstance(b, dict) else None)} |"
        lines.append(row)
    lines.append("")
    if isinstance(cm, dict) and isinstance(cm.get("labels"), list) and isinstance(cm.get("matrix"), list):
        labels = [_cell(x) for x in cm["labels"]]
        lines += [f"Confusion matrix, fine-tuned, {split} split (rows: target, columns: predicted):\n",
                  "| target \\ predicted | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        for label, row in zip(labels, cm["matrix"]):
            lines.append(f"| {label} | " + " | ".join(str(x) for x in row) + " |")
        lines.append("")
    if (RunDir(f.run_dir).plots / "confusion_matrix.png").exists():
        lines.append("![confusion matrix](plots/confusion_matrix.png)\n")
    return lines


def _benchmarks_section(section: Any) -> list[str]:
    """lm-eval tasks on the base and the fine-tuned model (evaluation.benchmarks): what fine-tuning cost elsewhere."""
    from ift.evaluation.benchmarks import fmt_value, rows

    found = rows(section)
    if not found:
        return []
    s = section.get("settings") or {}
    shots = "each task's own number of" if s.get("num_fewshot") is None else str(s.get("num_fewshot"))
    limit = f", at most {s['limit']} rows per task" if s.get("limit") else ""
    lines = [f"Benchmarks run with lm-evaluation-harness {s.get('lm_eval') or ''} on both models with identical "
             f"settings ({shots} few-shot examples{limit}); ± is the harness's standard error:\n",
             "| task | metric | rows | base model | fine-tuned | change |", "|---|---|---:|---:|---:|---:|"]
    for r in found:
        change = f"{r['delta']:+.3f}" if isinstance(r["delta"], (int, float)) else MISSING
        n = r["n"] if isinstance(r["n"], int) else MISSING
        base = fmt_value(r["base"], r["base_stderr"], 3)
        tuned = fmt_value(r["fine-tuned"], r["fine-tuned_stderr"], 3)
        lines.append(f"| {_cell(r['task'])} | {_cell(r['metric'])} | {n} | {base} | {tuned} | {change} |")
    return lines + [""]


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _provenance(f: _Facts, test: dict, base: dict) -> str:
    """Which evaluation record (metrics.json `evaluations`) each column comes from, and what it measured."""
    records = {r.get("id"): r for r in f.metrics.get("evaluations") or [] if isinstance(r, dict)}
    lines = ["Where the figures come from (`metrics.json`, `evaluations`):\n"]
    for label, section in (("base model (test)", base), ("fine-tuned (test)", test)):
        record = records.get(section.get("record")) if section else None
        if record is None:
            continue
        quant = f", {record['quantization']} 4-bit base" if record.get("quantization") else ""
        limit = f" (limit {record['limit']})" if record.get("limit") else ""
        lines.append(f"- {label}: record `{record['id']}` — {record.get('weights')}, {record.get('rows')} rows"
                     f"{limit} of the {record.get('split')} split, {record.get('dtype')}{quant}, {record.get('when')}")
    if f.merged and f.recipe.adapter.method == "qlora":
        lines.append("- these figures were measured with the adapter on the 4-bit base it was trained on; this "
                     "merged model holds unquantized weights, a different function, so its model-index lists no "
                     "scores until it is evaluated itself")
    return "\n".join(lines) + "\n" if len(lines) > 1 else ""


def _breakdown(groups: Any, label: str) -> str | None:
    if not isinstance(groups, dict) or not groups:
        return None
    rows = {k: v for k, v in groups.items() if isinstance(v, dict)}
    metrics = [m for m in ("accuracy", *TABLE_METRICS[1:], *recorded_module_figures(*rows.values()))
               if any(_number(v.get(m)) is not None for v in rows.values())]
    if not metrics:
        return None
    lines = [f"| {label} | rows | " + " | ".join(METRIC_NAMES.get(m) or f"`{m}`" for m in metrics) + " |",
             "|---|---:|" + "---:|" * len(metrics)]
    for name, values in rows.items():
        n = values.get("n")
        lines.append(f"| {name} | {n if isinstance(n, int) else MISSING} | "
                     + " | ".join(_fmt(_number(values.get(m))) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.3f}"


def _curves_section(f: _Facts) -> str:
    if not f.has_loss_plot:
        return ""
    lines = ["## Training curves\n", "![training and validation loss](plots/loss.png)\n"]
    lines += [f"![{Path(name).stem.replace('_', ' ')}](plots/{name})\n" for name in f.other_plots]
    return "\n".join(lines)


def _recipe_section(f: _Facts) -> str:
    return ("## Training recipe\n\nThe resolved recipe (every default filled in); save it as recipe.yaml and "
            "rerun the training with `ift train recipe.yaml`.\n\n<details>\n<summary>recipe.yaml</summary>\n\n"
            + _fenced(f.recipe.to_yaml().rstrip("\n"), "yaml") + "\n</details>\n")


def _use_section(f: _Facts) -> str:
    names = ", ".join(s["name"] for s in f.sources)
    return ("## Intended use and limitations\n\n"
            f"Intended for research and prototyping on tasks like those of its training data ({names}), "
            "prompted the way the templates above prompt. It was evaluated only on the held-out splits "
            "reported here; scores on other data, other phrasings or other languages may be much lower. "
            f"It inherits the limitations and biases of its base model ({f.base}) and of its training data, "
            "can produce fluent but wrong output, and should not be used for decisions with legal, "
            "financial or medical consequences without human review.\n")


def _load_section(f: _Facts) -> str:
    prompt = repr(f.example or "Your prompt, written like the templates above.")
    decode = ("outputs[0]" if f.kind == "seq2seq" else "outputs[0][inputs['input_ids'].shape[1]:]")
    if f.chat and f.recipe.data.conversational and _tool_origins(f):  # trained with tools: hand them over
        encode = (f"messages = [{{\"role\": \"user\", \"content\": {prompt}}}]\n"
                  f"tools = {json.dumps(EXAMPLE_TOOLS)}  # your function schemas\n"
                  "text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, "
                  "add_generation_prompt=True)\n"
                  "# the chat template writes its own special tokens\n"
                  "inputs = tokenizer(text, return_tensors=\"pt\", add_special_tokens=False)\n")
    elif f.chat:  # the model was trained on prompts inside the chat template: prompt it the same way
        encode = (f"messages = [{{\"role\": \"user\", \"content\": {prompt}}}]\n"
                  "text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)\n"
                  "# the chat template writes its own special tokens\n"
                  "inputs = tokenizer(text, return_tensors=\"pt\", add_special_tokens=False)\n")
    else:
        encode = f"inputs = tokenizer({prompt}, return_tensors=\"pt\")\n"
    generate = (encode + "outputs = model.generate(**inputs, max_new_tokens=64)\n"
                f"print(tokenizer.decode({decode}, skip_special_tokens=True))")
    lines = ["## How to use\n"]
    if f.adapter:
        peft_class = "AutoPeftModelForSeq2SeqLM" if f.kind == "seq2seq" else "AutoPeftModelForCausalLM"
        if f.base_hub_id:
            lines.append(f"This repository holds the adapter only; peft loads its base model ({f.base_hub_id}) "
                         "automatically:\n")
        else:
            lines.append("This repository holds the adapter only. Its base was a local model without a Hub id "
                         "(set `model.hub_id` in the recipe and push again to record one), so peft can load it "
                         "only where that folder exists; elsewhere load the base yourself and apply the adapter "
                         f"with `PeftModel.from_pretrained(base, \"{f.load_id}\")`:\n")
        lines.append(_fenced(f"from peft import {peft_class}\nfrom transformers import AutoTokenizer\n\n"
                             f"model = {peft_class}.from_pretrained(\"{f.load_id}\")\n"
                             f"tokenizer = AutoTokenizer.from_pretrained(\"{f.load_id}\")\n" + generate, "python"))
        lines.append("Merged into the base (a standalone model, no peft needed at inference): "
                     "`model = model.merge_and_unload()`, or `ift merge RUN_DIR` (in the base's own dtype, never "
                     "4-bit) and `ift push RUN_DIR --merge`, then load it with "
                     f"`{f.auto_class}.from_pretrained(...)`.\n")
    else:
        lines.append("A standalone model (no peft needed):\n")
        lines.append(_fenced(f"from transformers import {f.auto_class}, AutoTokenizer\n\n"
                             f"model = {f.auto_class}.from_pretrained(\"{f.load_id}\")\n"
                             f"tokenizer = AutoTokenizer.from_pretrained(\"{f.load_id}\")\n" + generate, "python"))
    return "\n".join(lines)


def _fenced(text: str, lang: str) -> str:
    """A code block whose fence is longer than any backtick run inside (template text is arbitrary)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}\n"


def _inline(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    tick = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{tick}{pad}{text}{pad}{tick}"
