"""The base-vs-fine-tuned table of a run, printed at the end of training and by `ift eval --compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ift.errors import IftError
from ift.metrics import SCORES, recorded_module_figures

COMPARED = tuple(m for m in SCORES if m != "accuracy_norm")


def fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def compare_table(base: dict, tuned: dict) -> list[dict]:
    """Rows (metric, base, fine-tuned, delta) for the metrics either side has; None where one is missing.

    After the registry's scores come the evaluate modules' figures, then each answer choice's F1
    (`per_class.<label>.f1`, labels of the fine-tuned side first), where either side has per-class figures.
    """
    rows = []
    for name in (*COMPARED, *recorded_module_figures(tuned, base)):
        rows.append(_row(name, base.get(name), tuned.get(name)))
    for label in per_class_labels(base, tuned):
        rows.append(_row(f"per_class.{label}.f1", _class_f1(base, label), _class_f1(tuned, label)))
    return [r for r in rows if r is not None]


def _row(name: str, b, t) -> dict | None:
    if b is None and t is None:
        return None
    return {"metric": name, "base": b, "fine-tuned": t, "delta": (t - b) if (b is not None and t is not None) else None}


def per_class_labels(*sections: dict) -> list[str]:
    """The labels of the sections' per-class figures, in order of first appearance."""
    order: dict[str, None] = {}
    for section in reversed(sections):
        per_class = section.get("per_class") if isinstance(section, dict) else None
        order.update(dict.fromkeys(per_class if isinstance(per_class, dict) else ()))
    return list(order)


def _class_f1(section: dict, label: str):
    figures = (section.get("per_class") or {}).get(label)
    return figures.get("f1") if isinstance(figures, dict) else None


def compare_sections(run_dir: Path, split: str, metrics: dict | None = None) -> tuple[dict, dict]:
    """(base, fine-tuned) figures for a split: the training run's own where they hold a score (a run that computed
    only its loss has none), else the newest full `ift eval` record. `metrics`: metrics.json's content as the
    caller holds it (else read)."""
    from ift.run import RunDir

    rd = RunDir(run_dir)
    if metrics is None:
        if not rd.metrics_file.is_file():
            raise IftError("no metrics.json in the run directory", str(run_dir), "train or evaluate the run first")
        metrics = rd.metrics()
    sides = []
    for model, own in (("base", (metrics.get("base") or {}).get(split)), ("fine-tuned", metrics.get(split))):
        record = rd.latest_evaluation(model, split)
        figures = own if _scored(own) else (record or {}).get("metrics") or own
        if not figures:
            flag = " --base" if model == "base" else ""
            raise IftError(f"no {model} results for the {split} split", str(rd.metrics_file),
                           f"run `ift eval {run_dir}{flag} --split {split}` first")
        sides.append(figures)
    return sides[0], sides[1]


def _scored(figures: dict | None) -> bool:
    return isinstance(figures, dict) and (any(name in figures for name in SCORES)
                                          or bool(recorded_module_figures(figures)))


def print_compare(run_dir: Path, split: str, metrics: dict | None = None) -> None:
    """The base-vs-fine-tuned table, the benchmarks and the confusion matrices; `metrics` as compare_sections."""
    from rich.console import Console
    from rich.table import Table

    base, tuned = compare_sections(run_dir, split, metrics)
    rows = compare_table(base, tuned)
    table = Table(title=f"{run_dir} — {split}: base vs fine-tuned")
    for col in ("metric", "base", "fine-tuned", "delta"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for r in rows:
        delta = "—" if r["delta"] is None else f"{r['delta']:+.4f}"
        table.add_row(r["metric"], fmt(r["base"]), fmt(r["fine-tuned"]), delta)
    console = Console()
    console.print(table)
    print_benchmarks(run_dir, console, metrics)
    for side, figures in (("base", base), ("fine-tuned", tuned)):
        cm = figures.get("confusion_matrix")
        if isinstance(cm, dict) and cm.get("labels"):
            console.print(confusion_table(cm, f"{split}, {side}: confusion matrix (rows: target, columns: predicted)"))


def confusion_table(cm: dict, title: str):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("target \\ predicted")
    for label in cm["labels"]:
        table.add_column(str(label), justify="right")
    for label, row in zip(cm["labels"], cm["matrix"]):
        table.add_row(str(label), *map(str, row))
    return table


def print_benchmarks(run_dir: Path, console=None, metrics: dict | None = None) -> bool:
    """The run's `benchmarks` section (base → fine-tuned per lm-eval task), if it has one; whether it had.
    `metrics`: metrics.json's content as the caller holds it (else read)."""
    from rich.console import Console
    from rich.table import Table

    from ift.evaluation.benchmarks import fmt_value, rows
    from ift.run import RunDir

    rd = RunDir(run_dir)
    if metrics is None:
        metrics = rd.metrics() if rd.metrics_file.is_file() else {}
    section = metrics.get("benchmarks")
    found = rows(section)
    if not found:
        return False
    table = Table(title=f"{run_dir} — benchmarks (lm-eval): base vs fine-tuned, ± the harness's standard error")
    for col in ("task", "metric", "n", "base", "fine-tuned", "delta"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for r in found:
        delta = "—" if r["delta"] is None else f"{r['delta']:+.4f}"
        table.add_row(r["task"], r["metric"], fmt(r["n"]), fmt_value(r["base"], r["base_stderr"]),
                      fmt_value(r["fine-tuned"], r["fine-tuned_stderr"]), delta)
    (console or Console()).print(table)
    return True
