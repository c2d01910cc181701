"""Evaluation: rank-classification and exact-match accuracy, macro-F1 / balanced accuracy / per-class figures and
the confusion matrix of ranked rows, ROUGE, tool-call exact match and argument F1, per-source and per-template
breakdowns.

Serves the training loop (validation every eval_steps, test at the end) and `ift eval`.

Token ids come from `ift.data.encoding`, so a prompt is scored exactly as training tokenized it. Rows with answer
choices are ranked (`ift.evaluation.scoring`); the others are answered greedily (`ift.evaluation.decoding`) and
scored by normalised exact match and ROUGE (`ift.evaluation.text_metrics`). A conversation with tool calls,
reasoning or tools is answered from its whole history, rendered with its tools; the reply is read back
(`ift.evaluation.tool_calls.parse_reply`: reasoning stripped, calls parsed) and its calls scored against the
reference reply's.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from ift import atomic
from ift.errors import IftError
from ift.evaluation.classification import figures_of, row_labels
from ift.evaluation.decoding import check_can_generate, generate
from ift.metrics import FAMILIES, evaluate_modules
from ift.evaluation.modules import load_modules, module_scores
from ift.evaluation.forward import check_kind
from ift.evaluation.scoring import score_choices
from ift.evaluation.text_metrics import ROUGE_KEYS, rouge_per_pair, normalize_answer
from ift.evaluation.tool_calls import argument_f1, calls_match, parse_reply, plain_call
from ift.recipe import EvaluationConfig

KNOWN_METRICS = FAMILIES


def evaluate(model, tokenizer, kind: str, rows, cfg: EvaluationConfig, *, chat_template: bool = False,
             accelerator=None, batch_size: int | None = None, limit: int | None = None,
             desc: str = "eval") -> tuple[dict, list[dict]]:
    """Accuracy / ROUGE over `rows` (prompt, completion, choices, source, template); metrics 0-1 and predictions.

    With an accelerator of several processes, each process scores a contiguous share of the rows and the
    predictions are gathered, so every process returns the same full result.
    """
    check_kind(kind)
    rows = _as_rows(rows, limit, desc)
    _check_metrics(cfg)
    bs = batch_size or cfg.batch_size
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        from accelerate.utils import gather_object

        lo, hi = shard_range(len(rows), accelerator.num_processes, accelerator.process_index)
        local = _predict(accelerator.unwrap_model(model), tokenizer, kind, rows[lo:hi], cfg, chat_template, bs,
                         desc if accelerator.is_main_process else None, offset=lo)
        predictions = gather_object(local)
    else:
        predictions = _predict(model, tokenizer, kind, rows, cfg, chat_template, bs, desc)
    return summarize(predictions, cfg), predictions


def shard_range(n: int, num_processes: int, index: int) -> tuple[int, int]:
    """Contiguous share of n rows for process `index` (sizes differ by at most one), as accelerate splits."""
    per, extra = divmod(n, num_processes)
    start = index * per + min(index, extra)
    return start, start + per + (1 if index < extra else 0)


def _as_rows(rows, limit: int | None, desc: str) -> list[dict]:
    if rows is None:
        raise IftError(f"no rows to evaluate ({desc})", None, "check the data section of the recipe")
    if limit is not None and limit < len(rows):
        # evenly spread, not the first `limit`: splits are ordered by source, and every source should count
        keep = [round(i * (len(rows) - 1) / max(limit - 1, 1)) for i in range(limit)] if limit > 1 else [0]
        rows = rows.select(keep) if hasattr(rows, "select") else [rows[i] for i in keep]
    out = rows.to_list() if hasattr(rows, "to_list") else list(rows)
    if not out:
        raise IftError(f"the {desc} split is empty", None,
                       "give the source a non-empty split, or set data.validation_size / data.test_size")
    for i, r in enumerate(out):
        missing = [k for k in ("prompt", "completion") if k not in r]
        if missing:
            raise IftError(f"row {i} has no {', '.join(missing)}", desc,
                           "evaluation rows come from ift.data.prepare.build_splits (prompt, completion, choices, ...)")
    if not any(_has_target(r) for r in out):
        raise IftError(f"no row of the {desc} split has a target", None,
                       "evaluate a labeled split (test splits of some datasets, e.g. GLUE, are unlabeled)")
    return out


def _target(row: dict) -> str:
    return (row.get("completion") or "").strip()


def _has_target(row: dict) -> bool:
    """A reply to score: a target text, or the tool calls of a conversation's final reply."""
    return bool(_target(row)) or bool(_reference_calls(row))


def _conversation(row: dict) -> tuple[list[dict], list[dict] | None] | None:
    """The whole conversation of a row with tool calls, tool ids, reasoning or tools (its `chat` column) and its
    tools; None for plain {role, content} conversations and template rows."""
    if not row.get("chat"):
        return None
    whole = json.loads(row["chat"])
    return whole["messages"], whole.get("tools") or None


