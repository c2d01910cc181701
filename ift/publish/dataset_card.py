"""The dataset card for `hub.push_dataset`: the prepared splits' README.md, built with huggingface_hub's
`DatasetCard` / `DatasetCardData`.

It says where every row came from: the sources and their origin (Hub id, config, revision, or a local
file), the templates used with their row counts, the rows per split and source, which splits were carved
from a source's train split and how (seed, data.validation_size / data.test_size, stratification), what
the leak check removed, and the training mixture achieved against the weights asked for. Everything comes
from ift.data.prepare's split report (PreparedData.report) and the data section as run (PreparedData.data).

The metadata parses back with `DatasetCard(text).data`. `datasets`' own push_to_hub writes `configs` and
`dataset_info` into the card; pass them as `metadata` and they are kept, so load_dataset and the Hub's
viewer read the splits as datasets wrote them. The body is plain text, never a Jinja template.
"""

from __future__ import annotations

from typing import Any

from ift.recipe import SPLITS, Recipe

CARD_TAGS = ["ift", "instruction-tuning"]
# the columns ift.data.prepare writes, in the order the card explains them
COLUMNS = {
    "prompt": "the templated input (a conversation's last user or tool turn)",
    "completion": "the target the model is trained to produce (a conversation's final reply, its text: a reply "
                  "of tool calls only has none, its calls are in `chat`)",
    "choices": "the answer choices of the row's template (rank-classification accuracy), or null",
    "source": "the name of the source the row came from (`data.sources[].name`)",
    "template": "the template reference that rendered the row (empty for raw text, `(format)` for conversations)",
    "messages": "a conversational row's whole conversation ({role, content} turns, tool calls and reasoning "
                "left out; empty for template rows)",
    "chat": "a conversation with tool calls, tool results' ids, reasoning or function schemas, whole: JSON text "
            "`{\"messages\": [...], \"tools\": [...]}` whose messages keep `tool_calls` (arguments as JSON objects), "
            "`tool_call_id` and `reasoning_content` (what the chat template was given in training); empty for plain "
            "{role, content} conversations and template rows",
    "label": "the source's label column, when it has one",
}
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
# metadata that datasets' push_to_hub owns; everything else in the card is ours
DATASETS_KEYS = ("configs", "dataset_info")


def build_dataset_card(prepared: Any, recipe: Recipe | None, repo_id: str, *, metadata: dict | None = None):
    """The card for `prepared` (ift.data.prepare.PreparedData) published as dataset repo `repo_id`.

    metadata: the card data datasets' push_to_hub wrote (its configs and dataset_info are kept).
    """
    from huggingface_hub import DatasetCard, DatasetCardData

    facts = _Facts(prepared, recipe, repo_id)
    kept = {k: v for k, v in (metadata or {}).items() if k in DATASETS_KEYS}
    data = DatasetCardData(
        pretty_name=facts.pretty_name,
        task_categories=["text-generation"],
        size_categories=[_size_category(facts.total_rows)],
        tags=CARD_TAGS + [t for t in _source_tags(facts) if t not in CARD_TAGS],
        **kept,
    )
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{_body(facts)}")


