"""Macro-F1, balanced accuracy, per-class figures and the confusion matrix of ranked answer choices, compared with
scikit-learn on the same predictions."""

from __future__ import annotations

import random

import pytest
from sklearn.metrics import balanced_accuracy_score, classification_report, confusion_matrix, f1_score

from ift.evaluation.classification import classification_figures
from ift.evaluation.evaluate import summarize
from ift.recipe import EvaluationConfig

EMOTIONS = ["anger", "joy", "optimism", "sadness"]


def _prediction(choices, gold, best, template="emotion", source="tweets"):
    scores = [{"choice": c, "sum": -5.0 - k, "mean": -1.0} for k, c in enumerate(choices)]
    scores[best]["sum"] = 0.0
    return {"prompt": "p", "target": choices[gold], "prediction": choices[best], "correct": gold == best,
            "correct_norm": gold == best, "choice_scores": scores, "mode": "rank", "gold_index": gold,
            "source": source, "template": template}


def _sklearn(gold, predicted, labels):
    present = [x for x in labels if x in set(gold) | set(predicted)]
    report = classification_report(gold, predicted, labels=labels, output_dict=True, zero_division=0)
    return {"macro_f1": f1_score(gold, predicted, average="macro", zero_division=0),
            "macro_f1_report": classification_report(gold, predicted, labels=present, output_dict=True,
                                                     zero_division=0)["macro avg"]["f1-score"],
            "balanced_accuracy": balanced_accuracy_score(gold, predicted),
            "per_class": {x: {"precision": report[x]["precision"], "recall": report[x]["recall"],
                              "f1": report[x]["f1-score"], "support": int(report[x]["support"])} for x in labels},
            "matrix": confusion_matrix(gold, predicted, labels=labels).tolist()}


def _assert_equal_to_sklearn(ours, gold, predicted, labels):
    want = _sklearn(gold, predicted, labels)
    assert ours["confusion_matrix"] == {"labels": labels, "matrix": want["matrix"]}
    assert ours["macro_f1"] == pytest.approx(want["macro_f1"], abs=1e-12)
    assert ours["macro_f1"] == pytest.approx(want["macro_f1_report"], abs=1e-12)
    assert ours["balanced_accuracy"] == pytest.approx(want["balanced_accuracy"], abs=1e-12)
    assert set(ours["per_class"]) == set(labels)
    for label in labels:
        for key in ("precision", "recall", "f1"):
            assert ours["per_class"][label][key] == pytest.approx(want["per_class"][label][key], abs=1e-12), \
                (label, key)
        assert ours["per_class"][label]["support"] == want["per_class"][label]["support"]


@pytest.mark.parametrize("seed", range(6))
def test_figures_equal_scikit_learn_on_random_imbalanced_predictions(seed):
    rng = random.Random(seed)
    n = rng.randint(5, 200)
    weights = [0.6, 0.25, 0.1, 0.05]
    gold = rng.choices(EMOTIONS, weights, k=n)
    # a model that mostly answers the majority class, sometimes right
    predicted = [g if rng.random() < 0.5 else rng.choices(EMOTIONS, [0.8, 0.1, 0.1, 0.0])[0] for g in gold]
    _assert_equal_to_sklearn(classification_figures(gold, predicted, EMOTIONS), gold, predicted, EMOTIONS)


