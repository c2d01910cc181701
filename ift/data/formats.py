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

Besides ``role`` and ``content`` a message keeps what tool use and reasoning need (``MESSAGE_KEYS``):

- assistant ``tool_calls``: a list of ``{"type": "function", "function": {"name", "arguments"}}`` (an ``id``
  kept when given); a flat ``{"name", "arguments"}`` call is accepted too. ``arguments`` is a JSON object,
  given as a dict or as JSON text, and kept as a dict (what chat templates' ``tojson`` expects). An assistant
  turn with calls may have a null content (kept as ``""``).
- tool turns: ``tool_call_id`` and ``name`` when given. A tool result must answer a call: an assistant turn
  with ``tool_calls`` since the last user turn, with calls left unanswered, and an id among the calls' ids.
- assistant ``reasoning_content`` (``reasoning`` is read as a synonym), or the ``<think>...</think>``
  convention at the start of content, which is split off into ``reasoning_content``.
- ShareGPT ``function_call`` turns (value: a JSON call or list of calls) become assistant turns with
  ``tool_calls``; ``observation``/``function``/``tool`` turns become tool turns.

A row's tools (function schemas handed to the chat template) come from its ``tools`` column (a list of
schemas or its JSON text; see ``row_tools``), else from the source's own list.

Errors are IftErrors naming the source and row: empty conversation, no assistant turn, a conversation that
does not end with an assistant reply (nothing to learn from the last turn), a missing column/key, a
non-string content, an unknown ShareGPT role, a malformed tool call (no name, arguments that are not a JSON
object), a tool result with no call to answer, malformed tools.
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
TOOLS_COLUMN = "tools"  # a row's function schemas, handed to the chat template
MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def row_where(source: str, index: int | None) -> str:
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


def _json_value(value: Any, what: str, where: str, fix: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as err:
            raise IftError(f"{what} is not valid JSON ({err.msg} at character {err.pos})", where, fix) from None
    return value


def _tool_call(call: Any, where: str, what: str) -> dict[str, Any]:
    """One call as ``{"type": "function", "function": {"name", "arguments": dict}}`` (+ its id)."""
    if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping):
        fn, call_id = call["function"], call.get("id")
    elif isinstance(call, Mapping) and "name" in call:
        fn, call_id = call, call.get("id")
    else:
        raise IftError(f"{what} is not a tool call", where,
                       'give {"type": "function", "function": {"name": ..., "arguments": {...}}} '
                       'or {"name": ..., "arguments": {...}}')
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise IftError(f"{what} has no function name", where, "give each call its function's name")
    args = fn.get("arguments", fn.get("parameters", {}))
    args = _json_value({} if args is None else args, f"{what} ({name}) arguments", where,
                       "give the arguments as a JSON object (a dict, or its JSON text)")
    if not isinstance(args, Mapping):
        raise IftError(f"{what} ({name}) arguments are a {type(args).__name__}, not a JSON object", where,
                       "give the arguments as a JSON object of parameter names to values")
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": dict(args)}}
    if call_id is not None:
        out["id"] = str(call_id)
    return out


def _tool_calls(value: Any, where: str, what: str) -> list[dict[str, Any]]:
    value = _json_value(value, what, where, "give the tool calls as JSON")
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise IftError(f"{what} is a {type(value).__name__}, not a non-empty list of calls", where,
                       "give a list of tool calls, or drop the key")
    return [_tool_call(c, where, f"{what} call {k}") for k, c in enumerate(value)]