class _Facts:
    """What the card says, read once from the prepared data and its report."""

    def __init__(self, prepared: Any, recipe: Recipe | None, repo_id: str):
        self.repo_id = repo_id
        self.report: dict = prepared.report if isinstance(getattr(prepared, "report", None), dict) else {}
        self.data = getattr(prepared, "data", None) or (recipe.data if recipe is not None else None)
        self.recipe = recipe
        splits = prepared.splits
        self.rows = {s: len(splits[s]) if s in splits else 0 for s in SPLITS}
        self.columns = list(splits["train"].column_names) if "train" in splits else []
        # rows whose whole conversation (calls, reasoning, tools) is in the `chat` column, per split
        self.chat_rows = {s: sum(1 for c in splits[s]["chat"] if c) if s in splits and "chat" in
                          splits[s].column_names else 0 for s in SPLITS}
        self.total_rows = sum(self.rows.values())
        self.pretty_name = repo_id.split("/")[-1]
        report_sources = self.report.get("sources") if isinstance(self.report.get("sources"), dict) else {}
        self.sources: list[dict[str, Any]] = []
        for cfg in (self.data.sources if self.data is not None else []):
            from ift.data.cache import source_name

            name = source_name(cfg)
            info = report_sources.get(name) if isinstance(report_sources.get(name), dict) else {}
            self.sources.append({"name": name, "cfg": cfg, "info": info, "hub": _is_hub(cfg, info)})
        self.split_report = self.report.get("splits") if isinstance(self.report.get("splits"), dict) else {}
        self.leaks = self.report.get("leaks") if isinstance(self.report.get("leaks"), dict) else {}
        self.mixture = self.report.get("mixture") if isinstance(self.report.get("mixture"), dict) else {}

    def source_rows(self, name: str, split: str) -> int | None:
        entry = self.split_report.get(split) or {}
        info = (entry.get("sources") or {}).get(name) or {}
        rows = info.get("rows")
        return rows if isinstance(rows, int) and not isinstance(rows, bool) else None

    def templates_used(self, name: str) -> dict[str, dict[str, int]]:
        """{template ref: {split: rows}} for one source, as the rows say."""
        used: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            info = ((self.split_report.get(split) or {}).get("sources") or {}).get(name) or {}
            for ref, k in (info.get("templates") or {}).items():
                used.setdefault(ref, {})[split] = k
        return used


def _is_hub(cfg: Any, info: dict) -> bool:
    if info.get("origin"):
        return info["origin"] == "hub"
    from ift.locations import looks_like_hub_id
    from ift.publish.card import DATA_SUFFIXES

    return looks_like_hub_id(cfg.path, DATA_SUFFIXES)


def _size_category(n: int) -> str:
    for limit, name in SIZE_CATEGORIES:
        if n < limit:
            return name
    return "n>1B"


def _source_tags(f: _Facts) -> list[str]:
    return [] if not f.sources else (["mixture"] if len(f.sources) > 1 else [])


# ---------------------------------------------------------------- the body


def _body(f: _Facts) -> str:
    parts = [_summary(f), _splits_section(f), _sources_section(f), _carving_section(f), _leaks_section(f),
             _mixture_section(f), _templates_section(f), _columns_section(f), _use_section(f), _recipe_section(f)]
    return "\n".join(p for p in parts if p)


def _summary(f: _Facts) -> str:
    names = ", ".join(s["name"] for s in f.sources) or "the recipe's sources"
    text = [f"# {f.pretty_name}\n\n",
            f"Instruction-tuning splits prepared by ift from {names}: "
            f"{f.total_rows:,} templated rows ({', '.join(f'{s} {f.rows[s]:,}' for s in SPLITS)})."]
    model = getattr(getattr(f.recipe, "hub", None), "repo_id", None)
    if model:
        text.append(f" They are the data the model [{model}](https://huggingface.co/{model}) was trained and "
                    "evaluated on.")
    return "".join(text) + "\n"


def _splits_section(f: _Facts) -> str:
    lines = ["## Splits\n", "| source | train | validation | test |", "|---|---:|---:|---:|"]
    for s in f.sources:
        counts = [f.source_rows(s["name"], split) for split in SPLITS]
        lines.append(f"| {s['name']} | " + " | ".join("—" if c is None else f"{c:,}" for c in counts) + " |")
    lines.append("| **total** | " + " | ".join(f"{f.rows[s]:,}" for s in SPLITS) + " |")
    empty = [s for s in SPLITS if f.rows[s] == 0]
    note = f"\nThe {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty and not uploaded.\n" \
        if empty else ""
    return "\n".join(lines) + "\n" + note


