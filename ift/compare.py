"""The base-vs-fine-tuned table of a run, printed at the end of training and by `ift eval --compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ift.errors import IftError


def fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def print_compare(run_dir: Path, split: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from ift.evaluation import compare_table, read_metrics_file

    path = run_dir / "metrics.json"
    if not path.is_file():
        raise IftError("no metrics.json in the run directory", str(run_dir), "train or evaluate the run first")
    metrics = read_metrics_file(path)
    if not (metrics.get("base") or {}).get(split):
        raise IftError(f"no base-model results for the {split} split", str(path),
                       f"run `ift eval {run_dir} --base --split {split}` first")
    if not metrics.get(split):
        raise IftError(f"no fine-tuned results for the {split} split", str(path),
                       f"run `ift eval {run_dir} --split {split}` first")
    rows = compare_table(metrics, split)
    table = Table(title=f"{run_dir} — {split}: base vs fine-tuned")
    for col in ("metric", "base", "fine-tuned", "delta"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for r in rows:
        delta = "—" if r["delta"] is None else f"{r['delta']:+.4f}"
        table.add_row(r["metric"], fmt(r["base"]), fmt(r["fine-tuned"]), delta)
    Console().print(table)
