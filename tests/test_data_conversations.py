"""ift.data.prepare with conversational sources: formats through build_splits and tokenize, masks equal to
ift.data.conversations' spans, system prompts, train_on, leaks and mixtures, truncation reports, CLI errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import build_tiny_tokenizer
import ift.data.prepare as D
from ift.data.tokenization import TURNS_DROPPED, tokenize
from ift.cli import main as cli_main
from ift.data.conversations import encode_conversation
from ift.data.chat_templates import setup_chat_tokenizer
from ift.errors import IftError
from ift.recipe import DataConfig
from ift.templates.library import TemplateLibrary
from test_conversations import labelled_runs as runs
from test_data import TEMPLATES, _isolated_cache, toy_rows, write_jsonl  # noqa: F401 (autouse fixture)

TURNS = [("hi there", "hello, how can I help"), ("who are you", "I am Vic, made by Ada Labs"),
         ("thanks", "you are welcome")]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    (root / "toy").mkdir()
    (root / "toy" / "templates.yaml").write_text(TEMPLATES["toy"])
    return TemplateLibrary(dirs=[root], promptsource=False)


@pytest.fixture(scope="module")
def tok():
    """The tiny tokenizer given ChatML the way a recipe's `chat_template: chatml` does (tokens added)."""
    t = build_tiny_tokenizer()
    setup = setup_chat_tokenizer(t, "chatml")
    assert setup.added_tokens == ("<|im_start|>", "<|im_end|>") and setup.end_of_turn == "<|im_end|>"
    return t


def conversation(i: int, exchanges: int) -> list[tuple[str, str]]:
    return [(f"{u} {i}", f"{a} {i}") for u, a in TURNS[:exchanges]]


def as_format(fmt: str, i: int, exchanges: int = 2) -> dict:
    turns = conversation(i, exchanges)
    if fmt == "messages":
        return {"messages": [m for u, a in turns for m in ({"role": "user", "content": u},
                                                            {"role": "assistant", "content": a})]}
    if fmt == "sharegpt":
        return {"conversations": [m for u, a in turns for m in ({"from": "human", "value": u},
                                                                {"from": "gpt", "value": a})]}
    if fmt == "prompt_completion":
        return {"prompt": turns[0][0], "completion": turns[0][1]}
    if fmt == "alpaca":
        return {"instruction": turns[0][0], "input": "" if i % 2 else f"context {i}", "output": turns[0][1]}
    raise ValueError(fmt)


def write_source(folder: Path, fmt: str, n: int = 40, exchanges: int = 2) -> Path:
    return write_jsonl(folder / f"{fmt}.jsonl", [as_format(fmt, i, exchanges) for i in range(n)])


def cfg(**kw) -> DataConfig:
    return DataConfig.model_validate({"chat_template": "chatml", "validation_size": 4, "test_size": 4, **kw})


# ------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "prompt_completion", "alpaca"])
def test_each_format_trains_exactly_on_the_assistant_replies(tmp_path, library, tok, fmt):
    data = cfg(sources=[{"path": str(write_source(tmp_path, fmt))}])
    prepared = D.build_splits(data, library)
    assert prepared.report["sources"][fmt]["format"] == fmt  # detected from the columns
    assert prepared.data.sources[0].format == fmt  # pinned in the recipe a run saves
    tokens, report = tokenize(prepared.splits, tok, "causal", data)
    for split in ("train", "validation", "test"):
        rows, toks = prepared.splits[split], tokens[split]
        assert len(toks) == len(rows) > 0
        for row, t in zip(rows, toks):
            assert row["messages"][-1] == {"role": "assistant", "content": row["completion"]}
            ids, labels = encode_conversation(tok, row["messages"])
            assert (t["input_ids"], t["labels"]) == (ids, labels)  # the pipeline is the library's encoding
            replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
            assert runs(tok, t["input_ids"], t["labels"]) == [r + "<|im_end|>" for r in replies]
    assert report["settings"]["end_of_turn"] == "<|im_end|>"


def test_alpaca_rows_render_through_the_shipped_template(tmp_path, library):
    data = cfg(sources=[{"path": str(write_source(tmp_path, "alpaca"))}])
    prepared = D.build_splits(data, library)
    assert prepared.report["sources"]["alpaca"]["templates"] == [D.ALPACA_TEMPLATE]
    for row in prepared.splits["train"]:
        user = row["messages"][0]["content"]
        i = int(user.split()[-1]) if "context" not in user else int(user.split()[-1])
        expected = f"hi there {i}" if i % 2 else f"hi there {i}\n\ncontext {i}"  # empty input: no blank section
        assert user == expected


