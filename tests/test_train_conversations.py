"""Training on conversations: a chat template and its tokens set up on a base tokenizer that has neither, the new
embedding rows trained under LoRA, the template saved in final/ and named in the card, held-out conversations
answered from their history, and reload / resume exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ift.data.chat_templates import CHAT_TEMPLATES
from test_train import assert_same_weights, final_weights, fresh_accelerate_state, run_train, tiny_base  # noqa: F401

NAMES = ["Ada", "Bo", "Cy", "Di"]


def chat_recipe(tmp: Path, *, tied: bool = False, **training) -> Path:
    rows = []
    for i in range(80):
        conv = [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"hello {NAMES[i % 4]}"}]
        if i % 2:
            conv += [{"from": "human", "value": "who are you"}, {"from": "gpt", "value": "I am Vic"}]
        rows.append({"id": i, "conversations": conv})
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model": {"name_or_path": str(tiny_base(tmp)), "dtype": "float32"},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"sources": [{"path": str(tmp / "chat.jsonl")}], "chat_template": "chatml", "max_length": 64,
                 "validation_size": 8, "test_size": 8, "special_tokens": ["<|vic|>"]},
        "training": {"output_dir": str(tmp / "run"), "seed": 3, "max_steps": 8, "per_device_train_batch_size": 8,
                     "learning_rate": 5e-3, "lr_scheduler_type": "constant", "report_to": ["none"],
                     "eval_steps": 4, "save_steps": 4, "save_total_limit": 5, **training},
        "evaluation": {"metrics": ["loss", "rouge"], "max_new_tokens": 4},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_added_chat_tokens_train_under_lora_and_the_run_reloads_exactly(tmp_path, capsys):
    from ift.cli import main as cli_main

    run = run_train(chat_recipe(tmp_path))
    final = run / "final"
    # the template trained with is the one saved with the tokenizer, and the card names it
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template == CHAT_TEMPLATES["chatml"]
    new = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|vic|>"])
    assert min(new) >= 400  # beyond the base vocabulary of the tiny tokenizer
    report = json.loads((run / "data_report.json").read_text())["chat"]
    assert report == {"chat_template": "chatml", "has_template": True, "end_of_turn": "<|im_end|>",
                      "added_tokens": ["<|im_start|>", "<|im_end|>", "<|vic|>"]}
    card = (run / "README.md").read_text()
    assert "Chat template: `chatml`" in card and "`<|im_end|>`" in card
    # the new rows trained (peft's trainable tokens, input embedding and the untied head), the rest stayed
    weights = final_weights(run)
    deltas = {k: v for k, v in weights.items() if "trainable_tokens_delta" in k}
    assert len(deltas) == 2 and all(v.shape[0] == 3 and v.abs().sum() > 0 for v in deltas.values())
    # a held-out conversation is answered from its history, saved with the prediction
    preds = [json.loads(line) for line in (run / "predictions" / "test.jsonl").read_text().splitlines()]
    assert preds and all(p["history"][-1] == {"role": "user", "content": p["prompt"]} for p in preds)
    assert all(isinstance(p["exact_match"], bool) for p in preds)
    # `ift eval` on final/ (the saved adapter on a freshly loaded base) reproduces training's own test answers
    capsys.readouterr()
    assert cli_main(["eval", str(run), "--split", "test"]) == 0
    again = sorted((run / "predictions").glob("test-*.jsonl")) or sorted((run / "predictions").glob("test*.jsonl"))
    latest = [json.loads(line) for line in again[-1].read_text().splitlines()]
    assert [p["prediction"] for p in latest] == [p["prediction"] for p in preds]
    # `ift merge` folds the adapter and the trained token rows into one model that computes the same function
    from transformers import AutoModelForCausalLM

    from ift.modeling.final import load_final
    from ift.recipe import load_recipe

    assert cli_main(["merge", str(run)]) == 0
    adapter = load_final(final, load_recipe(run / "recipe.yaml").model)
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    ids = torch.tensor([tok(tok.apply_chat_template([{"role": "user", "content": "who are you"}], tokenize=False,
                                                    add_generation_prompt=True), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter.model(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


def test_resume_with_added_chat_tokens_ends_exact(tmp_path):
    a = run_train(chat_recipe(tmp_path / "a"))
    b_recipe = chat_recipe(tmp_path / "b")
    b = run_train(b_recipe)
    assert_same_weights(final_weights(a), final_weights(b))
    shutil.rmtree(b / "checkpoints" / "step-8", ignore_errors=True)
    shutil.rmtree(b / "final")
    run_train(b_recipe, resume="auto")
    assert_same_weights(final_weights(a), final_weights(b))
    ma, mb = (json.loads((r / "metrics.json").read_text())["test"] for r in (a, b))
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    assert torch.isfinite(torch.tensor(ma["loss"]))


def test_a_tool_calling_run_scores_its_calls_and_chooses_the_best_checkpoint_by_them(tmp_path, capsys):
    """Validation and test score the held-out calls (tool_call_exact_match chooses the checkpoint), the base is
    scored on the same rows in the run's chat template — by training and by `ift eval --base` alike — and the card
    states the tool format."""
    from test_tool_calls import PARIS, ROME, TEMPLATE, _calls, _row, _user

    from ift.cli import main as cli_main

    tmp_path.mkdir(exist_ok=True)
    data = tmp_path / "weather"
    data.mkdir()
    cities = ["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Baku", "Doha", "Riga"]
    splits = {"train": [_row(_user(f"Weather in {c}?"), _calls({**PARIS, "arguments": {"city": c, "unit": "celsius"}}))
                        for c in cities * 2],
              "validation": [_row(_user("Weather in Paris?"), _calls(PARIS))],
              "test": [_row(_user("Weather in Rome?"), _calls(ROME)),
                       _row(_user("Hi"), {"role": "assistant", "content": "Hello"}, tools=False)]}
    for split, rows in splits.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tools.jinja").write_text(TEMPLATE)
    recipe = {
        "model": {"name_or_path": str(tiny_base(tmp_path)), "dtype": "float32"},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"sources": [{"path": str(data), "format": "messages"}], "chat_template": str(tmp_path / "tools.jinja"),
                 "max_length": 128, "leak_check": False},
        "training": {"output_dir": str(tmp_path / "run"), "seed": 3, "max_steps": 4, "per_device_train_batch_size": 8,
                     "learning_rate": 5e-3, "report_to": ["none"], "eval_steps": 2, "save_steps": 2,
                     "metric_for_best_model": "tool_call_exact_match", "greater_is_better": True},
        "evaluation": {"metrics": ["loss", "accuracy"], "max_new_tokens": 6, "compare_base": True},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = run_train(tmp_path / "recipe.yaml")
    metrics = json.loads((run / "metrics.json").read_text())
    validations = [h["validation"] for h in metrics["history"] if "validation" in h]
    assert validations and all("tool_call_exact_match" in v and "tool_argument_f1" in v for v in validations)
    assert metrics["best"]["value"] in [v["tool_call_exact_match"] for v in validations]
    for section in (metrics["test"], metrics["base"]["test"]):
        assert {"tool_call_exact_match", "tool_argument_f1", "exact_match"} <= set(section)
        assert section["n"] == 2
    preds = [json.loads(line) for line in (run / "predictions" / "test.jsonl").read_text().splitlines()]
    assert preds[0]["target_tool_calls"] == [ROME] and "tool_calls" in preds[0] and "tool_calls" not in preds[1]
    card = (run / "README.md").read_text()
    assert "## Chat format" in card and "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": " \
        "\"Paris\"}}</tool_call>" in card and "| Tool-call exact match |" in card
    # `ift eval --base` gives the base the run's chat template (the tiny base tokenizer has none of its own)
    capsys.readouterr()
    assert cli_main(["eval", str(run), "--base"]) == 0
    records = json.loads((run / "metrics.json").read_text())["evaluations"]
    again = [json.loads(line) for line in (run / records[-1]["predictions"]).read_text().splitlines()]
    base = [json.loads(line) for line in (run / "predictions" / "base-test.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in again] == [p["prediction"] for p in base]
    assert records[-1]["metrics"]["tool_call_exact_match"] == metrics["base"]["test"]["tool_call_exact_match"]
