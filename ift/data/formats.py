"""Conversational formats: a row of any supported format becomes one message list.

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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ift.errors import IftError

FORMATS = ("messages", "sharegpt", "prompt_completion", "alpaca")
Format = Literal["messages", "sharegpt", "prompt_completion", "alpaca"]

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