def test_system_prompt_added_never_trained_and_a_rows_own_wins(tmp_path, library, tok):
    rows = [as_format("messages", i) for i in range(30)]
    for r in rows[:10]:
        r["messages"].insert(0, {"role": "system", "content": "Own system text."})
    data = cfg(sources=[{"path": str(write_jsonl(tmp_path / "m.jsonl", rows))}], system_prompt="You are Vic.")
    prepared = D.build_splits(data, library)
    tokens, _ = tokenize(prepared.splits, tok, "causal", data)
    systems = set()
    for row, t in zip(prepared.splits["train"], tokens["train"]):
        assert row["messages"][0]["role"] == "system"
        systems.add(row["messages"][0]["content"])
        assert not any("You are Vic" in r or "Own system" in r for r in runs(tok, t["input_ids"], t["labels"]))
    assert systems == {"You are Vic.", "Own system text."}


def test_last_assistant_trains_only_the_final_reply(tmp_path, library, tok):
    data = cfg(sources=[{"path": str(write_source(tmp_path, "sharegpt", exchanges=3))}], train_on="last_assistant")
    prepared = D.build_splits(data, library)
    tokens, _ = tokenize(prepared.splits, tok, "causal", data)
    for row, t in zip(prepared.splits["train"], tokens["train"]):
        assert runs(tok, t["input_ids"], t["labels"]) == [row["completion"] + "<|im_end|>"]


def test_format_override_and_undecidable_sources(tmp_path, library):
    path = write_source(tmp_path, "sharegpt")
    # forced to messages, a ShareGPT file is refused at its first row, with the hint
    with pytest.raises(IftError) as err:
        D.build_splits(cfg(sources=[{"path": str(path), "format": "messages",
                                     "conversation_column": "conversations"}]), library)
    assert "row 0" in err.value.where and str(path) in err.value.where and "sharegpt" in err.value.fix
    # a renamed column of turns, named by conversation_column
    rows = [{"dialog": r["conversations"]} for r in (as_format("sharegpt", i) for i in range(20))]
    other = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = D.build_splits(cfg(sources=[{"path": str(other), "conversation_column": "dialog"}]), library)
    assert prepared.report["sources"]["d"]["format"] == "sharegpt"
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"a": 1, "b": 2}] * 10)
    with pytest.raises(IftError) as err:
        D.build_splits(cfg(sources=[{"path": str(odd)}]), library)
    assert err.value.where == "data.sources.0.format" and "format:" in err.value.fix


def test_a_conversation_in_test_leaves_train_whole(tmp_path, library):
    folder = tmp_path / "chat"
    train = [as_format("sharegpt", i) for i in range(30)]
    test = [as_format("sharegpt", 3), as_format("sharegpt", 4)]
    test[1]["conversations"][-1]["value"] += " (different ending)"  # the same start, another conversation
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "test.jsonl", test)
    data = cfg(sources=[{"path": str(folder)}])
    prepared = D.build_splits(data, library)
    assert prepared.report["leaks"]["removed"]["chat"]["train"] == 1
    kept = [r["messages"] for r in prepared.splits["train"]] + [r["messages"] for r in prepared.splits["validation"]]
    assert all(m[0]["content"] != "hi there 3" for m in kept)
    assert any(m[0]["content"] == "hi there 4" for m in kept)


def test_mixture_of_template_and_conversation_sources(tmp_path, library, tok):
    toy = write_jsonl(tmp_path / "toy.jsonl", toy_rows(60))
    chat = write_source(tmp_path, "sharegpt", n=40)
    data = cfg(sources=[{"path": str(toy), "templates": ["toy/cls"], "weight": 0.5},
                        {"path": str(chat), "weight": 0.5}], mixture={"strategy": "weighted", "total": 60})
    prepared = D.build_splits(data, library)
    train = prepared.splits["train"]
    assert prepared.report["mixture"]["sources"]["toy"]["rows"] == 30
    assert prepared.report["mixture"]["sources"]["sharegpt"]["rows"] == 30
    tokens, report = tokenize(prepared.splits, tok, "causal", data)
    for row, t in zip(train, tokens["train"]):
        if row["messages"]:
            assert len(runs(tok, t["input_ids"], t["labels"])) == 2
        else:  # a template pair, as plain text (auto wraps conversations only): loss on the label and EOS
            assert row["template"] == "toy/cls"
            assert runs(tok, t["input_ids"], t["labels"])[0].strip().startswith(row["completion"])
    assert set(report["train"]["sources"]) == {"toy", "sharegpt"}