def _reference_calls(row: dict) -> list[dict]:
    conversation = _conversation(row)
    return list(conversation[0][-1].get("tool_calls") or []) if conversation else []


def _check_metrics(cfg: EvaluationConfig) -> None:
    """Every entry other than loss / accuracy / rouge is an evaluate module: loaded now, before any prediction."""
    load_modules(cfg.metrics)


def _predict(model, tokenizer, kind, rows: list[dict], cfg: EvaluationConfig, chat_template: bool,
             batch_size: int, desc: str | None, offset: int = 0) -> list[dict]:
    """One prediction dict per row with a target, in row order."""
    rows = [r for r in rows if _has_target(r)]
    want_acc = "accuracy" in cfg.metrics
    # ROUGE and evaluate modules score generated text
    want_rouge = "rouge" in cfg.metrics or bool(evaluate_modules(cfg.metrics))
    # conversations are answered, not ranked: the reply to the last user turn, given the history
    rank = [i for i, r in enumerate(rows)
            if want_acc and cfg.accuracy_mode in ("auto", "rank") and r.get("choices") and not r.get("messages")]
    ranked = set(rank)
    # Exact match on free-form targets (summaries) is meaningless; in auto mode with ROUGE asked for,
    # rows without choices are scored by ROUGE alone, so the headline accuracy stays a classification figure.
    exact = want_acc and (cfg.accuracy_mode == "generate" or (cfg.accuracy_mode == "auto" and not want_rouge))
    gen = [i for i in range(len(rows)) if i not in ranked and (exact or want_rouge or rows[i].get("messages"))]
    preds = [_blank_prediction(r) for r in rows]
    if gen:
        check_can_generate(model)  # before any scoring: fail fast
    if rank:
        gold = [_gold_index(rows[i], offset + i, desc) for i in rank]
        scores = score_choices(model, tokenizer, kind, [rows[i]["prompt"] for i in rank],
                               [list(rows[i]["choices"]) for i in rank], chat_template=chat_template,
                               batch_size=batch_size, desc=f"{desc}: choices" if desc else None)
        for i, g, sc in zip(rank, gold, scores):
            _fill_rank(preds[i], rows[i]["choices"], sc, g)
    if gen:
        texts = generate(model, tokenizer, kind, [_prompt(rows[i]) for i in gen],
                         max_new_tokens=cfg.max_new_tokens, batch_size=batch_size, chat_template=chat_template,
                         desc=f"{desc}: generate" if desc else None, tools=[_tools(rows[i]) for i in gen])
        for i, text in zip(gen, texts):
            p = preds[i]
            p["prediction"], p["mode"] = text, "generate"
            if _conversation(rows[i]) is not None:
                same = _score_reply(p, rows[i], text)
            else:
                same = normalize_answer(text) == normalize_answer(p["target"])
            if exact:
                p["correct"] = same
            if rows[i].get("messages"):
                p["exact_match"] = same
    return preds


def _tools(row: dict) -> list[dict] | None:
    conversation = _conversation(row)
    return conversation[1] if conversation else None


def _score_reply(pred: dict, row: dict, text: str) -> bool:
    """Read a reply to a conversation with calls, reasoning or tools back into its answer (reasoning stripped) and
    calls; record them, and where the row is about tools (its reference reply calls, or it has tools) the call
    exact match and argument F1. Whether the reply is right: the answer text and the calls."""
    tools = _tools(row)
    reference = [plain_call(c) for c in _reference_calls(row)]
    reply = parse_reply(text, bare_json=bool(tools))
    pred["answer"] = reply.content
    if reply.reasoning is not None:
        pred["reasoning"] = reply.reasoning
    same = normalize_answer(reply.content) == normalize_answer(pred["target"])
    if tools or reference:
        pred["tool_calls"], pred["target_tool_calls"] = reply.tool_calls, reference
        pred["tool_call_exact_match"] = calls_match(reply.tool_calls, reference)
        pred["tool_argument_f1"] = argument_f1(reply.tool_calls, reference)
        same = same and pred["tool_call_exact_match"]
    return same


def _prompt(row: dict) -> str | list[dict]:
    """What the model answers: a template row's prompt, or a conversation's history up to its final reply (its
    tool calls, tool results and reasoning included)."""
    conversation = _conversation(row)
    if conversation is not None:
        return [dict(m) for m in conversation[0][:-1]]
    return [dict(m) for m in row["messages"][:-1]] if row.get("messages") else row["prompt"]


