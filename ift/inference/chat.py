"""`ift chat`: a conversation with a target, its answers streamed token by token as they are decoded."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TextIO

from ift.errors import IftError
from ift.evaluation.decoding import Decoding, context_limit, decode, stop_ids, text_of
from ift.data.formats import THINK_CLOSE, THINK_OPEN
from ift.inference.target import Target
from ift.evaluation.tool_calls import parse_reply


# how the stream shows reasoning apart from the answer: the think tags are written as these labels
THINKING_LABEL, ANSWER_LABEL = "(thinking) ", "\n(answer) "


def shown(text: str) -> str:
    """A reply as the chat shows it: ``<think>`` as THINKING_LABEL, ``</think>`` as ANSWER_LABEL (a reply that
    starts inside the block, the generation prompt having opened it, gets THINKING_LABEL in front)."""
    body = text.lstrip()
    if THINK_CLOSE in body and not body.startswith(THINK_OPEN):
        body = THINK_OPEN + body
    if body.startswith(THINK_OPEN):
        body = THINKING_LABEL + body[len(THINK_OPEN):].lstrip()
        head, sep, tail = body.partition(THINK_CLOSE)
        body = head + (ANSWER_LABEL + tail.lstrip() if sep else "")
    return body


class TextStream:
    """Prints an answer while its tokens arrive: decoded as a whole each time (so multi-byte characters and
    merged spaces come out right), only the new text written; leading whitespace and special tokens dropped;
    reasoning shown apart from the answer (``shown``). Text that may be the start of a think tag waits for the
    next token."""

    def __init__(self, tokenizer, write: Callable[[str], Any], stop: Sequence[int] = ()):
        self.tokenizer, self.write, self.stop = tokenizer, write, set(stop)
        self.ids: list[int] = []
        self.written = ""  # the shown text so far
        self.started = False
        self.thinking = False  # the generation prompt opened a think block: the reply starts inside it

    def add(self, token_id: int) -> None:
        if token_id in self.stop:
            return
        self.ids.append(token_id)
        self._emit(final=False)

    def finish(self) -> None:
        """Write what is still held back (an incomplete character at the very end)."""
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        raw = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and (raw.endswith("\ufffd") or any(raw.endswith(tag[:k]) for tag in (THINK_OPEN, THINK_CLOSE)
                                                        for k in range(1, len(tag)))):
            return  # half of a multi-byte character, or perhaps the start of a tag: wait for the rest
        text = shown((THINK_OPEN if self.thinking else "") + raw)
        if not text.startswith(self.written):  # never rewrite what is on screen
            return
        new = text[len(self.written):]
        self.written = text
        if not self.started:
            new = new.lstrip()
            self.started = bool(new)
        if new:
            self.write(new)


# ---------------------------------------------------------------------------------------------------- chat


@dataclass
class ChatSession:
    """A conversation with a target: the history (chat-template runs) and the system prompt."""

    target: Target
    decoding: Decoding = Decoding()
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def messages(self, text: str, role: str = "user") -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system and self.target.format.chat_template else []
        if not self.target.format.multi_turn:
            return head + [{"role": role, "content": text}]
        return head + self.history + [{"role": role, "content": text}]

    def reset(self) -> None:
        self.history.clear()

    def reply(self, text: str, write: Callable[[str], Any], role: str = "user") -> tuple[str, list[str]]:
        """Answer `text` (a user turn, or with role "tool" a tool's result), streaming through `write`; (answer,
        notices). Raises IftError for unusable input."""
        fmt, tok = self.target.format, self.target.tokenizer
        prompt = fmt.fill(text) if role == "user" else text
        notices: list[str] = []
        messages = self.messages(prompt, role)
        ids = fmt.encode(tok, messages)
        limit = context_limit(self.target.model)
        # keep the newest turns when the conversation outgrows the context (room for one token at least)
        while limit is not None and len(ids) >= limit and len(self.history) >= 2:
            del self.history[:2]
            notices.append("earlier turns dropped to fit the model's context")
            messages = self.messages(prompt, role)
            ids = fmt.encode(tok, messages)
        if limit is not None and len(ids) >= limit:
            raise IftError(f"the prompt is {len(ids)} tokens, the model's context is {limit}", "chat",
                           "send a shorter message")
        stream = TextStream(tok, write, stop_ids(self.target.model, tok))
        stream.thinking = fmt.messages_text(tok, messages).rstrip().endswith(THINK_OPEN) if fmt.chat_template \
            else False
        [gen] = decode(self.target.model, tok, self.target.kind, [ids], self.decoding, batch_size=1,
                       on_token=lambda _i, t: stream.add(t))
        stream.finish()
        answer = text_of(tok, gen.ids)
        reply = parse_reply(answer, bare_json=bool(fmt.tools))
        for call in reply.tool_calls:
            notices.append("tool call: " + (f"{call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})"
                                            if call["name"] else f"unreadable: {call['text']}")
                           + " (answer with /tool RESULT)")
        if fmt.multi_turn:
            self.history += [{"role": role, "content": prompt}, reply.as_message()]
        if gen.finish_reason == "length":
            notices.append(f"stopped after {len(gen.ids)} new tokens (--max-new-tokens)")
        return answer, notices


CHAT_HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt; /system alone "
             "clears it),\n          /tool RESULT (a tool's result for the model's call), /exit (or Ctrl-D). "
             "Ctrl-C stops an answer.")


def chat_loop(session: ChatSession, read: Callable[[], str | None], out: TextIO, *, prompt_label: str = "") -> int:
    """The interactive loop: read a line (None = end of input), answer it streaming to `out`, handle commands."""

    def say(text: str) -> None:
        out.write(text)
        out.flush()

    fmt, d = session.target.format, session.decoding
    how = "greedy" if d.greedy else f"sampling, temperature {d.temperature:g}, top-p {d.top_p:g}"
    say(f"chatting with the {session.target.label}\nprompt format: {fmt.describe()}\n"
        f"decoding: {how}, at most {d.max_new_tokens} new tokens\n{CHAT_HELP}\n")
    if not fmt.multi_turn:
        say("each message is a new prompt: this run trained single prompts, without a chat template\n")
    while True:
        if prompt_label:
            say(prompt_label)
        line = read()
        if line is None:
            say("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                session.reset()
                say("(conversation reset)\n")
            elif command == "/system":
                if not fmt.chat_template:
                    say("(this prompt format has no system prompt: the run trained without a chat template)\n")
                    continue
                session.system = rest.strip() or None
                session.reset()
                say(f"(system prompt {'set' if session.system else 'cleared'}; conversation reset)\n")
            elif command == "/tool":
                if not fmt.tools:
                    say("(no tools: start the chat with --tools FILE)\n")
                    continue
                try:
                    _, notices = session.reply(rest.strip(), say, role="tool")
                except IftError as err:
                    say(f"error: {err.line()}\n")
                    continue
                say("\n")
                for notice in notices:
                    say(f"({notice})\n")
            elif command == "/help":
                say(CHAT_HELP + "\n")
            else:
                say(f"(unknown command {command}; {CHAT_HELP})\n")
            continue
        try:
            _, notices = session.reply(text, say)
        except IftError as err:
            say(f"error: {err.line()}\n")
            continue
        except KeyboardInterrupt:
            say("\n(stopped)\n")
            continue
        say("\n")
        for notice in notices:
            say(f"({notice})\n")

