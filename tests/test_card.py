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


# ------------------------------------------------------------------------------------------ chat format


def _chat_run(tmp_path, *, template: str, reasoning: bool, tools: bool, turn_rows: int):
    """A conversational run folder: its recipe, data report (chat setup, split and token reports), metrics and the
    tokenizer saved with the chat template it trained with."""
    from conftest import build_tiny_tokenizer
    from ift.data.chat_templates import setup_chat_tokenizer

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(
        f"model: {{name_or_path: {tmp_path / 'base'}}}\n"
        f"data: {{sources: [{{path: {tmp_path / 'calls'}, name: calls, format: messages}}], "
        f"chat_template: {template}, train_on_reasoning: {str(reasoning).lower()}}}\n"
        f"training: {{output_dir: {run}}}\n")
    tok = build_tiny_tokenizer()
    setup = setup_chat_tokenizer(tok, "chatml_tools" if template != "tokenizer" else "chatml")
    tok.save_pretrained(run / "tokenizer")
    report = {"splits": {"sources": {"calls": {"columns": ["messages", *(["tools"] if tools else [])]}},
                         "splits": {"train": {"rows": 8, "sources": {"calls": {"rows": 8}}}}},
              "tokens": {"train": {"rows": 8 + turn_rows, **({"turn_rows": turn_rows} if turn_rows else {})}},
              "chat": {**setup.as_dict(), "chat_template": template}}
    (run / "data_report.json").write_text(json.dumps(report))
    figures = {"tool_call_exact_match": 0.9, "tool_argument_f1": 0.95} if tools else {"exact_match": 0.5}
    base = {"tool_call_exact_match": 0.1, "tool_argument_f1": 0.2} if tools else {"exact_match": 0.25}
    (run / "metrics.json").write_text(json.dumps({"history": [], "test": {**figures, "n": 8},
                                                  "base": {"test": base}}))
    return run, tok


def test_card_states_the_chat_template_tool_format_reasoning_and_turn_rows(tmp_path):
    from huggingface_hub import ModelCard

    from ift.publish.card import EXAMPLE_CALL, EXAMPLE_TOOLS

    run, tok = _chat_run(tmp_path, template="chatml_tools", reasoning=True, tools=True, turn_rows=3)
    card = build_model_card(run, load_recipe(run / "recipe.yaml"))
    text = card.text
    assert "- Chat template: `chatml_tools`, saved with the tokenizer (serve with it); end of turn `<|im_end|>`" in text
    assert "the `tools` column of `calls`" in text
    # the tools block and the call as the saved template renders them: what apply_chat_template gives
    rendered = tok.apply_chat_template(EXAMPLE_CALL, tools=EXAMPLE_TOOLS, tokenize=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert "\n".join("  " + line if line else line for line in rendered.rstrip("\n").split("\n")) in text
    assert "`data.train_on_reasoning: true`" in text
    assert "3 training rows beyond one per conversation" in text
    assert "| Tool-call exact match | 0.100 | 0.900 | +0.800 | — |" in text
    assert "| Tool-call argument F1 | 0.200 | 0.950 | +0.750 | — |" in text
    assert "apply_chat_template(messages, tools=tools" in text  # the snippet hands the model its tools
    metrics = {r.metric_type for r in ModelCard(str(card)).data.eval_results}
    assert {"tool_call_exact_match", "tool_argument_f1"} <= metrics


def test_card_of_plain_conversations_names_the_tokenizers_template_and_no_tools(tmp_path):
    run, _ = _chat_run(tmp_path, template="tokenizer", reasoning=False, tools=False, turn_rows=0)
    text = build_model_card(run, load_recipe(run / "recipe.yaml")).text
    assert "- Chat template: the base tokenizer's own" in text
    assert "Tools:" not in text and "tools=tools" not in text
    assert "`data.train_on_reasoning: false`" in text and "One training row per conversation" in text