def _origin(s: dict) -> str:
    cfg = s["cfg"]
    if s["hub"]:
        text = f"Hub dataset [{cfg.path}](https://huggingface.co/datasets/{cfg.path})"
        if cfg.config:
            text += f", config `{cfg.config}`"
        text += f", revision `{cfg.revision}`" if cfg.revision else ", revision `main` (not pinned)"
        return text
    kind = {"file": "local file", "folder": "local folder", "save_to_disk": "local save_to_disk folder"}
    return f"{kind.get(s['info'].get('origin'), 'local data')} `{cfg.path}` (not on the Hub)"


def _sources_section(f: _Facts) -> str:
    if not f.sources:
        return ""
    lines = ["## Sources\n", "| source | origin | its own splits used | carved from its train split |",
             "|---|---|---|---|"]
    for s in f.sources:
        names = s["cfg"].splits
        own = s["info"].get("own")
        own = own if isinstance(own, list) else [sp for sp in SPLITS if getattr(names, sp) is not None]
        used = ", ".join(sp if (getattr(names, sp) or sp) == sp else f"{getattr(names, sp)} → {sp}" for sp in own)
        carved = s["info"].get("carved") if isinstance(s["info"].get("carved"), dict) else {}
        carved_text = ", ".join(f"{sp} ({k:,} rows)" for sp, k in carved.items()) or "none"
        lines.append(f"| {s['name']} | {_origin(s)} | {used or 'none'} | {carved_text} |")
    return "\n".join(lines) + "\n"


def _size_setting(value: float) -> str:
    return f"{value * 100:g}% of the source's train rows" if value < 1 else f"{int(value):,} rows"


def _carving_section(f: _Facts) -> str:
    carving = [s for s in f.sources if isinstance(s["info"].get("carved"), dict) and s["info"]["carved"]]
    lines = ["## How the splits were made\n"]
    if not carving:
        lines.append("Every split is a source's own split: nothing was carved from train.")
        return "\n".join(lines) + "\n"
    d = f.data
    lines.append(f"Where a source lacks a validation or test split, ift carved it from that source's train split "
                 f"at random, seeded (`data.seed: {d.seed}`, with the source's name), sized by "
                 f"`data.validation_size: {d.validation_size:g}` ({_size_setting(d.validation_size)}) and "
                 f"`data.test_size: {d.test_size:g}` ({_size_setting(d.test_size)}); the carved rows are not in "
                 "train. Rebuilding with the same recipe gives the same rows.\n")
    for s in carving:
        info = s["info"]
        held = " and ".join(f"{sp} ({k:,} rows)" for sp, k in info["carved"].items())
        how = f", stratified by `{info['stratified_by']}`" if info.get("stratified_by") else (
            f", at random ({info['not_stratified']})" if info.get("not_stratified") else "")
        lines.append(f"- **{s['name']}**: {held} carved from `{s['cfg'].splits.train or 'train'}`{how} — "
                     "not the source's official split.")
    return "\n".join(lines) + "\n"


def _leaks_section(f: _Facts) -> str:
    lines = ["## Leak check\n"]
    if not f.leaks or not f.leaks.get("checked"):
        lines.append("Not run (`data.leak_check: false`): an example may be in two splits.")
        return "\n".join(lines) + "\n"
    train, val = int(f.leaks.get("train") or 0), int(f.leaks.get("validation") or 0)
    lines.append("The leak check keeps every example (same prompt and completion) in one split only: rows of "
                 "train that are also in validation or test, and rows of validation that are also in test, were "
                 "removed. "
                 f"Removed: {train:,} from train, {val:,} from validation.")
    removed = f.leaks.get("removed") if isinstance(f.leaks.get("removed"), dict) else {}
    if len(removed) > 1 and (train or val):
        lines += ["", "| source | removed from train | removed from validation |", "|---|---:|---:|"]
        lines += [f"| {name} | {int(v.get('train', 0)):,} | {int(v.get('validation', 0)):,} |"
                  for name, v in removed.items() if isinstance(v, dict)]
    return "\n".join(lines) + "\n"


