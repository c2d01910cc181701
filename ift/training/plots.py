"""Training curves: `metrics.json` history -> `plots/*.png` (loss, learning rate, validation metrics).

Figures are drawn with matplotlib's object API on the Agg canvas, so no display, no pyplot global
state and no backend switching are involved (safe inside training and in tests).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from ift import atomic
from ift.errors import IftError
from ift.metrics import SCORES
from ift.run import RunDir

# Validation metrics on a 0–1 scale are drawn together in metrics.png (SCORES; loss has its own figure).


def write_plots(run_dir: Path, metrics: dict | None = None) -> list[Path]:
    """Draw RUN_DIR/plots/{loss,learning_rate,metrics,confusion_matrix}.png from the run's metrics (metrics.json's
    content: given by the end of a training run, else read); return the files written.

    A figure is drawn only when its series exist (a run without validation has no metrics.png, one without
    answer choices no confusion_matrix.png); a run without history gets no curves.
    """
    rd = RunDir(run_dir)
    if metrics is None:
        metrics = read_metrics(rd.metrics_file)
    history = valid_history(metrics, rd.metrics_file)
    written: list[Path] = []
    figures = [(name, lambda draw=draw: draw(history))
               for name, draw in (("loss", _draw_loss), ("learning_rate", _draw_learning_rate),
                                  ("metrics", _draw_scores))]
    figures.append(("confusion_matrix", lambda: _draw_confusion(matrices_of(metrics))))
    for name, draw in figures:
        fig = draw()
        if fig is None:
            continue
        rd.plots.mkdir(parents=True, exist_ok=True)
        written.append(_save(fig, rd.plots / f"{name}.png"))
    return written


def confusion_matrices(path: Path) -> list[tuple[str, dict]]:
    """(title, {labels, matrix}) of the run's own evaluations in metrics.json (see `matrices_of`)."""
    return matrices_of(read_metrics(path))


def matrices_of(data: dict) -> list[tuple[str, dict]]:
    """(title, {labels, matrix}) of the run's own evaluations in metrics.json's `data`: base and fine-tuned on
    test, else the best validation; [] when none has one (no answer choices, or no evaluation yet)."""
    sections = [("base model, test", (data.get("base") or {}).get("test")), ("fine-tuned, test", data.get("test"))]
    if not any(isinstance(s, dict) and s.get("confusion_matrix") for _, s in sections):
        sections = [("fine-tuned, validation (best)", data.get("validation"))]
    out = []
    for title, section in sections:
        cm = section.get("confusion_matrix") if isinstance(section, dict) else None
        if isinstance(cm, dict) and isinstance(cm.get("labels"), list) and isinstance(cm.get("matrix"), list) \
                and cm["labels"] and len(cm["matrix"]) == len(cm["labels"]):
            out.append((title, cm))
    return out


def read_metrics(path: Path) -> dict:
    """metrics.json as a dict ({} when the file is absent or not an object)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IftError(f"cannot read metrics: {exc}", str(path), "restore the file or rerun the evaluation") from None
    return data if isinstance(data, dict) else {}


def valid_history(metrics: dict, path: Path) -> list[dict[str, Any]]:
    """The `history` list of a run's metrics ([] when absent); `path` names the file in the error."""
    history = metrics.get("history", [])
    if not isinstance(history, list):
        raise IftError("'history' must be a list of {step, train_loss, learning_rate, validation}", str(path),
                       "restore the file or rerun the training")
    return [h for h in history if isinstance(h, dict) and _number(h.get("step")) is not None]


def series(history: list[dict[str, Any]], key: str, section: str | None = None) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, skipping entries where it is absent or not finite."""
    steps, values = [], []
    for entry in history:
        source = entry.get(section) if section else entry
        value = _number(source.get(key)) if isinstance(source, dict) else None
        if value is not None:
            steps.append(float(entry["step"]))
            values.append(value)
    return steps, values


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _figure(title: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _draw_loss(history: list[dict[str, Any]]):
    train = series(history, "train_loss")
    val = series(history, "loss", "validation")
    if not train[0] and not val[0]:
        return None
    fig, ax = _figure("Loss", "cross-entropy (completion tokens)")
    if train[0]:
        ax.plot(*train, label="train", linewidth=1.5)
    if val[0]:
        ax.plot(*val, "o-", label="validation", linewidth=1.5, markersize=4)
    ax.legend()
    return fig


def _draw_learning_rate(history: list[dict[str, Any]]):
    lr = series(history, "learning_rate")
    if not lr[0]:
        return None
    fig, ax = _figure("Learning rate", "learning rate")
    ax.plot(*lr, linewidth=1.5)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return fig


def _draw_scores(history: list[dict[str, Any]]):
    drawn = [(name, series(history, name, "validation")) for name in SCORES]
    drawn = [(name, s) for name, s in drawn if s[0]]
    if not drawn:
        return None
    fig, ax = _figure("Validation metrics", "score (0–1)")
    for name, s in drawn:
        ax.plot(*s, "o-", label=name, linewidth=1.5, markersize=4)
    ax.set_ylim(-0.02, 1.02)  # room for markers at 0 and 1
    ax.legend()
    return fig


def _draw_confusion(matrices: list[tuple[str, dict]]):
    """One panel per evaluation: gold label down, predicted label across, each cell its count."""
    if not matrices:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = max(len(cm["labels"]) for _, cm in matrices)
    side = min(max(3.5, 0.6 * size + 2), 12)
    fig = Figure(figsize=(side * len(matrices), side), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    for ax, (title, cm) in zip(axes, matrices):
        labels, matrix = [str(x) for x in cm["labels"]], cm["matrix"]
        peak = max((v for row in matrix for v in row), default=0) or 1
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=peak)
        ax.set_title(f"Confusion matrix ({title})")
        ax.set_xlabel("predicted")
        ax.set_ylabel("target")
        ticks = range(len(labels))
        short = [x if len(x) <= 18 else x[:17] + "…" for x in labels]
        ax.set_xticks(ticks, short, rotation=45, ha="right")
        ax.set_yticks(ticks, short)
        for r, row in enumerate(matrix):
            for c, value in enumerate(row):
                ax.text(c, r, str(value), ha="center", va="center", fontsize=8,
                        color="white" if value > peak / 2 else "black")
    return fig


def _save(fig, path: Path) -> Path:
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return atomic.write_bytes(path, png.getvalue())  # a reader never sees half a PNG
