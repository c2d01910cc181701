"""The recipe's data section -> honest train/validation/test splits of prompt/completion pairs -> tokens.

    sources (local files/folders or Hub ids; a data map's local copies) ─ load, name labels, rename columns
      └ keep the source's own splits; carve missing ones from train (seeded, optionally stratified)
        └ render templates per row (one drawn at random, or every one) ─ raw text when none ─ or, for a
          conversational format (messages, sharegpt, prompt_completion, alpaca), one message list per row
          └ leak check: a (prompt, completion) pair, or a whole conversation, also in validation/test leaves train
            └ training mixture (weighted to a total, or examples-proportional with caps)
              └ tokenize: prompt tokens masked with -100, targets never cut silently; conversations in the chat
                template with loss on assistant replies only (ift.data.conversations)

Every expensive step is a `datasets` map or select with a fingerprint computed from its inputs
(ift.data.cache: parent fingerprint, settings, templates, tokenizer, this folder's code), so a second
identical run reuses the Arrow cache files instead of recomputing. Carving happens on raw rows, before
templating, so the template expansions of one row never straddle two splits.

Each stage lives in its own module of this folder (see ift/data/__init__.py); this one holds build_splits,
which runs them up to the mixture (tokenize is ift.data.tokenization's), and check_sources, `ift validate`'s
view of the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ift.data.cache import source_name
from ift.data.data_map import apply_data_map
from ift.data.mixture import mix_trains
from ift.data.rendering import check_columns, render_split, resolve_templates
from ift.data.reports import summarise, template_counts
from ift.data.sources import (check_conversations, check_source_values, load_source, is_local_source, peek_columns, LoadedSource,
                              resolve_format)
from ift.data.splits import assign_rows, carve_split, check_stratify, explicit_splits, remove_leaks
from ift.errors import IftError, IftErrors
from ift.recipe import ALPACA_TEMPLATE, SPLITS, DataConfig, SourceConfig

__all__ = ["PreparedData", "build_splits", "check_sources"]


@dataclass
class PreparedData:
    """Templated splits (`prompt`, `completion`, `choices`, `source`, `template`) and what was done."""

    splits: Any  # datasets.DatasetDict with "train", "validation", "test"
    report: dict = field(default_factory=dict)
    # the data section as run: a default split name the source lacks (so the split was carved) pinned to null,
    # and every source's format as detected, so that a run's saved recipe.yaml rebuilds the same splits
    data: DataConfig | None = None


# ------------------------------------------------------------------------------------- build_splits


def build_splits(data: DataConfig, library: Any) -> PreparedData:
    """Load, carve, template, leak-check and mix the recipe's sources into train/validation/test."""
    import datasets

    data = apply_data_map(data)
    per_source, eval_fixed, errors = resolve_templates(data, library)
    if errors:
        raise IftErrors(errors)
    sources = [load_source(i, src, per_source[i], eval_fixed[i]) for i, src in enumerate(data.sources)]
    for source in sources:
        _set_format(source, per_source, eval_fixed, library, data)
    report: dict[str, Any] = {"sources": {}, "splits": {s: {"rows": 0, "sources": {}} for s in SPLITS}}
    carve_report: dict[str, Any] = {}
    rendered: dict[str, dict[str, Any]] = {}
    assignments = [assign_rows(source) for source in sources]
    check_stratify(data, sources, assignments)
    for source, templates, fixed, assigned in zip(sources, per_source, eval_fixed, assignments):
        errors = []
        for split, ds in assigned.items():  # a source's own splits may differ (SST-2's test has no label)
            if ds is not None:
                fixed_here = fixed is not None and split != "train"
                errors += check_columns(source, [fixed] if fixed_here else templates, ds.column_names, split,
                                         "eval_template" if fixed_here else "templates")
        if errors:
            raise IftErrors(errors)
        splits = carve_split(source, assigned, data, carve_report)
        rendered[source.name] = {}
        for split in SPLITS:
            use = [fixed] if (fixed is not None and split != "train") else templates
            ds, expected = render_split(splits[split], source, split, use, data)
            rendered[source.name][split] = ds
            report["splits"][split]["sources"][source.name] = {
                "rows_in": len(splits[split]), "expected": expected,
                "rendered": {tpl: k for (_, tpl), k in template_counts(ds).items()}}
        report["sources"][source.name] = {
            "path": source.cfg.path, "origin": source.origin, "columns": source.columns(),
            "format": source.format,
            "templates": [t.ref for t in templates], "eval_template": fixed.ref if fixed is not None else None,
            "template_mode": source.cfg.template_mode if templates else (
                "raw text" if source.format == "text" else "conversation"),
            **carve_report[source.name], **({"ignored_files": source.ignored_files} if source.ignored_files else {}),
        }
    leaks = remove_leaks(rendered) if data.leak_check else {n: {"train": 0, "validation": 0} for n in rendered}
    report["leaks"] = {"checked": data.leak_check, "removed": leaks,
                       "train": sum(v["train"] for v in leaks.values()),
                       "validation": sum(v["validation"] for v in leaks.values())}
    _check_not_empty(rendered, report, sources)
    train, report["mixture"] = mix_trains({n: s["train"] for n, s in rendered.items()}, data)
    final = {"train": train}
    for split in ("validation", "test"):
        parts = [s[split] for s in rendered.values() if len(s[split])]
        final[split] = datasets.concatenate_datasets(parts) if len(parts) > 1 else (
            parts[0] if parts else rendered[sources[0].name][split])
    dd = datasets.DatasetDict({s: final[s].remove_columns("_pair") for s in SPLITS})
    summarise(dd, report)
    return PreparedData(dd, report, _pin_carved(data, assignments, [s.format for s in sources]))


