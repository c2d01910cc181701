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
- every rendering used must be a string prefix of the whole rendering ("prefix-stable"); a template
  that changes earlier text depending on later turns raises an IftError instead of mis-masking;
- a token carries loss if it overlaps an assistant span by at least one character (the rule
  transformers uses for ``return_assistant_tokens_mask``), so a token straddling a boundary is
  trained on;
- system, user and tool tokens never carry loss.

``history_ids`` encodes a held-out conversation's history for answering its last user turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ift.errors import IftError
from ift.data.chat_templates import _EOT_CANDIDATES
from ift.data.encoding import IGNORE
from ift.data.formats import _where, check_conversation

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
