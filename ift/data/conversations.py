"""Conversational rows: normalised to one message list, encoded with loss on assistant turns only.

Formats (``normalize_row``), all becoming ``[{"role": ..., "content": str}, ...]``:

- ``messages``: a column (default ``messages``) of ``{role, content}`` dicts (any role string).
- ``sharegpt``: a column (default ``conversations``) of ``{from, value}``; ``from`` is mapped by
  ``SHAREGPT_ROLES`` (human/user -> user, gpt/assistant/chatgpt/bing/bard -> assistant, system,
  tool/function/observation -> tool); any other value is an error.
- ``prompt_completion``: ``prompt``/``completion`` strings -> [user, assistant]; or TRL's
  conversational form (both lists of messages) -> prompt messages + completion messages.
- ``alpaca``: ``instruction``/``input``/``output``. The user turn is ``ALPACA_USER_FORMAT`` =
  ``"{instruction}\\n\\n{input}"`` when ``input`` is non-empty, else just ``instruction`` (no dangling
  blank section); the assistant turn is ``output``. A missing or null ``input`` counts as empty.

Only ``role`` and ``content`` are kept (tool calls and other keys are dropped). Errors are IftErrors
naming the source and row: empty conversation, no assistant turn, a conversation that does not end
with an assistant reply (nothing to learn from the last turn), a missing column/key, a non-string
content, an unknown ShareGPT role.

Encoding (``encode_conversation``) takes loss masks from character spans of the chat template's
own renderings, never from searching for markers in token ids:

- the whole conversation is rendered once and tokenized once (with offsets);
- assistant turn i spans from the end of ``render(messages[:i], add_generation_prompt=True)`` to the
  end of ``render(messages[:i + 1])``, cut just after the last end-of-turn string inside that span
  (ChatML ``<|im_end|>``, Llama-3 ``<|eot_id|>``), so the reply and its end-of-turn token carry loss
  but the layout the template writes after it (ChatML's ``"\\n"``, separators) does not. This matches
  what a ``{% generation %}...{% endgeneration %}`` block around content + end token marks. With no
  end-of-turn string known or found in the span, the span is the turn's rendering minus trailing
  whitespace;
- every rendering used must be a string prefix of the whole rendering ("prefix-stable"); a template
  that changes earlier text depending on later turns raises an IftError instead of mis-masking;
- a token carries loss if it overlaps an assistant span by at least one character (the rule
  transformers uses for ``return_assistant_tokens_mask``), so a token straddling a boundary is
  trained on;
- system, user and tool tokens never carry loss.

Set-up and use: ``setup_chat_tokenizer`` gives a tokenizer the recipe's template (data.chat_template) and the
special tokens it needs, once, before the model loads; ``end_of_turn_token`` names the token generation stops at;
``history_ids`` encodes a held-out conversation's history for answering its last user turn.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ift.errors import IftError

from ift.data.encoding import IGNORE

FORMATS = ("messages", "sharegpt", "prompt_completion", "alpaca")
Format = Literal["messages", "sharegpt", "prompt_completion", "alpaca"]
TrainOn = Literal["all_assistant", "last_assistant"]

SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool",
}

ALPACA_USER_FORMAT = "{instruction}\n\n{input}"  # used when input is non-empty; else the instruction alone

DEFAULT_COLUMNS = {"messages": "messages", "sharegpt": "conversations"}


def _where(source: str, index: int | None) -> str:
    return f"{source}, row {index}" if index is not None else source


# --------------------------------------------------------------------------------------------
# Format detection and normalisation
# --------------------------------------------------------------------------------------------


def detect_format(columns: set[str] | Sequence[str]) -> str | None:
    """The conversational format the column names point to, or None when unknown or ambiguous.

    A caller's explicit format always overrides this (``normalize_row(..., fmt=...)``).
    """
    cols = set(columns)
    found = []
    if "messages" in cols:
        found.append("messages")
    if "conversations" in cols:
        found.append("sharegpt")
    if {"prompt", "completion"} <= cols:
        found.append("prompt_completion")
    if {"instruction", "output"} <= cols:
        found.append("alpaca")
    return found[0] if len(found) == 1 else None


def _column(row: Mapping[str, Any], name: str, where: str, fmt: str) -> Any:
    if name not in row:
        raise IftError(f"column {name!r} missing for format {fmt!r}", where,
                       f"the row has columns {', '.join(sorted(map(str, row))) or 'none'}; "
                       "set the column name or the format explicitly")
    return row[name]


def _messages(value: Any, where: str, what: str, role_key: str = "role", content_key: str = "content",
              roles: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    if not isinstance(value, (list, tuple)):
        raise IftError(f"{what} is a {type(value).__name__}, not a list of messages", where,
                       "give a list of {" + f"{role_key}, {content_key}" + "} dicts")
    out = []
    for j, msg in enumerate(value):
        if not isinstance(msg, Mapping) or role_key not in msg or content_key not in msg:
            other = ("from", "value") if role_key == "role" else ("role", "content")
            hint = (f"this looks like the {'sharegpt' if role_key == 'role' else 'messages'} format; set it explicitly"
                    if isinstance(msg, Mapping) and set(other) <= set(msg) else
                    f"each message needs {role_key!r} and {content_key!r} keys")
            raise IftError(f"{what}: message {j} has no {role_key!r}/{content_key!r}", where, hint)
        role, content = msg[role_key], msg[content_key]
        if not isinstance(role, str) or not role:
            raise IftError(f"{what}: message {j} has role {role!r}, not a non-empty string", where,
                           "use system, user, assistant or tool")
        if roles is not None:
            if role.lower() not in roles:
                raise IftError(f"{what}: message {j} has unknown ShareGPT role {role!r}", where,
                               "known roles: " + ", ".join(sorted(roles)))
            role = roles[role.lower()]
        if not isinstance(content, str):
            raise IftError(f"{what}: message {j} ({role}) content is a {type(content).__name__}, not a string",
                           where, "give each message's content as text")
        out.append({"role": role, "content": content})
    return out


def _text(row: Mapping[str, Any], name: str, where: str, fmt: str, optional: bool = False) -> str:
    if optional and row.get(name) is None:
        return ""
    value = _column(row, name, where, fmt)
    if not isinstance(value, str):
        raise IftError(f"column {name!r} is a {type(value).__name__}, not a string", where,
                       "give the text as a string")
    return value


def check_conversation(messages: Sequence[Mapping[str, str]], where: str) -> None:
    """Raise an IftError when a conversation has nothing to learn from."""
    if not messages:
        raise IftError("empty conversation", where, "drop the row or give it at least a user and an assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise IftError("conversation has no assistant turn", where, "give it an assistant reply to learn from")
    if messages[-1]["role"] != "assistant":
        raise IftError(f"conversation ends with a {messages[-1]['role']} turn, not an assistant reply", where,
                       "nothing is learned from the final turn; drop it or add the assistant reply")


def normalize_row(
    row: Mapping[str, Any],
    fmt: str | None = None,
    *,
    source: str = "data",
    index: int | None = None,
    column: str | None = None,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    system_prompt: str | None = None,
) -> list[dict[str, str]]:
    """One row as a canonical message list (see the module docstring for the formats).

    fmt: one of FORMATS, or None to detect it from the row's columns. column: the message-list
    column of ``messages``/``sharegpt`` (defaults ``messages``/``conversations``). system_prompt:
    added as the first message when the row has no system message of its own (the row's wins).
    """
    where = _where(source, index)
    if fmt is None:
        fmt = detect_format(set(row))
        if fmt is None:
            raise IftError("cannot tell the conversation format from the columns "
                           f"{', '.join(sorted(map(str, row))) or 'none'}", where,
                           "set the format: " + ", ".join(FORMATS))
    if fmt in ("messages", "sharegpt"):
        name = column or DEFAULT_COLUMNS[fmt]
        value = _column(row, name, where, fmt)
        if fmt == "messages":
            messages = _messages(value, where, f"column {name!r}")
        else:
            messages = _messages(value, where, f"column {name!r}", "from", "value", SHAREGPT_ROLES)
    elif fmt == "prompt_completion":
        prompt = _column(row, prompt_column, where, fmt)
        completion = _column(row, completion_column, where, fmt)
        if isinstance(prompt, str) and isinstance(completion, str):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        elif isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
            messages = (_messages(prompt, where, f"column {prompt_column!r}")
                        + _messages(completion, where, f"column {completion_column!r}"))
        else:
            raise IftError(f"columns {prompt_column!r}/{completion_column!r} are a {type(prompt).__name__} and a "
                           f"{type(completion).__name__}", where,
                           "give both as strings, or both as lists of messages (TRL's conversational form)")
    elif fmt == "alpaca":
        instruction = _text(row, "instruction", where, fmt)
        extra = _text(row, "input", where, fmt, optional=True)
        output = _text(row, "output", where, fmt)
        user = ALPACA_USER_FORMAT.format(instruction=instruction, input=extra) if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        raise IftError(f"unknown conversation format {fmt!r}", where, "use one of " + ", ".join(FORMATS))
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}] + messages
    check_conversation(messages, where)
    return messages


def conversation_hash(messages: Sequence[Mapping[str, Any]]) -> int:
    """A stable 64-bit hash of the whole conversation (roles and contents, in order).

    sha1 over canonical JSON (sorted keys, no whitespace, unicode kept): the same in every process
    and Python version, unlike ``hash()``. For leak checks and deterministic splits.
    """
    canon = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = json.dumps(canon, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------

_BOS = "{{ bos_token if bos_token is defined and bos_token else '' }}"

CHAT_TEMPLATES = {
    "chatml": (
        "{%- for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "llama3": (
        _BOS
        + "{%- for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
TEMPLATE_TOKENS = {  # special tokens a base model's tokenizer needs for each named template
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}
# tried in order when the template is the tokenizer's own and no end-of-turn string is given
_EOT_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def resolve_chat_template(tokenizer: Any, spec: str) -> tuple[str | None, str | None]:
    """(template text, end-of-turn string) for spec = "tokenizer" | "none" | a name | a .jinja path.

    "tokenizer": the tokenizer's own template (end of turn None: inferred per turn at encoding).
    "none": (None, None), no chat template. A name of CHAT_TEMPLATES: that template and its
    END_OF_TURN (the tokens of TEMPLATE_TOKENS must be in the tokenizer, e.g. added with
    ``tokenizer.add_special_tokens``). A path: the file's text (end of turn None).
    """
    if spec == "none":
        return None, None
    if spec == "tokenizer":
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise IftError("the tokenizer has no chat template", "chat_template: tokenizer",
                           "choose a named template (" + ", ".join(CHAT_TEMPLATES) + "), a .jinja file, or none")
        return template, None
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec], END_OF_TURN[spec]
    path = Path(spec)
    if spec.endswith(".jinja") or path.exists() or "/" in spec:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise IftError(f"cannot read chat template file: {err.__class__.__name__}: {err}", spec,
                           "give a readable UTF-8 .jinja file") from None
        if not text.strip():
            raise IftError("chat template file is empty", spec, "write the Jinja template into it")
        return text, None
    close = difflib.get_close_matches(spec, list(CHAT_TEMPLATES), n=3, cutoff=0.5)
    raise IftError(f"unknown chat template {spec!r}", "chat_template",
                   (("did you mean: " + ", ".join(close) + "; ") if close else "") +
                   "use tokenizer, none, " + ", ".join(CHAT_TEMPLATES) + " or a path to a .jinja file")


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The token that ends an assistant turn in the tokenizer's chat template, when one can be told: the first
    known end-of-turn string the template writes that is one token of this vocabulary (ChatML ``<|im_end|>``,
    Llama-3 ``<|eot_id|>``, ...). Generation stops there too, so a chat model's answer ends with its turn."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        return None
    vocab = tokenizer.get_vocab()
    return next((t for t in _EOT_CANDIDATES if t in template and t in vocab), None)


@dataclass(frozen=True)
class ChatSetup:
    """What `setup_chat_tokenizer` did: recorded in the run's data report and named in the model card."""

    template: str  # "auto", "none", "tokenizer", a name of CHAT_TEMPLATES or the .jinja path given
    has_template: bool  # the tokenizer now has a chat template
    end_of_turn: str | None
    added_tokens: tuple[str, ...]  # tokens the vocabulary did not have (the embeddings grow by these)

    def as_dict(self) -> dict[str, Any]:
        return {"chat_template": self.template, "has_template": self.has_template, "end_of_turn": self.end_of_turn,
                "added_tokens": list(self.added_tokens)}


def setup_chat_tokenizer(tokenizer: Any, spec: str = "auto", special_tokens: Sequence[str] = ()) -> ChatSetup:
    """Give the tokenizer the chat template `spec` names (data.chat_template) and the special tokens it needs.

    auto/tokenizer keep the tokenizer's own template (tokenizer: an error when it has none); a name or path
    replaces it (``tokenizer.chat_template``), so every later step — encoding, evaluation, ``ift chat``, the
    tokenizer saved in ``final/`` — uses the template the model was trained with. A named template's tokens
    (TEMPLATE_TOKENS) and `special_tokens` missing from the vocabulary are added as special tokens (never split,
    never normalised); the caller resizes the embeddings. Running it twice changes nothing the second time.
    """
    if spec not in ("auto", "none"):
        text, _ = resolve_chat_template(tokenizer, spec)
        if spec != "tokenizer":
            tokenizer.chat_template = text
    wanted = [*TEMPLATE_TOKENS.get(spec, []), *special_tokens]
    vocab = tokenizer.get_vocab()
    new = list(dict.fromkeys(t for t in wanted if t not in vocab))
    if new:
        tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
    has = bool(getattr(tokenizer, "chat_template", None)) and spec != "none"
    return ChatSetup(spec, has, end_of_turn_token(tokenizer) if has else None, tuple(new))


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


class EncodedConversation(tuple):
    """``(input_ids, labels)``, unpackable as a pair, with what truncation did as attributes.

    dropped_messages: how many earliest messages (after a leading system message) were dropped;
    cut_tokens: how many tokens were cut from the end of the final assistant reply.
    """

    dropped_messages: int
    cut_tokens: int

    def __new__(cls, input_ids: list[int], labels: list[int], dropped_messages: int = 0, cut_tokens: int = 0):
        self = super().__new__(cls, (input_ids, labels))
        self.dropped_messages, self.cut_tokens = dropped_messages, cut_tokens
        return self

    @property
    def input_ids(self) -> list[int]:
        return self[0]

    @property
    def labels(self) -> list[int]:
        return self[1]

    @property
    def truncated(self) -> bool:
        return bool(self.dropped_messages or self.cut_tokens)


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]], template: str | None, gen: bool,
            where: str) -> str:
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise IftError("the tokenizer has no chat template", where,
                       "pass chat_template (e.g. resolve_chat_template(tokenizer, 'chatml'))")
    try:
        return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=gen)
    except IftError:
        raise
    except Exception as err:  # the template's raise_exception, Jinja errors, no template at all
        raise IftError(f"chat template failed: {err.__class__.__name__}: {' '.join(str(err).split())}", where,
                       "check the conversation's roles and order against the template, or choose another template"
                       ) from None


