"""Conversations encoded with loss on assistant turns only (formats: ift/data/formats.py; templates:
ift/data/chat_templates.py).

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
- every rendering used must be a string prefix of the row's rendering ("prefix-stable"). A template that
  renders earlier turns differently once later ones follow (Qwen3 drops the reasoning of turns before the
  last user query and writes an empty thinking block on the last turn only; DeepSeek-R1 distills strip
  reasoning from every turn and open ``<think>`` in the generation prompt) trains such turns in rows of
  their own, each in the context the template gives the turn at inference (``conversation_rows``); the
  one-row API (``encode_conversation``) refuses them;
- tool calls are part of the assistant turn the template renders (loss on them and the end-of-turn token);
  tool results, system, user turns and the tools block the template writes never carry loss; reasoning
  carries loss unless train_on_reasoning is False (then loss starts after its closing ``</think>``);
- a token carries loss if it overlaps an assistant span by at least one character (the rule
  transformers uses for ``return_assistant_tokens_mask``), so a token straddling a boundary is
  trained on;
- system, user and tool tokens never carry loss.

``history_ids`` encodes a held-out conversation's history for answering its last user turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

from ift.errors import IftError
from ift.data.chat_templates import EOT_CANDIDATES
from ift.data.encoding import IGNORE
from ift.data.formats import MESSAGE_KEYS, THINK_CLOSE, THINK_OPEN, row_where, check_conversation

TrainOn = Literal["all_assistant", "last_assistant"]

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


def _template_text(tokenizer: Any, template: str | None) -> str:
    text = template if template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(text, dict):
        text = text.get("default")
    return text or ""


def template_messages(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, chat_template: str | None = None,
                      tools: Sequence[Mapping[str, Any]] | None = None,
                      where: str = "conversation") -> list[dict[str, Any]]:
    """The messages as the chat template is given them: the keys of MESSAGE_KEYS a message has; reasoning kept
    as ``reasoning_content`` when the template reads that key, else written into the content as
    ``<think>\\n...\\n</think>\\n\\n`` (the convention such templates strip or keep themselves). A template that
    would silently drop a row's tool calls or tools is an IftError."""
    text = _template_text(tokenizer, chat_template)
    reads_reasoning = "reasoning_content" in text
    out = []
    for j, m in enumerate(messages):
        m = {k: m[k] for k in MESSAGE_KEYS if m.get(k) is not None}
        if m.get("tool_calls") and "tool_calls" not in text:
            raise IftError(f"message {j} has tool calls, but the chat template does not render tool_calls", where,
                           "use a template that does (e.g. the tokenizer's own Qwen2.5, Qwen3 or Llama-3.1 one, "
                           "or a .jinja file)")
        reasoning = m.pop("reasoning_content", None)
        if reasoning is not None:
            if reads_reasoning:
                m["reasoning_content"] = reasoning
            else:
                m["content"] = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{m['content']}"
        out.append(m)
    if tools and "tools" not in text:
        raise IftError("the row has tools, but the chat template does not render tools", where,
                       "use a template that does (e.g. the tokenizer's own Qwen2.5, Qwen3 or Llama-3.1 one)")
    return out


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], template: str | None, gen: bool,
            where: str, tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise IftError("the tokenizer has no chat template", where,
                       "pass chat_template (e.g. resolve_chat_template(tokenizer, 'chatml'))")
    try:
        return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=gen, tools=list(tools) if tools else None)
    except IftError:
        raise
    except Exception as err:  # the template's raise_exception, Jinja errors, no template at all
        raise IftError(f"chat template failed: {err.__class__.__name__}: {' '.join(str(err).split())}", where,
                       "check the conversation's roles and order against the template, or choose another template"
                       ) from None


class Row(NamedTuple):
    """One training row of a conversation: its text, the character spans [start, end) that carry loss, how many
    of the conversation's messages it renders, and the assistant turns (message indices) it trains."""

    text: str
    spans: list[tuple[int, int]]
    messages: int
    turns: list[int]


