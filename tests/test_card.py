"""The card's results section: per-class figures and the confusion matrix of rows with answer choices."""

from __future__ import annotations

import json

from ift.publish.card import build_model_card
from ift.recipe import load_recipe
from ift.training.plots import write_plots

CM = {"labels": ["anger", "joy|yay"], "matrix": [[3, 1], [2, 4]]}
PER_CLASS = {"anger": {"precision": 0.6, "recall": 0.75, "f1": 0.6667, "support": 4},
             "joy|yay": {"precision": 0.8, "recall": 0.6667, "f1": 0.7273, "support": 6}}


def _run(tmp_path, metrics):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(
        f"model: {{name_or_path: {tmp_path / 'base'}}}\n"
        f"data: {{sources: [{{path: {tmp_path / 'd.jsonl'}, name: tweets}}]}}\n"
        f"training: {{output_dir: {run}, metric_for_best_model: macro_f1}}\n")
    (run / "metrics.json").write_text(json.dumps(metrics))
    write_plots(run)
    return run, build_model_card(run, load_recipe(run / "recipe.yaml")).text


def test_card_lists_per_class_figures_base_f1_and_the_confusion_matrix(tmp_path):
    run, text = _run(tmp_path, {
        "history": [{"step": 1, "train_loss": 1.0}],
        "test": {"accuracy": 0.7, "macro_f1": 0.697, "balanced_accuracy": 0.7083, "per_class": PER_CLASS,
                 "confusion_matrix": CM, "n": 10},
        "base": {"test": {"accuracy": 0.6, "macro_f1": 0.375, "per_class": {"anger": {"f1": 0.0},
                                                                             "joy|yay": {"f1": 0.75}}}}})
    assert "| Macro-F1 | 0.375 | 0.697 | +0.322 | — |" in text
    assert "| Balanced accuracy | — | 0.708 | — | — |" in text
    assert "| anger | 4 | 0.600 | 0.750 | 0.667 | 0.000 |" in text
    assert "| joy\\|yay | 6 | 0.800 | 0.667 | 0.727 | 0.750 |" in text  # a | in a label does not split the cell
    assert "| target \\ predicted | anger | joy\\|yay |" in text and "| anger | 3 | 1 |" in text
    assert (run / "plots" / "confusion_matrix.png").is_file()
    assert text.count("plots/confusion_matrix.png") == 1  # in the results, not again among the curves


def test_card_without_answer_choices_has_no_class_tables(tmp_path):
    run, text = _run(tmp_path, {"history": [{"step": 1, "train_loss": 1.0}], "test": {"rouge1": 0.4, "n": 3}})
    assert "per class" not in text and "Confusion matrix" not in text
    assert not (run / "plots" / "confusion_matrix.png").exists()