def assistant_spans(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    chat_template: str | None = None,
    end_of_turn: str | None = None,
    train_on: TrainOn = "all_assistant",
    where: str = "conversation",
) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering and the character spans [start, end) that carry loss (see module doc)."""
    if train_on not in ("all_assistant", "last_assistant"):
        raise IftError(f"unknown train_on {train_on!r}", where, "use all_assistant or last_assistant")
    full = _render(tokenizer, messages, chat_template, False, where)
    candidates = (end_of_turn,) if end_of_turn else tuple(
        t for t in (getattr(tokenizer, "eos_token", None), *_EOT_CANDIDATES) if t)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    spans = []
    for i in turns:
        if i == 0:
            raise IftError("conversation starts with an assistant turn", where,
                           "there is no prompt to condition it on; add a user turn or a system prompt")
        head = _render(tokenizer, messages[:i], chat_template, True, where)
        # the last message's rendering is the whole conversation's (rendered once above)
        turn = full if i + 1 == len(messages) else _render(tokenizer, messages[: i + 1], chat_template, False, where)
        for part, what in ((head, f"messages[:{i}] with the generation prompt"), (turn, f"messages[:{i + 1}]")):
            if not full.startswith(part):
                raise IftError(f"the chat template is not prefix-stable: the rendering of {what} is not a prefix "
                               "of the whole conversation's rendering", where,
                               "its masks cannot be computed from spans; use a template that renders earlier "
                               "turns the same whatever follows (e.g. chatml or llama3)")
        start, end = len(head), len(turn)
        if end < start:
            raise IftError("the chat template is not prefix-stable: the generation prompt is longer than the "
                           f"rendered assistant turn {i}", where, "use a template such as chatml or llama3")
        text = full[start:end]
        # the first candidate present wins (the given one, else the eos token, then known ones);
        # its last occurrence ends the span, so an end-of-turn string inside the reply is kept
        found = next((t for t in candidates if t in text), None)
        cut = text.rfind(found) + len(found) if found else len(text.rstrip())
        if cut > 0:
            spans.append((start, start + cut))
    return full, spans


def history_ids(tokenizer: Any, history: Sequence[Mapping[str, str]]) -> list[int]:
    """The ids a model is given to answer the last turn of `history`: the conversation rendered with the
    generation prompt and tokenized as training tokenized whole conversations (no special tokens added: the
    template writes its own)."""
    text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in history],
                                         tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _overlaps(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token (character offsets), whether it overlaps a span by at least one character."""
    if not spans or not len(offsets):
        return [False] * len(offsets)
    import numpy as np

    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    sp = np.asarray(spans, dtype=np.int64)
    hit = (off[:, :1] < sp[None, :, 1]) & (off[:, 1:] > sp[None, :, 0])
    return hit.any(axis=1).tolist()


