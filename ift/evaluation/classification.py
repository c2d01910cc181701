"""Classification figures of ranked answer choices: macro-F1, balanced accuracy, per-class precision / recall / F1
and support, and the confusion matrix.

Accuracy hides a dead class on an imbalanced task (a model that never answers the rare label still scores the
majority's share). These figures are computed on the same predictions as accuracy (the choice with the highest
summed log-likelihood) and equal scikit-learn's `classification_report`, `balanced_accuracy_score` and
`confusion_matrix` on the same labels (tests compare them); scikit-learn is not needed to compute them.

Labels. A row's label is its gold answer choice, its predicted label the choice ranked first. When every row of a
template offers the same answer choices (sentiment, topic, emotion), the labels are the choice texts; when the
choices change from row to row (multiple-choice questions), they are the positions `choice 1`, `choice 2`, ...
Over several templates the labels are the union, in order of first appearance.

Averages follow scikit-learn's defaults: macro-F1 is the unweighted mean F1 over the labels that occur among the
targets or the predictions (0 where a precision or recall divides by zero); balanced accuracy is the mean recall
over the labels that occur among the targets. Labels that occur nowhere are listed with support 0 and take no
part in either average.
"""

from __future__ import annotations

from typing import Any, Sequence


def row_labels(predictions: Sequence[dict]) -> dict[int, tuple[str, str, list[str]]]:
    """{prediction index: (gold label, predicted label, the row's labels)} for every ranked prediction."""
    choice_sets: dict[str, set[tuple[str, ...]]] = {}
    ranked = [i for i, p in enumerate(predictions)
              if p.get("mode") == "rank" and p.get("choice_scores") and p.get("gold_index") is not None]
    for i in ranked:
        p = predictions[i]
        choice_sets.setdefault(p.get("template") or "", set()).add(tuple(s["choice"] for s in p["choice_scores"]))
    out: dict[int, tuple[str, str, list[str]]] = {}
    for i in ranked:
        p = predictions[i]
        scores = p["choice_scores"]
        best = max(range(len(scores)), key=lambda k: scores[k]["sum"])  # as accuracy picks (first of ties)
        if len(choice_sets[p.get("template") or ""]) == 1:
            names = [s["choice"].strip() for s in scores]
        else:
            names = [f"choice {k + 1}" for k in range(len(scores))]
        out[i] = (names[p["gold_index"]], names[best], names)
    return out


def figures_of(labels_of: dict[int, tuple[str, str, list[str]]], idx: Sequence[int]) -> dict[str, Any]:
    """The classification figures of the ranked rows among `idx` ({} when there are none)."""
    rows = [labels_of[i] for i in idx if i in labels_of]
    if not rows:
        return {}
    order: dict[str, None] = {}
    for _, _, names in rows:
        order.update(dict.fromkeys(names))
    return classification_figures([g for g, _, _ in rows], [p for _, p, _ in rows], list(order))


def classification_figures(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """macro_f1, balanced_accuracy, per_class {label: {precision, recall, f1, support}} and confusion_matrix
    {labels, matrix} (rows: gold label, columns: predicted label) of paired label lists."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predicted")
    labels = list(labels)
    index = {name: k for k, name in enumerate(labels)}
    for name in (*gold, *predicted):
        if name not in index:
            index[name] = len(labels)
            labels.append(name)
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted):
        matrix[index[g]][index[p]] += 1
    per_class: dict[str, dict[str, float | int]] = {}
    f1s, recalls = [], []
    for k, name in enumerate(labels):
        tp = matrix[k][k]
        support = sum(matrix[k])
        predicted_as = sum(row[k] for row in matrix)
        precision = tp / predicted_as if predicted_as else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * tp / (support + predicted_as) if support + predicted_as else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support or predicted_as:
            f1s.append(f1)
        if support:
            recalls.append(recall)
    return {"macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
            "balanced_accuracy": sum(recalls) / len(recalls) if recalls else 0.0,
            "per_class": per_class, "confusion_matrix": {"labels": labels, "matrix": matrix}}