def _mixture_section(f: _Facts) -> str:
    sources = f.mixture.get("sources") if isinstance(f.mixture.get("sources"), dict) else {}
    if not sources:
        return ""
    strategy = f.mixture.get("strategy")
    lines = ["## Training mixture\n"]
    if strategy == "weighted":
        lines.append(f"Weighted: {int(f.mixture.get('total') or 0):,} training rows drawn from the sources by "
                     "their normalised weights (a source with too few rows is repeated).\n")
    else:
        caps = (f" capped at {f.data.mixture.cap:,} rows per source" if f.data is not None and f.data.mixture.cap
                else "")
        lines.append(f"Proportional: every training row of every source{caps} "
                     "(`data.sources[].max_rows` caps one source).\n")
    lines += ["| source | rows available | rows in train | share achieved | weight asked | repeated |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, v in sources.items():
        weight = v.get("weight")
        repeated = v.get("repeated")
        lines.append(f"| {name} | {int(v.get('available') or 0):,} | {int(v.get('rows') or 0):,} | "
                     f"{float(v.get('row_share') or 0):.1%} | {'—' if weight is None else f'{weight:.1%}'} | "
                     f"{'—' if not repeated else f'×{repeated:g}'} |")
    return "\n".join(lines) + "\n"


def _templates_section(f: _Facts) -> str:
    lines = ["## Templates\n",
             "Each row was rendered by one template (promptsource format; the `template` column names it).\n",
             "| source | template | train | validation | test |", "|---|---|---:|---:|---:|"]
    any_row = False
    for s in f.sources:
        for ref, counts in f.templates_used(s["name"]).items():
            any_row = True
            name = "(raw text)" if ref in ("", "(raw text)") else f"`{ref}`"
            lines.append(f"| {s['name']} | {name} | " + " | ".join(f"{counts.get(sp, 0):,}" for sp in SPLITS) + " |")
    if not any_row:
        for s in f.sources:
            refs = ", ".join(f"`{r}`" for r in s["cfg"].templates) or "(raw text)"
            lines.append(f"| {s['name']} | {refs} | — | — | — |")
    mode = {s["name"]: s["info"].get("template_mode") or s["cfg"].template_mode for s in f.sources}
    every = [n for n, m in mode.items() if m == "all"]
    if every:
        lines.append(f"\n{', '.join(every)}: every template applied to every row (`template_mode: all`); "
                     "the others: one template drawn per row.")
    fixed = [(s["name"], s["cfg"].eval_template) for s in f.sources if s["cfg"].eval_template]
    if fixed:
        lines.append("\nValidation and test use one fixed template: "
                     + ", ".join(f"{n} `{t}`" for n, t in fixed) + ".")
    return "\n".join(lines) + "\n"


def _columns_section(f: _Facts) -> str:
    lines = ["## Columns\n"]
    for c in f.columns:
        line = f"- `{c}`: {COLUMNS.get(c, 'a column of the source')}"
        if c == "chat" and any(f.chat_rows.values()):
            line += " (" + ", ".join(f"{f.chat_rows[s]:,} rows of {s}" for s in SPLITS) + ")"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _use_section(f: _Facts) -> str:
    chat = ""
    if f.chat_rows["train"]:  # conversations with calls, reasoning or tools: whole in `chat`
        chat = ('\nrow = next(r for r in ds["train"] if r["chat"])  # a conversation with calls, reasoning or tools\n'
                'whole = json.loads(row["chat"])  # {"messages": [...], "tools": [...]}: both go to the chat '
                'template\n')
    return ("## Use\n\n```python\n" + ("import json\n\n" if chat else "") + "from datasets import load_dataset\n\n"
            f'ds = load_dataset("{f.repo_id}")\n'
            'print(ds["train"][0]["prompt"], ds["train"][0]["completion"])\n' + chat + "```\n")


def _recipe_section(f: _Facts) -> str:
    if f.data is None:
        return ""
    import yaml

    text = yaml.safe_dump({"data": f.data.model_dump(mode="json")}, sort_keys=False, allow_unicode=True)
    fence = "```"
    while fence in text:
        fence += "`"
    return ("<details>\n<summary>The recipe's data section (ift), as run</summary>\n\n"
            f"{fence}yaml\n{text}{fence}\n\n</details>\n")
