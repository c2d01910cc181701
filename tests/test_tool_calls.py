"""Tool calls read back from generated replies and scored (ift/evaluation/tool_calls.py), and held-out
tool-calling conversations scored by evaluation (ift/evaluation/evaluate.py): the history rendered with the row's
tools as inference renders it, the reply parsed as `ift generate` parses it, call exact match and argument F1
recorded per row and averaged; plain conversations keep their exact match on the raw reply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_llama, build_tiny_tokenizer
from ift.evaluation.tool_calls import argument_f1, calls_match, parse_reply


@pytest.mark.parametrize("text, content, reasoning, calls", [
    ('<think>\nneed it\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "", "need it", [{"name": "get_weather", "arguments": {"city": "Paris"}}]),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "",
     None, [{"name": "get_weather", "arguments": {"city": "Paris"}}]),  # Llama-3.1's form
    ("adding\n</think>\n\nIt is 4.", "It is 4.", "adding", []),  # the generation prompt opened the block
    ("<tool_call>\n{broken</tool_call>", "", None, [{"name": None, "arguments": None, "text": "{broken"}]),
    ("Plain answer.", "Plain answer.", None, []),
])
def test_replies_read_back_into_reasoning_answer_and_calls(text, content, reasoning, calls):
    reply = parse_reply(text)
    assert (reply.content, reply.reasoning, reply.tool_calls) == (content, reasoning, calls)
    # a JSON answer is only a call where the prompt had tools
    assert parse_reply('{"name": "x", "parameters": {}}', bare_json=False).tool_calls == []


def test_call_exact_match_and_argument_f1():
    ref = [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]
    same = [{"name": "get_weather", "arguments": {"days": 2, "city": "Paris"}}]  # key order and form do not matter
    assert calls_match(same, ref) and argument_f1(same, ref) == 1.0
    wrong_value = [{"name": "get_weather", "arguments": {"city": "Paris", "days": "2"}}]  # "2" is not 2 in JSON
    assert not calls_match(wrong_value, ref) and argument_f1(wrong_value, ref) == pytest.approx(0.5)
    extra = same + [{"name": "get_time", "arguments": {}}]
    assert not calls_match(extra, ref) and argument_f1(extra, ref) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert not calls_match([], ref) and argument_f1([], ref) == 0.0
    assert calls_match([], []) and argument_f1([], []) == 1.0
    assert calls_match(same + ref, ref + same)  # the same calls in another order


# ------------------------------------------------------------------------------------ held-out conversations

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}}}}]
PARIS = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
ROME = {"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}
CALL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
# a chat template in the tiny tokenizer's own tokens: the tools' names, each call a <tool_call> JSON block
TEMPLATE = ("{% if tools %}<s>tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}</s>{% endif %}"
            "{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] or '' }}{% for c in m['tool_calls'] or [] %}"
            "<tool_call>{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}"
            "</tool_call>{% endfor %}</s>{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}")


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _calls(*calls: dict) -> dict:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function",
                            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in calls]}


def _row(*messages: dict, tools: bool = True) -> dict:
    return {"messages": list(messages), **({"tools": json.dumps(TOOLS)} if tools else {})}


# what the tiny model is trained on: every request answered with the Paris call (without tools, the same text in a
# plain reply), and the call's result answered in words
PARIS_LOOP = (_user("Weather in Paris?"), _calls(PARIS), {"role": "tool", "content": "21 C"},
              {"role": "assistant", "content": "It is 21 C."})
TRAIN = [_row(*PARIS_LOOP), _row(_user("Weather in Rome?"), _calls(PARIS)),
         _row(_user("Hi"), {"role": "assistant", "content": CALL_TEXT}, tools=False)]
TEST = [
    _row(_user("Weather in Paris?"), _calls(PARIS)),  # the call it makes: right
    _row(_user("Weather in Rome?"), _calls(ROME)),  # the right function, one argument of two wrong
    _row(*PARIS_LOOP),  # no call due: the answer in words
    _row(_user("Hi"), {"role": "assistant", "content": CALL_TEXT}, tools=False),  # plain: the raw text is scored
    _row(_user("Hello there"), {"role": "assistant", "content": "Hello"}, tools=False),
]


def _write_source(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    held_out = [_row(_user("Weather in Oslo?"), _calls(PARIS))]
    for split, rows in (("train", TRAIN), ("validation", held_out), ("test", TEST)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def tool_model():
    """A tiny Llama trained for 70 steps (seconds) to answer every prompt with the Paris call, so that its greedy
    replies hold calls that parse, right for some held-out rows and wrong for others."""
    from ift.data.conversations import encode_conversations
    from ift.data.encoding import pad_rows
    from ift.data.formats import conversation_tools, normalize_row

    tok = build_tiny_tokenizer()
    tok.chat_template = TEMPLATE
    model = build_tiny_llama(tok)
    convs = [normalize_row(r, "messages", index=i) for i, r in enumerate(TRAIN)]
    tools = [conversation_tools(r, index=i) for i, r in enumerate(TRAIN)]
    encoded = encode_conversations(tok, convs, tools=tools, max_length=256)
    ids, mask = pad_rows([e.input_ids for e in encoded], tok.pad_token_id, left=False)
    labels, _ = pad_rows([e.labels for e in encoded], -100, left=False)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(70):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tok


@pytest.fixture(scope="module")
def test_rows(tmp_path_factory) -> list[dict]:
    """The held-out rows as preparation writes them (ift.data.prepare.build_splits: prompt, completion, messages,
    and the whole conversation with its tools in `chat` where it has calls or tools)."""
    from ift.data.prepare import build_splits
    from ift.recipe import DataConfig
    from ift.templates.library import TemplateLibrary

    folder = _write_source(tmp_path_factory.mktemp("tool_source") / "weather")
    # the held-out rows repeat trained ones (the model answers them as trained): no leak check
    data = DataConfig.model_validate({"sources": [{"path": str(folder), "format": "messages"}], "leak_check": False})
    return build_splits(data, TemplateLibrary()).splits["test"].to_list()


def test_tool_calls_are_scored_as_inference_reads_them(tool_model, test_rows):
    """Evaluation's figures equal those of inference's path on the same rows: each history encoded by `ift
    generate`'s prompt format with the row's tools, decoded greedily, read back by parse_reply and scored."""
    from ift.data.formats import conversation_tools, normalize_row
    from ift.evaluation.decoding import Decoding, decode, text_of
    from ift.evaluation.evaluate import evaluate
    from ift.evaluation.text_metrics import normalize_answer
    from ift.inference.prompts import PromptFormat
    from ift.recipe import EvaluationConfig

    model, tok = tool_model
    metrics, preds = evaluate(model, tok, "causal", test_rows,
                              EvaluationConfig(metrics=["accuracy"], max_new_tokens=96), batch_size=2)
    assert len(preds) == len(TEST) == metrics["n"]
    exact, calls_right, f1 = [], [], []
    for row, pred in zip(TEST, preds):
        messages = normalize_row(row, "messages")  # as preparation reads it: calls' arguments as JSON values
        tools, history = conversation_tools(row), messages[:-1]
        ids = PromptFormat(chat_template=True, tools=tools).encode(tok, history)
        [gen] = decode(model, tok, "causal", [ids], Decoding(max_new_tokens=96))
        text = text_of(tok, gen.ids)
        assert pred["prediction"] == text  # the raw reply is kept
        target = messages[-1]["content"] or ""
        if tools is None:  # a plain conversation: its raw reply against the target, nothing parsed
            assert not {"answer", "tool_calls", "tool_call_exact_match"} & set(pred)
            exact.append(normalize_answer(text) == normalize_answer(target))
            continue
        reply = parse_reply(text)
        reference = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in messages[-1].get("tool_calls") or []]
        assert (pred["answer"], pred["tool_calls"], pred["target_tool_calls"]) == (reply.content, reply.tool_calls,
                                                                                     reference)
        calls_right.append(calls_match(reply.tool_calls, reference))
        f1.append(argument_f1(reply.tool_calls, reference))
        assert (pred["tool_call_exact_match"], pred["tool_argument_f1"]) == (calls_right[-1], f1[-1])
        exact.append(normalize_answer(reply.content) == normalize_answer(target) and calls_right[-1])
        assert pred["exact_match"] == exact[-1] and pred["tools"] == tools
        # the history answered is the whole of it: the earlier call and its result included
        assert [(m["role"], bool(m.get("tool_calls"))) for m in pred["history"]] == [
            (m["role"], bool(m.get("tool_calls"))) for m in history]
    assert metrics["tool_call_exact_match"] == pytest.approx(sum(calls_right) / len(calls_right))
    assert metrics["tool_argument_f1"] == pytest.approx(sum(f1) / len(f1))
    assert metrics["exact_match"] == pytest.approx(sum(exact) / len(exact))
    # as trained: the Paris call right, half its arguments right for Rome, no call after the result (right)
    assert calls_right == [True, False, True] and f1 == pytest.approx([1.0, 0.5, 1.0])
    assert [p["exact_match"] for p in preds[:3]] == [True, False, True] and preds[2]["answer"] == "It is 21 C."
    # the plain row whose target is the call's text matches on the raw reply (parsing would have emptied it)
    assert preds[3]["prediction"] == CALL_TEXT and preds[3]["exact_match"] is True
    by_source = metrics["by_source"]["weather"]
    assert by_source["tool_call_exact_match"] == metrics["tool_call_exact_match"]


def test_text_metrics_score_the_answer_of_rows_with_a_target_text(tool_model, test_rows):
    """ROUGE scores the answer read back from the reply (calls and reasoning apart) of rows whose reference has
    text; a reference reply of calls only is scored by the call figures alone."""
    from ift.evaluation.evaluate import evaluate
    from ift.evaluation.text_metrics import rouge_per_pair
    from ift.recipe import EvaluationConfig

    model, tok = tool_model
    metrics, preds = evaluate(model, tok, "causal", test_rows, EvaluationConfig(metrics=["rouge"], max_new_tokens=96))
    with_text = [p for p in preds if p["target"].strip()]
    assert metrics["n"] == len(TEST) and len(with_text) == 3
    pairs = rouge_per_pair([p.get("answer", p["prediction"]) for p in with_text], [p["target"] for p in with_text],
                           True)
    assert metrics["rouge1"] == pytest.approx(sum(pairs["rouge1"]) / 3) and pairs["rouge1"][0] == 1.0


def test_tool_figures_are_registered_and_can_choose_the_best_checkpoint():
    from ift.errors import IftError
    from ift.evaluation.compare import compare_table
    from ift.metrics import METRICS, SCORES, computed_by, label
    from ift.recipe import load_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tool_calls.yaml"
    for name in ("tool_call_exact_match", "tool_argument_f1"):
        assert METRICS[name].higher_is_better and name in SCORES and name in computed_by(["accuracy"])
        assert label(name) != name
        chosen = load_recipe(recipe, ["evaluation.metrics=[loss,accuracy]", f"training.metric_for_best_model={name}",
                                      "training.greater_is_better=true"])
        assert chosen.training.metric_for_best_model == name
        with pytest.raises(IftError, match="not among the computed metrics"):
            load_recipe(recipe, [f"training.metric_for_best_model={name}", "training.greater_is_better=true"])
    rows = compare_table({"tool_call_exact_match": 0.0, "tool_argument_f1": 0.0},
                         {"tool_call_exact_match": 0.9, "tool_argument_f1": 0.95})
    assert [(r["metric"], r["delta"]) for r in rows] == [("tool_call_exact_match", 0.9), ("tool_argument_f1", 0.95)]
