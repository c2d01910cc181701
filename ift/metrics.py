"""The metrics registry: every figure ift reports, once — its name in metrics.json, its label, which way is
better, which `evaluation.metrics` entry computes it, and how.

Recipes, evaluation, training (best checkpoint), the card and the plots all read names from here.
"""

from __future__ import annotations

from dataclasses import dataclass

# what a recipe lists in evaluation.metrics; each computes one or more figures below. Any other entry names an
# `evaluate` module (ift.evaluation.modules), whose figures are recorded as `<module>.<key>`.
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
           "history (conversational sources); where the reference reply calls tools, its calls must match too "
           "(tool_call_exact_match), and reasoning is stripped before the answer is compared"),
    Metric("tool_call_exact_match", "Tool-call exact match", True, "accuracy",
           "the tool calls read back from the greedy reply (reasoning stripped; <tool_call> blocks or a bare JSON "
           "call) equal the held-out reply's: the same calls, names and arguments compared as JSON, in any order "
           "(conversations whose reference reply calls tools or that have tools; no call where none is due)"),
    Metric("tool_argument_f1", "Tool-call argument F1", True, "accuracy",
           "F1 over (function, argument, JSON value) triples of the greedy reply's calls against the held-out "
           "reply's, averaged over the same rows (1 where neither calls)"),
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


def evaluate_modules(entries) -> list[str]:
    """The entries of evaluation.metrics that name an `evaluate` module (a Hub id or a local path), not a family."""
    return [e for e in entries if e not in FAMILIES]


def module_name(entry: str) -> str:
    """The prefix of an evaluate module's figures in metrics.json: `sacrebleu` for `sacrebleu`,
    `evaluate-metric/sacrebleu`, `metrics/sacrebleu/` or `metrics/sacrebleu/sacrebleu.py`."""
    parts = [p for p in entry.replace("\\", "/").split("/") if p]
    last = parts[-1] if parts else entry
    if last.endswith(".py"):
        last = last[:-3]
    return last


def module_figures(entries, names) -> list[str]:
    """Of `names`, those an evaluate module among `entries` computes (`<module>.<key>`), in order."""
    prefixes = tuple(f"{module_name(e)}." for e in evaluate_modules(entries))
    return [n for n in names if prefixes and n.startswith(prefixes)]


def recorded_module_figures(*sections) -> list[str]:
    """The evaluate modules' figures (`<module>.<key>`, numbers) that any of the metrics.json sections holds, in
    order of first appearance."""
    order: dict[str, None] = {}
    for section in sections:
        for key, value in (section.items() if isinstance(section, dict) else ()):
            if "." in key and key not in METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
                order.setdefault(key, None)
    return list(order)


def needs_predictions(entries) -> bool:
    """Whether evaluation.metrics asks for anything beyond the loss: then the model answers every row."""
    return any(e != "loss" for e in entries)


def higher_is_better(name: str) -> bool:
    metric = METRICS.get(name)
    return True if metric is None else metric.higher_is_better


def label(name: str) -> str:
    metric = METRICS.get(name)
    return metric.label if metric else name


def headline(metrics: dict) -> dict:
    """The scalar figures of a metrics section (breakdowns by source, template or class stay in metrics.json)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("n", "step")}


def headline_text(metrics: dict) -> str:
    """`loss 0.1234, accuracy 0.9500`: the headline as the logs print it."""
    return ", ".join(f"{k} {v:.4f}" for k, v in headline(metrics).items())
