"""Reports on prepared splits: per-split summaries, label and conversation stats, `ift data` stats and previews."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from ift.data.tokenization import TokenEncoder, length_percentiles, arrow_table
from ift.recipe import SPLITS, DataConfig



def template_counts(ds: Any) -> Counter:
    table = arrow_table(ds)
    if table is None:
        return Counter()
    return Counter(zip(table.column("source").to_pylist(), table.column("template").to_pylist()))


def summarise(dd: Any, report: dict) -> None:
    """Per split and source: final rows and templates used, rows the templates skipped, leaks removed."""
    for split in SPLITS:
        entry = report["splits"][split]
        entry["rows"] = len(dd[split])
        final = template_counts(dd[split])
        for name, info in entry["sources"].items():
            expected, rendered = info.pop("expected"), info.pop("rendered")
            used = {tpl or "(raw text)": k for (src, tpl), k in sorted(final.items()) if src == name}
            info["rows"] = sum(used.values())
            info["templates"] = used
            info["skipped"] = {tpl or "(raw text)": e - rendered.get(tpl, 0)
                               for tpl, e in expected.items() if e - rendered.get(tpl, 0)}
            info["leaks_removed"] = report["leaks"]["removed"][name].get(split, 0)


def label_distribution(ds: Any) -> dict[str, dict[str, int]]:
    """Per source: how often each completion occurs among rows that have answer choices."""
    table = arrow_table(ds)
    if table is None:
        return {}
    import pyarrow.compute as pc

    has_choices = pc.greater(pc.list_value_length(table.column("choices")), 0)
    rows = table.filter(has_choices).select(["source", "completion"])
    if not rows.num_rows:
        return {}
    counts = rows.group_by(["source", "completion"]).aggregate([([], "count_all")]).to_pylist()
    out: dict[str, dict[str, int]] = {}
    for r in sorted(counts, key=lambda r: (r["source"], -r["count_all"], r["completion"])):
        out.setdefault(r["source"], {})[r["completion"]] = r["count_all"]
    return out


def conversation_stats(ds: Any) -> dict[str, dict[str, Any]]:
    """Per source with conversations: how many, turns per conversation (percentiles), assistant turns."""
    table = arrow_table(ds)
    if table is None or "messages" not in table.column_names:
        return {}
    import pyarrow.compute as pc

    turns = pc.list_value_length(table.column("messages")).fill_null(0).to_numpy(zero_copy_only=False)
    sources = np.array(table.column("source").to_pylist(), dtype=object)
    out = {}
    for name in sorted(set(sources[turns > 0].tolist())):
        m = (sources == name) & (turns > 0)
        roles = pc.struct_field(pc.list_flatten(table.column("messages").filter(pa.array(m))), "role")
        out[name] = {"conversations": int(m.sum()), "turns": length_percentiles(turns[m]),
                     "assistant_turns": int(pc.sum(pc.equal(roles, "assistant")).as_py() or 0)}
    return out


def describe(report: dict, splits: Any, token_report_: dict | None = None) -> dict:
    """Everything `ift data stats` shows, JSON-able: splits, sources, labels, tokens, leaks, mixture; from the
    prepared splits (`build_splits`' PreparedData: its report and splits) and the tokenization report."""
    out = {"splits": {}, "sources": report.get("sources", {}), "leaks": report.get("leaks", {}),
           "mixture": dict(report.get("mixture", {}))}
    for split in SPLITS:
        base = report["splits"][split]
        entry = {"rows": base["rows"], "sources": {}}
        labels = label_distribution(splits[split])
        conversations = conversation_stats(splits[split])
        tok = (token_report_ or {}).get(split, {})
        for name, info in base["sources"].items():
            src = {k: info[k] for k in ("rows", "templates", "skipped", "leaks_removed") if k in info}
            if name in labels:
                src["labels"] = labels[name]
            if tok:
                src["tokens"] = tok["sources"].get(name, {})
            if name in conversations:  # assistant tokens: the loss-carrying tokens of a conversational source
                src["conversation"] = {**conversations[name],
                                       "assistant_tokens": src.get("tokens", {}).get("loss_tokens")}
            entry["sources"][name] = src
        if tok:
            entry["tokens"] = {k: v for k, v in tok.items() if k != "sources"}
        out["splits"][split] = entry
    if token_report_ and "mixture_tokens" in token_report_:
        for name, v in token_report_["mixture_tokens"].items():
            out["mixture"]["sources"][name].update(v)
        out["tokenization"] = token_report_.get("settings", {})
    return out


def preview_rows(ds: Any, tokenizer: Any, kind: str, data: DataConfig, n: int = 5, seed: int = 0) -> list[dict]:
    """`n` rows drawn (seeded) from a templated split, with their token ids and loss labels.

    Tokenized directly (no cache files): what `tokenize` would produce for these rows.
    """
    if not len(ds):
        return []
    picks = np.random.default_rng(seed).choice(len(ds), size=min(n, len(ds)), replace=False)
    table = ds.with_format("arrow")[:].take(pa.array(picks))
    encoded = TokenEncoder(tokenizer, kind, data)(table)
    return encoded.to_pylist()