class _Renderings:
    """The renderings one conversation's rows need, each made once: per assistant turn i, the prompt the model
    answers it from (``head``: messages[:i] with the generation prompt) and the conversation up to it (``turn``)."""

    def __init__(self, tokenizer: Any, messages: Sequence[Mapping[str, Any]], template: str | None, tools: Any,
                 where: str):
        self.tokenizer, self.template, self.tools, self.where = tokenizer, template, tools, where
        self.messages = template_messages(tokenizer, messages, chat_template=template, tools=tools, where=where)
        self.reasoning = [(m.get("reasoning_content") or "").strip("\n") for m in messages]
        self._cache: dict[tuple[int, bool], str] = {}

    def render(self, n: int, gen: bool) -> str:
        if (n, gen) not in self._cache:
            self._cache[n, gen] = _render(self.tokenizer, self.messages[:n], self.template, gen, self.where,
                                          self.tools)
        return self._cache[n, gen]

    def row_text(self, last: int) -> str:
        """The text of the row ending with assistant turn `last`: messages[:last + 1] as rendered, except where
        the generation prompt opens a reasoning block the rendered turn does not hold (DeepSeek-R1 distills
        prefill ``<think>\\n`` and strip reasoning from every rendered turn): then the prompt followed by what
        the model writes after it (the reasoning, ``</think>``, the reply as the template renders it)."""
        head, turn = self.render(last, True), self.render(last + 1, False)
        if turn.startswith(head):
            return turn
        common = len(_common_prefix(head, turn))
        if head[common:].strip() != THINK_OPEN:
            raise IftError(f"the chat template is not prefix-stable: the generation prompt before assistant turn "
                           f"{last} is not a prefix of that turn's rendering", self.where,
                           "its masks cannot be computed from spans; use a template whose generation prompt starts "
                           "the assistant turn it renders (e.g. chatml or llama3)")
        reasoning = self.reasoning[last]
        return head + (reasoning + "\n" if reasoning else "") + THINK_CLOSE + "\n\n" + turn[common:].lstrip("\n")

    def stable_in(self, i: int, text: str, last: int) -> bool:
        """Assistant turn i is rendered in `text` as the model is given and writes it at inference time."""
        head = self.render(i, True)
        turn = text if i == last else self.render(i + 1, False)
        return text.startswith(head) and text.startswith(turn) and len(turn) >= len(head)


def _common_prefix(a: str, b: str) -> str:
    import os.path

    return os.path.commonprefix([a, b])


def _assistant_turns(messages: Sequence[Mapping[str, Any]], train_on: TrainOn, where: str) -> list[int]:
    if train_on not in ("all_assistant", "last_assistant"):
        raise IftError(f"unknown train_on {train_on!r}", where, "use all_assistant or last_assistant")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    if turns and turns[0] == 0:
        raise IftError("conversation starts with an assistant turn", where,
                       "there is no prompt to condition it on; add a user turn or a system prompt")
    return turns


def _spans(r: _Renderings, text: str, last: int, trained: Sequence[int], candidates: Sequence[str],
           train_on_reasoning: bool) -> list[tuple[int, int]]:
    spans = []
    for i in trained:
        head = r.render(i, True)
        start, end = len(head), len(text) if i == last else len(r.render(i + 1, False))
        part = text[start:end]
        # the first candidate present wins (the given one, else the eos token, then known ones);
        # its last occurrence ends the span, so an end-of-turn string inside the reply is kept
        found = next((t for t in candidates if t in part), None)
        cut = part.rfind(found) + len(found) if found else len(part.rstrip())
        reasoning = r.reasoning[i].strip()
        if not train_on_reasoning and reasoning:
            # loss starts after the reasoning block (its closing tag and the whitespace after it) when rendered
            at = part.find(reasoning)
            if at >= 0:
                skip = at + len(reasoning)
                close = part.find(THINK_CLOSE, skip)
                if close >= 0 and not part[skip:close].strip():
                    skip = close + len(THINK_CLOSE)
                skip += len(part[skip:]) - len(part[skip:].lstrip())
                start, cut = start + skip, cut - skip
        if cut > 0:
            spans.append((start, start + cut))
    return spans


