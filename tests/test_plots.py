"""Training curves drawn from metrics.json history into RUN_DIR/plots/*.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ift.errors import IftError
from ift.training.plots import series, write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(with_validation: bool = True) -> list[dict]:
    out = []
    for step in range(1, 21):
        out.append({"step": step, "train_loss": 2.0 / step, "learning_rate": 2e-4 * (1 - step / 20),
                    "tokens_per_second": 100.0})
        if with_validation and step % 5 == 0:
            out.append({"step": step, "validation": {"loss": 1.5 / step, "accuracy": step / 20, "rougeL": 0.1 * step / 5}})
    return out


def _run(tmp_path: Path, history: list[dict]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"validation": {}, "history": history}))
    return run


def test_writes_loss_lr_and_metric_curves_as_png(tmp_path):
    import matplotlib.image

    run = _run(tmp_path, _history())
    written = write_plots(run)
    assert [p.name for p in written] == ["loss.png", "learning_rate.png", "metrics.png"]
    for path in written:
        assert path.parent == run / "plots"
        assert path.read_bytes()[:8] == PNG_MAGIC
        height, width, _ = matplotlib.image.imread(path).shape
        assert (width, height) == (700, 400)
    assert not list((run / "plots").glob("*.tmp")), "temporary files left behind"


def test_no_validation_means_no_metrics_figure(tmp_path):
    run = _run(tmp_path, _history(with_validation=False))
    assert [p.name for p in write_plots(run)] == ["loss.png", "learning_rate.png"]


def test_no_history_draws_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert write_plots(run) == []
    assert not (run / "plots").exists()
    (run / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.5}}))
    assert write_plots(run) == []


def test_series_skips_missing_and_non_finite_values():
    history = [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": float("nan")}, {"step": 3},
               {"step": 4, "train_loss": 0.5, "validation": {"loss": 0.7}}, {"step": 5, "validation": {"loss": math.inf}},
               {"step": 6, "train_loss": True}]
    assert series(history, "train_loss") == ([1.0, 4.0], [1.0, 0.5])
    assert series(history, "loss", "validation") == ([4.0], [0.7])


def test_rewriting_replaces_the_figures(tmp_path):
    run = _run(tmp_path, _history())
    first = (run / "plots" / "loss.png")
    write_plots(run)
    before = first.read_bytes()
    (run / "metrics.json").write_text(json.dumps({"history": _history()[:10]}))
    write_plots(run)
    assert first.read_bytes() != before


def test_corrupt_metrics_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{not json")
    with pytest.raises(IftError, match="cannot read metrics") as err:
        write_plots(run)
    assert str(run / "metrics.json") in err.value.line()
    (run / "metrics.json").write_text(json.dumps({"history": {"step": 1}}))
    with pytest.raises(IftError, match="'history' must be a list"):
        write_plots(run)


def _cm(labels, matrix):
    return {"labels": labels, "matrix": matrix}


def test_confusion_matrix_png_of_base_and_fine_tuned_test(tmp_path):
    import matplotlib.image

    run = tmp_path / "run"
    run.mkdir()
    tuned = _cm(["anger", "joy", "sadness"], [[5, 1, 0], [0, 7, 1], [2, 0, 3]])
    base = _cm(["anger", "joy", "sadness"], [[0, 6, 0], [0, 8, 0], [0, 5, 0]])
    (run / "metrics.json").write_text(json.dumps({"history": [], "test": {"confusion_matrix": tuned},
                                                  "base": {"test": {"confusion_matrix": base}},
                                                  "validation": {"confusion_matrix": base}}))
    from ift.training.plots import confusion_matrices

    assert confusion_matrices(run / "metrics.json") == [("base model, test", base), ("fine-tuned, test", tuned)]
    written = write_plots(run)
    assert [p.name for p in written] == ["confusion_matrix.png"]
    height, width, _ = matplotlib.image.imread(written[0]).shape
    assert width == 2 * height  # one square panel per model


def test_confusion_matrix_of_the_best_validation_without_test(tmp_path):
    run = _run(tmp_path, _history())
    data = json.loads((run / "metrics.json").read_text())
    data["validation"] = {"accuracy": 0.5, "confusion_matrix": _cm(["a", "b"], [[1, 1], [0, 2]])}
    (run / "metrics.json").write_text(json.dumps(data))
    assert [p.name for p in write_plots(run)] == ["loss.png", "learning_rate.png", "metrics.png",
                                                  "confusion_matrix.png"]