def _first_row(source: LoadedSource) -> dict | None:
    ds = source.raw.get(source.cfg.splits.train or "") or next(iter(source.raw.values()), None)
    return ds[0] if ds is not None and len(ds) else None


def _set_format(source: LoadedSource, per_source: list[list[Any]], eval_fixed: list[Any], library: Any,
                data: DataConfig) -> None:
    """Decide the source's format; alpaca rows get the shipped template unless the source names its own; every
    conversation is checked before any carving, so a bad row is named as its file numbers it."""
    i = source.index
    source.format = resolve_format(source.cfg, bool(per_source[i]), source.columns(), _first_row(source), source.key)
    if source.format == "alpaca" and not per_source[i]:
        per_source[i] = [library.get(ALPACA_TEMPLATE)]
        check_source_values(source, per_source[i], eval_fixed[i])
    check_conversations(source, data.system_prompt)


def _pin_carved(data: DataConfig, assignments: list[dict[str, Any | None]], formats: list[str]) -> DataConfig:
    sources = [src.model_copy(update={"splits": src.splits.model_copy(
                   update={split: None for split, ds in assigned.items() if ds is None}), "format": fmt})
               for src, assigned, fmt in zip(data.sources, assignments, formats)]
    return data.model_copy(update={"sources": sources})


def _check_not_empty(rendered: dict[str, dict[str, Any]], report: dict, sources: list[LoadedSource]) -> None:
    for source in sources:
        for split in SPLITS:
            ds = rendered[source.name][split]
            info = report["splits"][split]["sources"][source.name]
            if len(ds) or (info["rows_in"] == 0 and split != "train" and _requested_zero(report, source, split)):
                continue
            why = (f"{info['rows_in']} rows before templating" if info["rows_in"] == 0 else
                   f"all {info['rows_in']} rows were skipped by the templates or removed as leaks")
            raise IftError(f"split '{split}' of source '{source.name}' is empty ({why})",
                           f"{source.key}", "check the templates apply to this data (`ift templates validate REF "
                           "--data PATH`), the split sizes, and the source's rows")


def _requested_zero(report: dict, source: LoadedSource, split: str) -> bool:
    """validation_size/test_size 0 asks for no such split: empty is intended, not an error."""
    info = report["sources"][source.name]
    return split not in info["own"] and split not in info["carved"]