def test_too_long_conversations_lose_their_earliest_exchanges_first(tmp_path, library, tok):
    data = cfg(sources=[{"path": str(write_source(tmp_path, "sharegpt", exchanges=3))}], max_length=64)
    prepared = D.build_splits(data, library)
    tokens, report = tokenize(prepared.splits, tok, "causal", data)
    train = report["train"]
    assert train["turns_dropped"] > 0 and train["dropped"] == 0
    for row, t in zip(prepared.splits["train"], tokens["train"]):
        assert len(t["input_ids"]) <= 64
        if t["truncated"] == TURNS_DROPPED:
            assert runs(tok, t["input_ids"], t["labels"])[-1] == row["completion"] + "<|im_end|>"
    # truncation: drop drops over-long conversations whole; here every one is too long
    drop = cfg(sources=data.sources, max_length=64, truncation="drop")
    with pytest.raises(IftError) as err:
        tokenize(prepared.splits, tok, "causal", drop)
    assert err.value.where == "data.max_length"


def test_conversations_need_a_chat_template(tmp_path, library):
    data = DataConfig.model_validate({"sources": [{"path": str(write_source(tmp_path, "sharegpt"))}],
                                      "validation_size": 4, "test_size": 4})
    prepared = D.build_splits(data, library)
    with pytest.raises(IftError) as err:
        tokenize(prepared.splits, build_tiny_tokenizer(), "causal", data)
    assert err.value.where == "data.chat_template" and "chatml" in err.value.fix


def test_chat_template_booleans_still_read():
    assert DataConfig.model_validate({"sources": [{"path": "x"}], "chat_template": True}).chat_template == "tokenizer"
    off = DataConfig.model_validate({"sources": [{"path": "x"}], "chat_template": False})
    assert off.chat_template == "none" and not off.wraps_pairs and not off.chat_run


# ------------------------------------------------------------------------------------------- CLI errors

BAD_ROWS = {
    "unknown role": ({"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]},
                     "unknown ShareGPT role 'narrator'"),
    "missing column": ({"dialogue": []}, "has no column 'conversations'"),
    "empty conversation": ({"conversations": []}, "empty conversation"),
    "ends with a user turn": ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"},
                                                 {"from": "human", "value": "z"}]}, "ends with a user turn"),
    "call arguments not JSON": ({"conversations": [{"from": "human", "value": "x"},
                                                   {"from": "function_call", "value": '{"name": "f", "arguments": {a}}'},
                                                   {"from": "observation", "value": "1"}, {"from": "gpt", "value": "y"}]},
                                "message 1 (function_call)"),
    "tool result with no call": ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"},
                                                    {"from": "observation", "value": "1"}, {"from": "gpt", "value": "z"}]},
                                 "message 2 is a tool result with no tool call"),
    "tools not a list": ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
                          "tools": "get_weather"}, "column 'tools' is not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
