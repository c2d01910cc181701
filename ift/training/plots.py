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

# Validation metrics on a 0–1 scale are drawn together in metrics.png (SCORES; loss has its own figure).


def write_plots(run_dir: Path) -> list[Path]:
    """Draw RUN_DIR/plots/{loss,learning_rate,metrics}.png from metrics.json; return the files written.

    A figure is drawn only when its series exist (a run without validation has no metrics.png);
    a run without history gets none.
    """
    run_dir = Path(run_dir)
    history = load_history(run_dir / "metrics.json")
    out_dir = run_dir / "plots"
    written: list[Path] = []
    for name, draw in (("loss", _draw_loss), ("learning_rate", _draw_learning_rate), ("metrics", _draw_scores)):
        fig = draw(history)
        if fig is None:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        written.append(_save(fig, out_dir / f"{name}.png"))
    return written


def load_history(path: Path) -> list[dict[str, Any]]:
    """The `history` list of metrics.json ([] when the file or the key is absent)."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IftError(f"cannot read metrics: {exc}", str(path), "restore the file or rerun the evaluation") from None
    history = data.get("history", []) if isinstance(data, dict) else None
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


def _save(fig, path: Path) -> Path:
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return atomic.write_bytes(path, png.getvalue())  # a reader never sees half a PNG