def split_reasoning(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a reply following the ``<think>...</think>`` convention at its start (leading
    whitespace allowed); (None, content) when it does not."""
    body = content.lstrip()
    if not body.startswith(THINK_OPEN) or THINK_CLOSE not in body:
        return None, content
    reasoning, answer = body[len(THINK_OPEN):].split(THINK_CLOSE, 1)
    return reasoning.strip("\n"), answer.lstrip("\n")


def _messages(value: Any, where: str, what: str, role_key: str = "role", content_key: str = "content",
              roles: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)):
        raise IftError(f"{what} is a {type(value).__name__}, not a list of messages", where,
                       "give a list of {" + f"{role_key}, {content_key}" + "} dicts")
    out: list[dict[str, Any]] = []
    for j, msg in enumerate(value):
        if isinstance(msg, str) and msg.startswith("{"):  # datasets' Json feature: a message of mixed keys as text
            try:
                msg = json.loads(msg)
            except ValueError:
                pass
        has_calls = isinstance(msg, Mapping) and msg.get("tool_calls") is not None
        if not isinstance(msg, Mapping) or role_key not in msg or (content_key not in msg and not has_calls):
            other = ("from", "value") if role_key == "role" else ("role", "content")
            hint = (f"this looks like the {'sharegpt' if role_key == 'role' else 'messages'} format; set it explicitly"
                    if isinstance(msg, Mapping) and set(other) <= set(msg) else
                    f"each message needs {role_key!r} and {content_key!r} keys")
            raise IftError(f"{what}: message {j} has no {role_key!r}/{content_key!r}", where, hint)
        role, content = msg[role_key], msg.get(content_key)
        if not isinstance(role, str) or not role:
            raise IftError(f"{what}: message {j} has role {role!r}, not a non-empty string", where,
                           "use system, user, assistant or tool")
        calls = None
        if roles is not None:
            if role.lower() == "function_call":  # ShareGPT (LLaMA-Factory): the assistant's call, as JSON
                role, calls, content = "assistant", _tool_calls(content, where, f"{what}: message {j} (function_call)"), ""
            elif role.lower() not in roles:
                raise IftError(f"{what}: message {j} has unknown ShareGPT role {role!r}", where,
                               "known roles: " + ", ".join(sorted([*roles, "function_call"])))
            else:
                role = roles[role.lower()]
        if has_calls:
            if role != "assistant":
                raise IftError(f"{what}: message {j} ({role}) has tool_calls", where,
                               "only assistant turns call tools; move the calls to an assistant turn")
            calls = _tool_calls(msg["tool_calls"], where, f"{what}: message {j} tool_calls")
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise IftError(f"{what}: message {j} ({role}) content is a {type(content).__name__}, not a string",
                           where, "give each message's content as text" +
                           ("" if role != "assistant" else " (null only next to tool_calls)"))
        m: dict[str, Any] = {"role": role, "content": content}
        if calls:
            m["tool_calls"] = calls
        if role == "assistant":
            reasoning = msg.get("reasoning_content", msg.get("reasoning"))
            if reasoning is not None and not isinstance(reasoning, str):
                raise IftError(f"{what}: message {j} reasoning_content is a {type(reasoning).__name__}, "
                               "not a string", where, "give the reasoning as text")
            if reasoning is None:
                reasoning, m["content"] = split_reasoning(content)
            if reasoning is not None:
                m["reasoning_content"] = reasoning
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if msg.get(key) is not None:
                    if not isinstance(msg[key], str):
                        raise IftError(f"{what}: message {j} {key} is a {type(msg[key]).__name__}, not a string",
                                       where, f"give {key} as text")
                    m[key] = msg[key]
        out.append(m)
    return out


def check_tool_turns(messages: Sequence[Mapping[str, Any]], where: str) -> None:
    """Raise an IftError when a tool result answers no call: every tool turn must follow an assistant turn with
    ``tool_calls`` (since the last user turn), with a call left to answer, and name one of its ids if it
    gives an id."""
    open_ids: list[str | None] = []
    called = False
    for j, m in enumerate(messages):
        if m["role"] == "user":
            open_ids, called = [], False
        elif m["role"] == "assistant":
            calls = m.get("tool_calls") or []
            open_ids, called = [c.get("id") for c in calls], bool(calls)
        elif m["role"] == "tool":
            if not called:
                raise IftError(f"message {j} is a tool result with no tool call before it", where,
                               "give the assistant turn before it its tool_calls, or drop the tool turn")
            if not open_ids:
                raise IftError(f"message {j} is one tool result more than the calls before it", where,
                               "give one tool turn per call")
            want = m.get("tool_call_id")
            if want is not None and any(i is not None for i in open_ids):
                if want not in open_ids:
                    raise IftError(f"message {j} answers tool_call_id {want!r}, which no open call has", where,
                                   "open calls: " + ", ".join(repr(i) for i in open_ids if i is not None))
                open_ids.remove(want)
            else:
                open_ids.pop(0)


def row_tools(value: Any, where: str, what: str = "column 'tools'") -> list[dict[str, Any]] | None:
    """A row's tools as a list of function schemas (None when absent or empty). Accepts a list of
    ``{"type": "function", "function": {...}}`` or bare ``{"name", "parameters"}`` schemas, or its JSON text."""
    if value is None or value == "" or value == []:
        return None
    value = _json_value(value, what, where, "give the tools as a JSON list of function schemas")
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise IftError(f"{what} is a {type(value).__name__}, not a list of function schemas", where,
                       'give a list of {"type": "function", "function": {"name": ..., "parameters": {...}}}')
    out = []
    for k, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping) \
            else tool
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise IftError(f"{what}: tool {k} has no function name", where,
                           "give each tool a name (and its parameters as a JSON schema)")
        out.append({"type": "function", "function": dict(fn)})
    return out or None


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
    where = row_where(source, index)
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
    check_tool_turns(messages, where)
    return messages


def conversation_tools(row: Mapping[str, Any], *, source: str = "data", index: int | None = None,
                       column: str = TOOLS_COLUMN, default: Any = None) -> list[dict[str, Any]] | None:
    """The tools (function schemas) a row's conversation is rendered with: its own `column` when the row has a
    non-empty one, else `default` (a source-level list); None when neither gives any."""
    where = row_where(source, index)
    own = row_tools(row.get(column), where, f"column {column!r}") if column in row else None
    return own if own is not None else row_tools(default, where, "the source's tools")


def conversation_hash(messages: Sequence[Mapping[str, Any]]) -> int:
    """A stable 64-bit hash of the whole conversation (roles and contents, in order; tool calls, ids and
    reasoning too where a message has them, so a plain conversation hashes as it always did).

    sha1 over canonical JSON (sorted keys, no whitespace, unicode kept): the same in every process
    and Python version, unlike ``hash()``. For leak checks and deterministic splits.
    """
    canon = [{k: m[k] for k in MESSAGE_KEYS if m.get(k) is not None} for m in messages]
    text = json.dumps(canon, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