def test_a_dead_class_shows_in_macro_f1_and_balanced_accuracy_not_in_accuracy():
    gold = ["neutral"] * 6 + ["positive"] * 3 + ["negative"]
    predicted = ["neutral"] * 6 + ["positive"] * 3 + ["neutral"]  # never answers negative
    labels = ["negative", "neutral", "positive"]
    ours = classification_figures(gold, predicted, labels)
    _assert_equal_to_sklearn(ours, gold, predicted, labels)
    assert ours["per_class"]["negative"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert ours["balanced_accuracy"] == pytest.approx(2 / 3)
    assert ours["macro_f1"] < 0.9 * sum(g == p for g, p in zip(gold, predicted)) / len(gold)


def test_a_label_nobody_chose_or_needed_is_listed_but_not_averaged():
    gold, predicted = ["a", "a", "b"], ["a", "b", "b"]
    ours = classification_figures(gold, predicted, ["a", "b", "c"])
    _assert_equal_to_sklearn(ours, gold, predicted, ["a", "b", "c"])
    assert ours["per_class"]["c"]["support"] == 0
    assert ours["macro_f1"] == pytest.approx(f1_score(gold, predicted, average="macro"))


def test_summarize_records_the_figures_per_template_and_overall_over_the_union_of_labels():
    rng = random.Random(0)
    preds = []
    for _ in range(40):
        preds.append(_prediction(EMOTIONS, rng.choice([0, 0, 1, 3]), rng.choice([0, 1, 2, 3])))
    sentiment = ["negative", "neutral", "positive"]
    for _ in range(30):
        preds.append(_prediction(sentiment, rng.choice([1, 1, 2]), rng.choice([0, 1, 1, 2]), template="finance",
                                 source="phrasebank"))
    # a generated row takes no part
    preds.append({"prompt": "q", "target": "x", "prediction": "x", "correct": True, "correct_norm": None,
                  "choice_scores": None, "mode": "generate", "source": "tweets", "template": "free"})
    metrics = summarize(preds, EvaluationConfig(metrics=["accuracy"]))

    def labels(rows):
        return [r["target"] for r in rows], [r["prediction"] for r in rows]

    for name, rows, order in (("emotion", preds[:40], EMOTIONS), ("finance", preds[40:70], sentiment)):
        figures = metrics["by_template"][name]
        _assert_equal_to_sklearn(figures, *labels(rows), order)
    _assert_equal_to_sklearn(metrics, *labels(preds[:70]), EMOTIONS + sentiment)
    assert metrics["by_source"]["phrasebank"]["macro_f1"] == metrics["by_template"]["finance"]["macro_f1"]
    assert "macro_f1" not in metrics["by_template"]["free"] and metrics["by_template"]["free"]["accuracy"] == 1.0


def test_rows_whose_choices_change_are_labelled_by_position():
    preds = [_prediction(["a cat", "a dog"], 0, 0, template="mc"), _prediction(["red", "blue"], 1, 0, template="mc"),
             _prediction(["up", "down"], 1, 1, template="mc")]
    metrics = summarize(preds, EvaluationConfig(metrics=["accuracy"]))
    gold, predicted = ["choice 1", "choice 2", "choice 2"], ["choice 1", "choice 1", "choice 2"]
    _assert_equal_to_sklearn(metrics, gold, predicted, ["choice 1", "choice 2"])


def test_figures_are_usable_as_metric_for_best_model():
    from ift.metrics import computed_by, higher_is_better
    from ift.recipe import Recipe

    assert {"macro_f1", "balanced_accuracy"} <= set(computed_by(["accuracy"]))
    assert higher_is_better("macro_f1") and higher_is_better("balanced_accuracy")
    base = {"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "d.jsonl"}]},
            "training": {"output_dir": "out", "metric_for_best_model": "validation.macro_f1"},
            "evaluation": {"metrics": ["loss", "accuracy"]}}
    assert Recipe.model_validate(base).training.metric_for_best_model == "validation.macro_f1"
    with pytest.raises(ValueError, match="macro_f1"):
        Recipe.model_validate({**base, "evaluation": {"metrics": ["loss", "rouge"]}})


def test_a_run_picks_its_best_checkpoint_by_macro_f1_and_records_the_classes(tmp_path):
    import json

    from test_train import fresh_accelerate_state, run_train, toy_recipe  # noqa: F401 (autouse fixture)

    run = run_train(toy_recipe(tmp_path, max_steps=12, eval_steps=3, save_steps=3, metric_for_best_model="macro_f1",
                               evaluation={"compare_base": True}))
    metrics = json.loads((run / "metrics.json").read_text())
    evals = {h["step"]: h["validation"] for h in metrics["history"] if "validation" in h}
    assert all("macro_f1" in v and "balanced_accuracy" in v for v in evals.values())
    best = max(evals, key=lambda s: (evals[s]["macro_f1"], -s))  # the first of equal figures stays best
    assert metrics["best"] == {**metrics["best"], "step": best, "value": evals[best]["macro_f1"]}
    for section in (metrics["test"], metrics["base"]["test"]):
        assert section["confusion_matrix"]["labels"] == ["tool", "animal"]
        assert sum(map(sum, section["confusion_matrix"]["matrix"])) == section["n"]
        assert set(section["per_class"]) == {"tool", "animal"}
    assert (run / "plots" / "confusion_matrix.png").is_file()
    card = (run / "README.md").read_text()
    assert "| Macro-F1 |" in card and "| animal |" in card and "plots/confusion_matrix.png" in card