def _blank_prediction(row: dict) -> dict:
    out = {"prompt": row["prompt"], "target": row["completion"], "prediction": None, "correct": None,
           "correct_norm": None, "choice_scores": None, "mode": None,
           "source": row.get("source") or "", "template": row.get("template") or ""}
    if row.get("messages"):  # the history the model answered (and the tools it was given), saved with it
        out["history"] = _prompt(row)
        if _tools(row):
            out["tools"] = _tools(row)
    return out


def _gold_index(row: dict, index: int, desc: str | None) -> int:
    choices = list(row["choices"])
    target = row["completion"]
    # the exact text first, then the normalised one (e.g. "Positive." for "positive")
    for candidates, key in (([c.strip() for c in choices], target.strip()),
                            ([normalize_answer(c) for c in choices], normalize_answer(target))):
        if key in candidates:
            return candidates.index(key)
    raise IftError(f"the target {target!r} is not one of the answer choices {choices}",
                   f"{desc or 'eval'} row {index}, source {row.get('source')!r}, template {row.get('template')!r}",
                   "make the template's answer_choices contain its target, or set evaluation.accuracy_mode: generate")


def _fill_rank(pred: dict, choices: Sequence[str], scores: list[tuple[float, float]], gold: int) -> None:
    best = max(range(len(scores)), key=lambda k: scores[k][0])
    best_norm = max(range(len(scores)), key=lambda k: scores[k][1])
    pred.update(prediction=choices[best], correct=best == gold, correct_norm=best_norm == gold, mode="rank",
                gold_index=gold,
                choice_scores=[{"choice": c, "sum": s, "mean": m} for c, (s, m) in zip(choices, scores)])


def summarize(predictions: list[dict], cfg: EvaluationConfig) -> dict:
    """Totals plus the same figures per source and per template."""
    rouge_of: dict[int, dict[str, float]] = {}
    if "rouge" in cfg.metrics:
        gen = [i for i, p in enumerate(predictions) if _scored_text(p)]
        if gen:
            pairs = rouge_per_pair([_answer(predictions[i]) for i in gen],
                                    [predictions[i]["target"] for i in gen], cfg.rouge_use_stemmer)
            rouge_of = {i: {k: pairs[k][n] for k in ROUGE_KEYS} for n, i in enumerate(gen)}
    labels_of = row_labels(predictions) if "accuracy" in cfg.metrics else {}
    modules = load_modules(cfg.metrics)
    everything = list(range(len(predictions)))
    metrics = _figures(predictions, everything, rouge_of, labels_of, modules)
    for key, name in (("source", "by_source"), ("template", "by_template")):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(predictions):
            groups[p[key]].append(i)
        metrics[name] = {g: _figures(predictions, idx, rouge_of, labels_of, modules)
                         for g, idx in sorted(groups.items())}
    return metrics


def _figures(predictions: list[dict], idx: list[int], rouge_of: dict[int, dict[str, float]],
             labels_of: dict, modules: dict) -> dict:
    out: dict[str, Any] = {}
    correct = [predictions[i]["correct"] for i in idx if predictions[i]["correct"] is not None]
    if correct:
        out["accuracy"] = sum(correct) / len(correct)
    norm = [predictions[i]["correct_norm"] for i in idx if predictions[i]["correct_norm"] is not None]
    if norm:
        out["accuracy_norm"] = sum(norm) / len(norm)
    exact = [predictions[i]["exact_match"] for i in idx if predictions[i].get("exact_match") is not None]
    if exact:
        out["exact_match"] = sum(exact) / len(exact)
    for name in ("tool_call_exact_match", "tool_argument_f1"):
        scored = [float(predictions[i][name]) for i in idx if predictions[i].get(name) is not None]
        if scored:
            out[name] = sum(scored) / len(scored)
    out.update(figures_of(labels_of, idx))  # macro-F1, balanced accuracy, per class, confusion matrix
    scored = [rouge_of[i] for i in idx if i in rouge_of]
    for k in ROUGE_KEYS if scored else ():
        out[k] = sum(s[k] for s in scored) / len(scored)
    generated = [predictions[i] for i in idx if _scored_text(predictions[i])]
    out.update(module_scores(modules, [_answer(p) for p in generated], [p["target"] for p in generated]))
    out["n"] = len(idx)
    return out


def _scored_text(pred: dict) -> bool:
    """A generated reply that text metrics (ROUGE, evaluate modules) score: its target has text (a reply that is
    tool calls only is scored by the call figures)."""
    return pred["mode"] == "generate" and bool(pred["target"].strip())


def _answer(pred: dict) -> str:
    """The text a generated reply is scored on: its answer without reasoning or calls where it was read back."""
    return pred.get("answer", pred["prediction"])


def write_predictions(path: str | Path, predictions: Iterable[dict]) -> None:
    """One JSON object per line, written to a temporary file and renamed into place."""
    lines = [json.dumps(p, ensure_ascii=False, default=float) + "\n" for p in predictions]
    atomic.write_text(path, "".join(lines))