def encode_conversations(
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    *,
    train_on: TrainOn = "all_assistant",
    max_length: int | None = None,
    end_of_turn: str | None = None,
    sources: Sequence[str] | None = None,
    drop_overlong: bool = False,
) -> list[EncodedConversation | None]:
    """`encode_conversation` over many conversations (the tokenizer's own template), equal to it row by row
    (tests compare): the renderings and spans per conversation, then one batched tokenizer call for all of them
    (the fast tokenizer's parallel batch); only conversations over max_length are encoded again alone."""
    if not getattr(tokenizer, "is_fast", False) or not conversations:
        return [encode_conversation(tokenizer, m, train_on=train_on, max_length=max_length, end_of_turn=end_of_turn,
                                    source=(sources[k] if sources else "conversation"), drop_overlong=drop_overlong)
                for k, m in enumerate(conversations)]
    rendered = []
    for k, messages in enumerate(conversations):
        where = sources[k] if sources else "conversation"
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        check_conversation(messages, where)
        rendered.append(assistant_spans(tokenizer, messages, end_of_turn=end_of_turn, train_on=train_on,
                                        where=where))
    enc = tokenizer([full for full, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out: list[EncodedConversation | None] = []
    for k, ((full, spans), ids, offsets) in enumerate(zip(rendered, enc["input_ids"], enc["offset_mapping"])):
        if max_length is not None and len(ids) > max_length:  # truncation: the one-at-a-time path
            out.append(encode_conversation(tokenizer, conversations[k], train_on=train_on, max_length=max_length,
                                           end_of_turn=end_of_turn, source=sources[k] if sources else "conversation",
                                           drop_overlong=drop_overlong))
            continue
        mask = _overlaps(offsets, spans)
        ids = list(ids)
        out.append(EncodedConversation(ids, [t if m else IGNORE for t, m in zip(ids, mask)]))
    return out


def _token_mask(tokenizer: Any, full: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of `full` and, per token, whether it overlaps a span by at least one character."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), _overlaps(enc["offset_mapping"], spans)
    # slow tokenizer: token boundaries from tokenizing prefixes of the text
    ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    mask = [False] * len(ids)

    def boundary(pos: int, round_up: bool) -> int:
        head = tokenizer(full[:pos], add_special_tokens=False)["input_ids"]
        common = 0
        while common < min(len(head), len(ids)) and head[common] == ids[common]:
            common += 1
        return common + (1 if round_up and common < len(head) else 0)

    for s, e in spans:
        for k in range(boundary(s, False), min(boundary(e, True), len(ids))):
            mask[k] = True
    return ids, mask


def _encode_once(tokenizer: Any, messages: Sequence[Mapping[str, str]], chat_template: str | None,
                 end_of_turn: str | None, train_on: TrainOn, where: str) -> tuple[list[int], list[int]]:
    full, spans = assistant_spans(tokenizer, messages, chat_template=chat_template, end_of_turn=end_of_turn,
                                  train_on=train_on, where=where)
    ids, mask = _token_mask(tokenizer, full, spans)
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]


def encode_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    chat_template: str | None = None,
    train_on: TrainOn = "all_assistant",
    max_length: int | None = None,
    end_of_turn: str | None = None,
    source: str = "conversation",
    index: int | None = None,
    drop_overlong: bool = False,
) -> EncodedConversation | None:
    """Token ids and labels of a conversation: labels are IGNORE (-100) except on assistant replies.

    Each labelled reply carries loss on its content and the template's end-of-turn token (see the
    module docstring for the span rules; end_of_turn overrides the end-of-turn string). train_on:
    "all_assistant" (every reply) or "last_assistant" (only the final one). chat_template: the
    Jinja text to use (e.g. from ``resolve_chat_template``), else the tokenizer's own.

    max_length (tokens): when the conversation is longer, whole earliest exchanges are dropped (an
    exchange starts at a user turn; a leading system message is kept) until it fits or only the last
    exchange is left; if that is still too long, the tokens past max_length are cut, which can only
    cut the final assistant reply's tail (its end-of-turn token included). If the final prompt alone
    is too long, nothing would be learned: an IftError (None with drop_overlong, for a dataset that counts the
    rows it drops). The result records ``dropped_messages`` and
    ``cut_tokens`` so callers can count and report truncated rows.
    """
    where = _where(source, index)
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    check_conversation(messages, where)
    ids, labels = _encode_once(tokenizer, messages, chat_template, end_of_turn, train_on, where)
    if max_length is None or len(ids) <= max_length:
        return EncodedConversation(ids, labels)
    if max_length <= 0:
        raise IftError(f"max_length {max_length} is not positive", where, "give a positive max_length")
    keep = 1 if messages[0]["role"] == "system" else 0
    head, body = messages[:keep], messages[keep:]
    dropped = 0
    while len(ids) > max_length:
        # the next exchange start: a user turn after the first message, followed by an assistant turn
        nxt = next((j for j in range(1, len(body)) if body[j]["role"] == "user"
                    and any(m["role"] == "assistant" for m in body[j:])), None)
        if nxt is None:
            break
        body = body[nxt:]
        dropped += nxt
        ids, labels = _encode_once(tokenizer, head + body, chat_template, end_of_turn, train_on, where)
    cut = max(0, len(ids) - max_length)
    if cut:
        last = max((k for k, lab in enumerate(labels) if lab != IGNORE), default=-1)
        first = last
        while first > 0 and labels[first - 1] != IGNORE:
            first -= 1
        if last < 0 or max_length <= first:  # the final reply would lose every token
            if drop_overlong:
                return None
            raise IftError(f"the last exchange's prompt alone reaches max_length {max_length}", where,
                           "raise max_length or shorten the prompt; no token of the final reply would be left")
        ids, labels = ids[:max_length], labels[:max_length]
    return EncodedConversation(ids, labels, dropped, cut)
