"""The metrics registry: every figure ift reports, once — its name in metrics.json, its label, which way is
better, which `evaluation.metrics` entry computes it, and how.

Recipes, evaluation, training (best checkpoint), the card and the plots all read names from here.
"""

from __future__ import annotations

from dataclasses import dataclass

# what a recipe lists in evaluation.metrics; each computes one or more figures below
FAMILIES = ("loss", "accuracy", "rouge")


@dataclass(frozen=True)
class Metric:
    name: str  # the key in metrics.json
    label: str  # for people: tables, cards, plots
    higher_is_better: bool
    family: str  # the evaluation.metrics entry that computes it
    how: str


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("loss", "Loss", False, "loss", "mean cross-entropy over every loss-carrying token of the split"),
    Metric("accuracy", "Accuracy", True, "accuracy",
           "answer choices ranked by summed log-likelihood (T0 style), else normalised exact match of the greedy "
           "generation"),
    Metric("accuracy_norm", "Accuracy (length-normalised)", True, "accuracy",
           "answer choices ranked by log-likelihood divided by their token count"),
    Metric("macro_f1", "Macro-F1", True, "accuracy",
           "unweighted mean over the answer choices of each class's F1 (ranked rows; per_class holds each class's "
           "precision, recall, F1 and support, confusion_matrix the counts)"),
    Metric("balanced_accuracy", "Balanced accuracy", True, "accuracy",
           "unweighted mean over the answer choices that are targets of each class's recall (ranked rows)"),
    Metric("exact_match", "Exact match", True, "accuracy",
           "normalised exact match of the greedy reply to a held-out conversation's last user turn, given the "
           "history (conversational sources)"),
    Metric("rouge1", "ROUGE-1", True, "rouge", "unigram overlap, mean F-measure (rouge_score)"),
    Metric("rouge2", "ROUGE-2", True, "rouge", "bigram overlap, mean F-measure (rouge_score)"),
    Metric("rougeL", "ROUGE-L", True, "rouge", "longest common subsequence, mean F-measure (rouge_score)"),
    Metric("rougeLsum", "ROUGE-Lsum", True, "rouge",
           "summary-level LCS over one sentence per line, mean F-measure (rouge_score)"),
)}

ROUGE = tuple(m.name for m in METRICS.values() if m.family == "rouge")
SCORES = tuple(m.name for m in METRICS.values() if m.family != "loss")  # what base vs fine-tuned compares


def computed_by(families) -> list[str]:
    """The figures a recipe's evaluation.metrics produces, in registry order."""
    return [m.name for m in METRICS.values() if m.family in set(families)]


def higher_is_better(name: str) -> bool:
    metric = METRICS.get(name)
    return True if metric is None else metric.higher_is_better


def label(name: str) -> str:
    metric = METRICS.get(name)
    return metric.label if metric else name
