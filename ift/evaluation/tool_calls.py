"""Tool calls in generated replies: a reply read back into its reasoning, answer and calls, and calls scored
against reference calls. Evaluation scores held-out tool-calling conversations with these; `ift chat` and
`ift generate` read replies with the same `parse_reply`.

- ``parse_reply``: reasoning first (a leading ``<think>...</think>``, or text before a lone ``</think>`` when
  the generation prompt opened the block, as DeepSeek-R1 distills do), then calls: Qwen/Hermes
  ``<tool_call>{"name", "arguments"}</tool_call>`` blocks, or a reply that is one Llama-3.1 style JSON call
  ``{"name", "parameters"}`` (after an optional ``<|python_tag|>``). A call whose JSON does not parse is kept
  with ``name`` None, so it scores as wrong rather than vanishing.
- ``calls_match`` (call exact match: the same calls, names and arguments compared as JSON values, in any order)
  and ``argument_f1`` (F1 over (function, argument, value) triples).
- ``plain_call``: a call as ``{name, arguments}`` whatever its form (OpenAI's nesting, JSON text arguments).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from ift.data.formats import THINK_CLOSE, THINK_OPEN

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_PYTHON_TAG = "<|python_tag|>"


@dataclass
class Reply:
    """A generated reply read back: its reasoning (None without), its answer text, its tool calls."""

    content: str
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def as_message(self) -> dict[str, Any]:
        """The reply as an assistant message (what a chat history keeps for the template to render)."""
        m: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            m["reasoning_content"] = self.reasoning
        if self.tool_calls:
            m["tool_calls"] = [{"type": "function", "function": c} for c in self.tool_calls if c.get("name")]
        return m


def _call(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {"name": None, "arguments": None, "text": text}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return {"name": None, "arguments": None, "text": text}
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return {"name": value["name"], "arguments": args}


def parse_reply(text: str, *, bare_json: bool = True) -> Reply:
    """The reasoning, answer and tool calls of a generated reply (see the module docstring). bare_json: read a
    reply that is one JSON call as a call (Llama-3.1's form; off where no tools were given)."""
    reasoning = None
    body = text.strip()
    if body.startswith(THINK_OPEN) and THINK_CLOSE in body:
        reasoning, body = body[len(THINK_OPEN):].split(THINK_CLOSE, 1)
    elif THINK_CLOSE in body and THINK_OPEN not in body:  # the generation prompt opened the block
        reasoning, body = body.split(THINK_CLOSE, 1)
    if reasoning is not None:
        reasoning, body = reasoning.strip(), body.strip()
    calls = [_call(m.group(1)) for m in _TOOL_CALL.finditer(body)]
    if calls:
        body = _TOOL_CALL.sub("", body).strip()
    elif bare_json:
        bare = body.removeprefix(_PYTHON_TAG).strip()
        if bare.startswith("{") and bare.endswith("}"):
            call = _call(bare)
            if call["name"] is not None and ("parameters" in bare or "arguments" in bare):
                calls, body = [call], ""
    return Reply(body, reasoning, calls)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def plain_call(call: dict[str, Any]) -> dict[str, Any]:
    """A call as {name, arguments} whatever its form (OpenAI's nesting, JSON text arguments)."""
    fn = call.get("function", call) if isinstance(call, dict) else {}
    args = fn.get("arguments", fn.get("parameters"))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return {"name": fn.get("name"), "arguments": args}


def calls_match(predicted: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]]) -> bool:
    """Call exact match: the same multiset of calls, each name and arguments equal as JSON values."""
    def key(calls: Sequence[dict[str, Any]]) -> Counter:
        return Counter(_canonical(plain_call(c)) for c in calls)

    return key(predicted) == key(reference)


def argument_f1(predicted: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]]) -> float:
    """F1 over (function name, argument name, JSON value) triples of the calls; 1.0 when neither calls."""
    def triples(calls: Sequence[dict[str, Any]]) -> Counter:
        out: Counter = Counter()
        for c in map(plain_call, calls):
            args = c["arguments"]
            if isinstance(args, dict) and args:
                out.update((c["name"], k, _canonical(v)) for k, v in args.items())
            else:  # a call without arguments (or unreadable ones) still counts once, by its name
                out[(c["name"], None, _canonical(args))] += 1
        return out

    p, r = triples(predicted), triples(reference)
    if not p and not r:
        return 1.0
    hit = sum((p & r).values())
    if not hit:
        return 0.0
    precision, recall = hit / sum(p.values()), hit / sum(r.values())
    return 2 * precision * recall / (precision + recall)