def conversation_rows(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    chat_template: str | None = None,
    end_of_turn: str | None = None,
    train_on: TrainOn = "all_assistant",
    train_on_reasoning: bool = True,
    where: str = "conversation",
) -> list[Row]:
    """The rows a conversation trains as (``Row``: text, loss spans [start, end), messages rendered, turns).

    One row (the whole conversation) when every trained assistant turn is rendered in it as the model sees and
    writes it at inference time (prefix-stable templates). A template that renders earlier turns differently
    once later ones follow (Qwen3 drops the reasoning of turns before the last user query; a DeepSeek-R1 distill
    strips it from every turn) gives more rows: the row ending with the last trained turn holds every turn that
    is stable in it; each turn left gets a row ending with it, in the context the template gives it at inference
    (rendered once per row, so those turns train in their inference context, not TRL's always-reasoning one).
    Tools are handed to the template (its tools block never carries loss); train_on_reasoning: whether an
    assistant's reasoning carries loss (its reply, tool calls and end-of-turn token always do).
    """
    turns = _assistant_turns(messages, train_on, where)
    r = _Renderings(tokenizer, messages, chat_template, tools, where)
    candidates = (end_of_turn,) if end_of_turn else tuple(
        t for t in (getattr(tokenizer, "eos_token", None), *EOT_CANDIDATES) if t)
    rows = []
    left = list(turns)
    while left:
        last = left[-1]
        text = r.row_text(last)
        group = [i for i in left[:-1] if r.stable_in(i, text, last)] + [last]
        left = [i for i in left if i not in group]
        rows.append(Row(text, _spans(r, text, last, group, candidates, train_on_reasoning), last + 1, group))
    return rows[::-1]