@pytest.mark.parametrize("command", [["validate"], ["data", "stats"]])
def test_bad_conversations_are_one_clear_error_with_exit_2(tmp_path, capsys, case, command):
    bad, message = BAD_ROWS[case]
    rows = [as_format("sharegpt", i) for i in range(12)]
    if case == "tools not a list":
        rows = [dict(r, tools=None) for r in rows]
    if case == "missing column":
        rows = [{"dialogue": r["conversations"]} for r in rows]
    else:
        rows.insert(7, bad)
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {init: scratch, vocab_size: 300, config: {model_type: llama, hidden_size: 16, "
                      "intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}}\n"
                      f"data: {{sources: [{{path: {path}, format: sharegpt}}], chat_template: chatml}}\n"
                      f"training: {{output_dir: {tmp_path / 'run'}}}\n")
    assert cli_main([*command, str(recipe)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    if case != "missing column":
        assert f"{path}, row 7" in lines[0]
    assert not (tmp_path / "run").exists()


def test_preview_marks_every_reply_and_stats_count_turns(tmp_path, capsys):
    path = write_source(tmp_path, "sharegpt", exchanges=3)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {init: scratch, vocab_size: 300, config: {model_type: llama, hidden_size: 16, "
                      "intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}}\n"
                      f"data: {{sources: [{{path: {path}}}], chat_template: chatml, max_length: 48,"
                      " validation_size: 4, test_size: 4}\n"
                      f"training: {{output_dir: {tmp_path / 'run'}}}\n")
    assert cli_main(["data", "preview", str(recipe), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "(sharegpt)" in out and out.count("⟦") >= 1 and "<|im_end|>⟧" in out
    assert cli_main(["data", "stats", str(recipe), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    src = stats["splits"]["train"]["sources"]["sharegpt"]
    assert src["conversation"]["turns"]["p50"] == 6 and src["conversation"]["assistant_tokens"] > 0
    assert "turns_dropped" in src["tokens"]
    assert cli_main(["data", "stats", str(recipe)]) == 0
    text = capsys.readouterr().out
    assert "turns per conversation" in text and "earliest exchanges dropped" in text


# ------------------------------------------------------------------------------------------- tools and reasoning

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}
CITIES = ["Paris", "Lyon", "Nice", "Lille", "Brest"]


def tool_row(i: int) -> dict:
    """A call, its result and the answer (reasoning on odd rows); even rows carry their own tools column."""
    city = CITIES[i % len(CITIES)]
    answer = {"role": "assistant", "content": f"It is {20 + i} C in {city}."}
    if i % 2:
        answer["reasoning_content"] = f"the tool said {20 + i}"
    row = {"messages": [
        {"role": "user", "content": f"Weather in {city} {i}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": f"c{i}", "content": f"{20 + i} C"}, answer]}
    row["tools"] = json.dumps([WEATHER]) if i % 2 == 0 else None
    return row


@pytest.mark.parametrize("reasoning", [True, False])
def test_tool_calls_tools_and_reasoning_through_the_pipeline(tmp_path, library, reasoning):
    """A messages source with calls, tool results, per-row and source-level tools and reasoning, in Qwen3's
    template: the tokenized rows are the library's rows per turn (Qwen3 renders the empty thinking block of a
    call only while it is the last turn, so each call trains in its own row), the tools reach the template."""
    from test_conversations import real_tokenizer

    import ift.data.conversations as conv

    t = real_tokenizer("qwen3")
    path = write_jsonl(tmp_path / "calls.jsonl", [tool_row(i) for i in range(30)])
    data = cfg(sources=[{"path": str(path), "tools": [WEATHER]}], chat_template="tokenizer",
               train_on_reasoning=reasoning)
    prepared = D.build_splits(data, library)
    tokens, report = tokenize(prepared.splits, t, "causal", data)
    train, toks = prepared.splits["train"], tokens["train"]
    assert len(toks) == 2 * len(train) and report["train"]["turn_rows"] == len(train)
    assert report["train"]["dropped"] == 0 and report["settings"]["train_on_reasoning"] is reasoning
    k = 0
    for row in train:
        whole = json.loads(row["chat"])
        assert whole["tools"] == [WEATHER]  # the row's own column or the source's list
        assert row["messages"][1] == {"role": "assistant", "content": ""}  # role/content view for reports
        expected = conv.encode_conversation_rows(t, whole["messages"], tools=whole["tools"],
                                                 train_on_reasoning=reasoning)
        for ids, labels in expected:
            assert (toks[k]["input_ids"], toks[k]["labels"]) == (ids, labels)
            assert "Current weather of a city" in t.decode(ids)
            k += 1
        answer = whole["messages"][-1]
        think = (f"<think>\n{answer['reasoning_content']}\n</think>\n\n"
                 if answer.get("reasoning_content") and reasoning else
                 "" if answer.get("reasoning_content") else "<think>\n\n</think>\n\n")
        assert runs(t, *expected[-1]) == [think + answer["content"] + "<|im_end|>"]
        call = json.dumps({"name": "get_weather", "arguments": whole["messages"][1]["tool_calls"][0]["function"]
                           ["arguments"]})
        assert runs(t, *expected[0]) == [f"<think>\n\n</think>\n\n<tool_call>\n{call}\n</tool_call><|im_end|>"]


def test_tool_calling_dataset_is_deterministic_and_valid(tmp_path):
    """data/make_tool_calls_data.py: the same files twice; every row a valid conversation whose tools offer the
    function it calls; held-out prompts never in train."""
    import importlib.util

    from ift.data.formats import conversation_tools, normalize_row

    path = Path(__file__).resolve().parents[1] / "data" / "make_tool_calls_data.py"
    spec = importlib.util.spec_from_file_location("make_tool_calls_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for out in ("a", "b"):
        assert module.main(["--out", str(tmp_path / out)]) == 0
    prompts = {}
    for split, n in module.SIZES.items():
        text = (tmp_path / "a" / f"{split}.jsonl").read_text()
        assert text == (tmp_path / "b" / f"{split}.jsonl").read_text()
        rows = [json.loads(line) for line in text.splitlines()]
        assert len(rows) == n
        for i, row in enumerate(rows):
            messages = normalize_row(row, "messages", source=split, index=i)
            tools = [t["function"]["name"] for t in conversation_tools(row, source=split, index=i)]
            call = next(m for m in messages if m.get("tool_calls"))["tool_calls"][0]["function"]
            assert call["name"] in tools and len(tools) == 2
        prompts[split] = {r["messages"][0]["content"] for r in rows}
    assert not prompts["test"] & prompts["train"] and not prompts["validation"] & prompts["train"]