# ------------------------------------------------------------------------------------- check_sources


def check_sources(data: DataConfig, library: Any) -> list[IftError]:
    """Checks for `ift validate`, every problem at once: template refs; local data read as training reads it
    (the same errors); Hub datasets by their metadata only (reachable, splits, columns); named splits; that
    the columns the templates read exist in each split used. Sources a data map names are checked on their copy."""
    try:
        data = apply_data_map(data)
    except IftError as err:
        return err.errors if isinstance(err, IftErrors) else [err]
    per_source, eval_fixed, errors = resolve_templates(data, library)
    stratify_seen: list[tuple[str, list[str]]] = []
    for i, src in enumerate(data.sources):
        key = f"data.sources.{i}"
        try:
            by_split = peek_columns(i, src, per_source[i], eval_fixed[i])
        except IftError as err:
            errors.append(err)
            continue
        if by_split is None:
            continue  # a Hub dataset whose columns we cannot see without downloading it
        probe = LoadedSource(i, src, source_name(src), {}, "")
        every = sorted({c for cols in by_split.values() for c in cols})
        errors += [IftError(f"column '{old}' to rename is not in the source", f"{key}.columns",
                            f"columns are: {', '.join(every)}") for old in src.columns if old not in every]
        errors += [IftError(f"column '{col}' given label names is not in the source", f"{key}.labels",
                            f"columns are: {', '.join(every)}") for col in src.labels if col not in every]
        try:
            probe.format = _validated_format(i, src, per_source, eval_fixed, library, data,
                                             [src.columns.get(c, c) for c in every])
        except IftError as err:
            errors.append(err)
            continue
        explicit = explicit_splits(src)
        for ours in SPLITS:
            theirs = getattr(src.splits, ours)
            if theirs is None:
                continue
            if theirs not in by_split:
                if ours in explicit or ours == "train":
                    errors.append(IftError(f"split '{theirs}' is not in source '{probe.name}' (it has: "
                                           f"{', '.join(by_split)})", f"{key}.splits.{ours}",
                                           "name one of its splits, or null to carve it from train"))
                continue
            renamed = [src.columns.get(c, c) for c in by_split[theirs]]
            if ours == "train" and data.stratify_by:
                stratify_seen.append((probe.name, renamed))
            fixed_here = eval_fixed[i] is not None and ours != "train"
            if (src.eval_template and ours != "train" and not fixed_here) or (src.templates and not per_source[i]):
                continue  # its template refs did not resolve (reported): no templates is not raw text here
            errors += check_columns(probe, [eval_fixed[i]] if fixed_here else per_source[i], renamed, ours,
                                     "eval_template" if fixed_here else "templates")
    if stratify_seen and not any(data.stratify_by in cols for _, cols in stratify_seen):
        name, columns = stratify_seen[0]
        errors.append(IftError(f"stratify column '{data.stratify_by}' is not in source '{name}'", "data.stratify_by",
                               f"columns are: {', '.join(columns)}"))
    unique: dict[str, IftError] = {}
    for err in errors:  # a template checked against several splits fails the same way once
        unique.setdefault(err.line(), err)
    return list(unique.values())


def _validated_format(i: int, src: SourceConfig, per_source: list[list[Any]], eval_fixed: list[Any], library: Any,
                      data: DataConfig, columns: list[str]) -> str:
    """`ift validate`'s view of a source's format; a local conversational source has every row checked, as
    training checks them."""
    if src.format in ("auto", "messages", "sharegpt", "prompt_completion", "alpaca") and is_local_source(src.path) \
            and not (src.templates and src.format == "auto"):
        source = load_source(i, src, per_source[i], eval_fixed[i])
        _set_format(source, per_source, eval_fixed, library, data)
        return source.format
    fmt = resolve_format(src, bool(per_source[i]) or bool(src.templates), columns, None, f"data.sources.{i}")
    if fmt == "alpaca" and not per_source[i]:
        per_source[i] = [library.get(ALPACA_TEMPLATE)]
    return fmt