def assistant_spans(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    chat_template: str | None = None,
    end_of_turn: str | None = None,
    train_on: TrainOn = "all_assistant",
    train_on_reasoning: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    where: str = "conversation",
) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering and the character spans [start, end) that carry loss (see module doc), for a
    conversation that trains as one row; one that needs a row per turn (``conversation_rows``) is an IftError."""
    rows = conversation_rows(tokenizer, messages, tools=tools, chat_template=chat_template, end_of_turn=end_of_turn,
                             train_on=train_on, train_on_reasoning=train_on_reasoning, where=where)
    if len(rows) > 1 or (rows and rows[0].messages != len(messages)):
        raise IftError("the chat template is not prefix-stable: earlier turns render differently once later ones "
                       "follow", where, "its assistant turns train as one row each (encode_conversation_rows, as "
                       "the data pipeline does), or use a template that renders earlier turns the same whatever "
                       "follows (e.g. chatml or llama3)")
    if not rows:
        return _render(tokenizer, template_messages(tokenizer, messages, chat_template=chat_template, tools=tools,
                                                    where=where), chat_template, False, where, tools), []
    return rows[0].text, rows[0].spans


def history_ids(tokenizer: Any, history: Sequence[Mapping[str, Any]],
                tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    """The ids a model is given to answer the last turn of `history`: the conversation rendered with the
    generation prompt and tokenized as training tokenized whole conversations (no special tokens added: the
    template writes its own). Tool calls, tool ids and reasoning in the history, and `tools`, reach the template
    as in training (``template_messages``)."""
    messages = template_messages(tokenizer, _kept(history), tools=tools, where="history")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         tools=list(tools) if tools else None)
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


def _kept(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: m[k] for k in MESSAGE_KEYS if m.get(k) is not None or k == "content"} for m in messages]


def encode_conversations(
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    *,
    train_on: TrainOn = "all_assistant",
    max_length: int | None = None,
    end_of_turn: str | None = None,
    sources: Sequence[str] | None = None,
    drop_overlong: bool = False,
    tools: Sequence[Sequence[Mapping[str, Any]] | None] | None = None,
    train_on_reasoning: bool = True,
    rows: bool = False,
) -> list[Any]:
    """`encode_conversation` over many conversations (the tokenizer's own template), equal to it row by row
    (tests compare): the renderings and spans per conversation, then one batched tokenizer call for all of them
    (the fast tokenizer's parallel batch); only rows over max_length are encoded again alone. tools: per
    conversation, its function schemas (or None). rows: per conversation the list of its rows
    (`encode_conversation_rows`, a row per turn where the template needs it) instead of one row each."""
    where_of = (lambda k: sources[k] if sources else "conversation")
    tools_of = (lambda k: tools[k] if tools else None)
    one = encode_conversation_rows if rows else encode_conversation
    if not getattr(tokenizer, "is_fast", False) or not conversations:
        return [one(tokenizer, m, train_on=train_on, max_length=max_length, end_of_turn=end_of_turn,
                    source=where_of(k), drop_overlong=drop_overlong, tools=tools_of(k),
                    train_on_reasoning=train_on_reasoning) for k, m in enumerate(conversations)]
    plans = []
    for k, messages in enumerate(conversations):
        messages = _kept(messages)
        check_conversation(messages, where_of(k))
        if rows:
            plans.append(conversation_rows(tokenizer, messages, tools=tools_of(k), end_of_turn=end_of_turn,
                                           train_on=train_on, train_on_reasoning=train_on_reasoning,
                                           where=where_of(k)))
        else:
            full, spans = assistant_spans(tokenizer, messages, tools=tools_of(k), end_of_turn=end_of_turn,
                                          train_on=train_on, train_on_reasoning=train_on_reasoning, where=where_of(k))
            plans.append([Row(full, spans, len(messages), [])])
    texts = [row.text for plan in plans for row in plan]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else \
        {"input_ids": [], "offset_mapping": []}
    out: list[Any] = []
    at = 0
    for k, plan in enumerate(plans):
        got: list[EncodedConversation | None] = []
        for text, spans, n, turns in plan:
            ids, offsets = enc["input_ids"][at], enc["offset_mapping"][at]
            at += 1
            if max_length is not None and len(ids) > max_length:  # truncation: the one-at-a-time path
                trained = list(turns) if rows else None
                got.append(_encode_truncated(tokenizer, _kept(conversations[k])[:n], trained, None, end_of_turn,
                                             train_on, train_on_reasoning, tools_of(k), max_length, drop_overlong,
                                             where_of(k)))
                continue
            mask = _overlaps(offsets, spans)
            ids = list(ids)
            got.append(EncodedConversation(ids, [t if m else IGNORE for t, m in zip(ids, mask)]))
        out.append(got if rows else got[0])
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


def _encode_row(tokenizer: Any, messages: Sequence[Mapping[str, Any]], trained: Sequence[int] | None,
                chat_template: str | None, end_of_turn: str | None, train_on: TrainOn, train_on_reasoning: bool,
                tools: Any, where: str) -> tuple[list[int], list[int]]:
    """Ids and labels of one row: messages ending with an assistant turn, loss on the `trained` turns (None: every
    turn train_on names, which must all be stable in the row)."""
    if trained is None:
        full, spans = assistant_spans(tokenizer, messages, chat_template=chat_template, end_of_turn=end_of_turn,
                                      train_on=train_on, train_on_reasoning=train_on_reasoning, tools=tools,
                                      where=where)
    else:
        r = _Renderings(tokenizer, messages, chat_template, tools, where)
        last = len(messages) - 1
        full = r.row_text(last)
        for i in trained:
            if not r.stable_in(i, full, last):
                raise IftError(f"the chat template is not prefix-stable: assistant turn {i} renders differently in "
                               "the shortened conversation", where, "raise max_length, or use truncation: drop")
        candidates = (end_of_turn,) if end_of_turn else tuple(
            t for t in (getattr(tokenizer, "eos_token", None), *EOT_CANDIDATES) if t)
        spans = _spans(r, full, last, trained, candidates, train_on_reasoning)
    ids, mask = _token_mask(tokenizer, full, spans)
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]


def _encode_truncated(tokenizer: Any, messages: list[dict[str, Any]], trained: list[int] | None,
                      chat_template: str | None, end_of_turn: str | None, train_on: TrainOn,
                      train_on_reasoning: bool, tools: Any, max_length: int | None, drop_overlong: bool,
                      where: str, encoded: tuple[list[int], list[int]] | None = None) -> EncodedConversation | None:
    """One row, fitted to max_length (see `encode_conversation`)."""
    ids, labels = encoded or _encode_row(tokenizer, messages, trained, chat_template, end_of_turn, train_on,
                                         train_on_reasoning, tools, where)
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
        if trained is not None:
            trained = [i - nxt for i in trained if i - nxt >= keep]
        ids, labels = _encode_row(tokenizer, head + body, trained, chat_template, end_of_turn, train_on,
                                  train_on_reasoning, tools, where)
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


def encode_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    chat_template: str | None = None,
    train_on: TrainOn = "all_assistant",
    max_length: int | None = None,
    end_of_turn: str | None = None,
    source: str = "conversation",
    index: int | None = None,
    drop_overlong: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    train_on_reasoning: bool = True,
) -> EncodedConversation | None:
    """Token ids and labels of a conversation: labels are IGNORE (-100) except on assistant replies.

    Each labelled reply carries loss on its content, its tool calls and the template's end-of-turn token (see
    the module docstring for the span rules; end_of_turn overrides the end-of-turn string), and on its reasoning
    unless train_on_reasoning is False. train_on: "all_assistant" (every reply) or "last_assistant" (only the
    final one). chat_template: the Jinja text to use (e.g. from ``resolve_chat_template``), else the tokenizer's
    own. tools: the function schemas the template is given. A conversation the template cannot train as one row
    (``conversation_rows``) is an IftError; ``encode_conversation_rows`` gives its rows.

    max_length (tokens): when the conversation is longer, whole earliest exchanges are dropped (an
    exchange starts at a user turn; a leading system message is kept) until it fits or only the last
    exchange is left; if that is still too long, the tokens past max_length are cut, which can only
    cut the final assistant reply's tail (its end-of-turn token included). If the final prompt alone
    is too long, nothing would be learned: an IftError (None with drop_overlong, for a dataset that counts the
    rows it drops). The result records ``dropped_messages`` and
    ``cut_tokens`` so callers can count and report truncated rows.
    """
    where = row_where(source, index)
    messages = _kept(messages)
    check_conversation(messages, where)
    return _encode_truncated(tokenizer, messages, None, chat_template, end_of_turn, train_on, train_on_reasoning,
                             tools, max_length, drop_overlong, where)


def encode_conversation_rows(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    chat_template: str | None = None,
    train_on: TrainOn = "all_assistant",
    max_length: int | None = None,
    end_of_turn: str | None = None,
    source: str = "conversation",
    index: int | None = None,
    drop_overlong: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    train_on_reasoning: bool = True,
) -> list[EncodedConversation | None]:
    """The training rows of a conversation (``conversation_rows``), each encoded and fitted to max_length as
    `encode_conversation` does (None for a row dropped with drop_overlong). One row, equal to
    `encode_conversation`'s, when the template is prefix-stable for it."""
    where = row_where(source, index)
    messages = _kept(messages)
    check_conversation(messages, where)
    plan = conversation_rows(tokenizer, messages, tools=tools, chat_template=chat_template, end_of_turn=end_of_turn,
                             train_on=train_on, train_on_reasoning=train_on_reasoning, where=where)
    out = []
    for text, spans, n, turns in plan:
        ids, mask = _token_mask(tokenizer, text, spans)
        out.append(_encode_truncated(tokenizer, messages[:n], list(turns), chat_template, end_of_turn, train_on,
                                     train_on_reasoning, tools, max_length, drop_overlong, where,
                                     (ids, [t if m else IGNORE for t, m in zip(ids, mask)])))
    return out
