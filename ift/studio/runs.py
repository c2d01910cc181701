"""A run folder, read-only: its curves, base vs fine-tuned, and its predictions filtered by template, label and
outcome. Nothing here writes into the run."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ift.evaluation.compare import compare_sections, compare_table
from ift.errors import IftError
from ift.run import RunDir

SHOWN = 200  # prediction rows a page shows (the counts cover all of them)


@dataclass
class RunView:
    path: Path
    plots: list[str]
    comparisons: dict[str, list[dict] | IftError]  # split -> base-vs-fine-tuned rows, or why there are none
    predictions: list[str]  # names of predictions/*.jsonl
    best: dict | None = None
    recipe: str = ""


@dataclass
class Predictions:
    rows: list[dict]  # those matching the filters
    total: int
    templates: list[str]
    labels: list[str]
    by_template: list[tuple[str, int, float | None]] = field(default_factory=list)  # (template, n, accuracy)
    by_label: list[tuple[str, int, float | None]] = field(default_factory=list)


def list_runs(root: Path) -> list[Path]:
    """Folders under `root` (and `root` itself) that hold a run's metrics.json."""
    if not root.is_dir():
        return []
    found = [root] if RunDir(root).metrics_file.is_file() else []
    found += sorted(p for p in root.iterdir() if p.is_dir() and RunDir(p).metrics_file.is_file())
    return found


def open_run(path: str | Path) -> RunView:
    rd = RunDir(Path(path).expanduser())
    where = str(rd.path)
    if not rd.path.is_dir():
        raise IftError("run folder not found", where, "pick a folder a training run wrote (training.output_dir)")
    if not rd.metrics_file.is_file() and not rd.predictions_dir.is_dir():
        raise IftError("not a run folder: no metrics.json and no predictions/", where,
                       "pick the folder a training run wrote (training.output_dir)")
    metrics = rd.metrics()  # an unreadable metrics.json is an IftError naming it
    splits = [s for s in ("test", "validation") if isinstance(metrics.get(s), dict)]
    splits += sorted({r.get("split") for r in metrics.get("evaluations") or [] if isinstance(r, dict)} - {None}
                     - set(splits))
    comparisons: dict[str, list[dict] | IftError] = {}
    for split in splits or ["test"]:
        try:
            comparisons[split] = compare_table(*compare_sections(rd.path, split))
        except IftError as err:
            comparisons[split] = err
    plots = sorted(p.name for p in rd.plots.glob("*.png")) if rd.plots.is_dir() else []
    folder = rd.predictions_dir
    predictions = sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []
    recipe = rd.recipe.read_text(encoding="utf-8", errors="replace") if rd.recipe.is_file() else ""
    best = metrics.get("best") if isinstance(metrics.get("best"), dict) else None
    return RunView(rd.path, plots, comparisons, predictions, best, recipe)


def plot_path(run: str | Path, name: str) -> Path:
    """A plot of the run, only among those it has (no other file of the disk can be asked for)."""
    view_plots = RunDir(Path(run).expanduser()).plots
    allowed = {p.name: p for p in view_plots.glob("*.png")} if view_plots.is_dir() else {}
    if name not in allowed:
        raise IftError(f"no plot {name!r} in the run", str(view_plots), "pick one of the run's plots")
    return allowed[name]


def read_predictions(run: str | Path, name: str) -> list[dict]:
    folder = RunDir(Path(run).expanduser()).predictions_dir
    files = {p.stem: p for p in folder.glob("*.jsonl")} if folder.is_dir() else {}
    if name not in files:
        raise IftError(f"no predictions {name!r} in the run", str(folder),
                       "pick one of: " + (", ".join(sorted(files)) or "none (evaluate the run first)"))
    rows = []
    with files[name].open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise IftError(f"predictions line is not JSON: {err.msg}", f"{files[name]}:{number}",
                               "evaluate the run again to rewrite the file") from None
            if not isinstance(row, dict):
                raise IftError("predictions line is not a JSON object", f"{files[name]}:{number}",
                               "evaluate the run again to rewrite the file")
            rows.append(row)
    return rows


def outcome(row: dict) -> str:
    correct = row.get("correct")
    return "not scored" if correct is None else "right" if correct else "wrong"


def filter_predictions(rows: list[dict], template: str = "", label: str = "", result: str = "") -> Predictions:
    """The rows of one template, one target label and one outcome (right, wrong, not scored); "" = any.
    With the per-template and per-label share of right answers over all rows, to see which underperform."""
    templates = sorted({str(r.get("template") or "") for r in rows})
    labels = [t for t, _ in Counter(str(r.get("target") or "") for r in rows).most_common()]
    matching = [r for r in rows if (not template or str(r.get("template") or "") == template)
                and (not label or str(r.get("target") or "") == label) and (not result or outcome(r) == result)]
    return Predictions(matching, len(rows), templates, labels, _accuracy(rows, "template"), _accuracy(rows, "target"))


def _accuracy(rows: list[dict], key: str) -> list[tuple[str, int, float | None]]:
    groups: dict[str, list[Any]] = {}
    for r in rows:
        groups.setdefault(str(r.get(key) or ""), []).append(r.get("correct"))
    out = []
    for name, marks in groups.items():
        scored = [m for m in marks if m is not None]
        out.append((name, len(marks), sum(bool(m) for m in scored) / len(scored) if scored else None))
    return sorted(out, key=lambda t: (t[2] is None, t[2] if t[2] is not None else 0.0, t[0]))
