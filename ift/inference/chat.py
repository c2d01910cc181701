"""`ift chat`: a conversation with a target, its answers streamed token by token as they are decoded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TextIO

from ift.errors import IftError
from ift.evaluation.decoding import Decoding, _context_limit, decode, stop_ids, text_of
from ift.inference.target import Target


class TextStream:
    """Prints an answer while its tokens arrive: decoded as a whole each time (so multi-byte characters and
    merged spaces come out right), only the new text written; leading whitespace and special tokens dropped."""

    def __init__(self, tokenizer, write: Callable[[str], Any], stop: Sequence[int] = ()):
        self.tokenizer, self.write, self.stop = tokenizer, write, set(stop)
        self.ids: list[int] = []
        self.sent = 0
        self.started = False

    def add(self, token_id: int) -> None:
        if token_id in self.stop:
            return
        self.ids.append(token_id)
        self._emit(final=False)

    def finish(self) -> None:
        """Write what is still held back (an incomplete character at the very end)."""
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # half of a multi-byte character: wait for the rest
            return
        new = text[self.sent:]
        self.sent = len(text)
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

    def messages(self, text: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system and self.target.format.chat_template else []
        if not self.target.format.multi_turn:
            return head + [{"role": "user", "content": text}]
        return head + self.history + [{"role": "user", "content": text}]

    def reset(self) -> None:
        self.history.clear()

    def reply(self, text: str, write: Callable[[str], Any]) -> tuple[str, list[str]]:
        """Answer `text`, streaming through `write`; (answer, notices). Raises IftError for unusable input."""
        fmt, tok = self.target.format, self.target.tokenizer
        prompt = fmt.fill(text)
        notices: list[str] = []
        messages = self.messages(prompt)
        ids = fmt.encode(tok, messages)
        limit = _context_limit(self.target.model)
        # keep the newest turns when the conversation outgrows the context (room for one token at least)
        while limit is not None and len(ids) >= limit and len(self.history) >= 2:
            del self.history[:2]
            notices.append("earlier turns dropped to fit the model's context")
            messages = self.messages(prompt)
            ids = fmt.encode(tok, messages)
        if limit is not None and len(ids) >= limit:
            raise IftError(f"the prompt is {len(ids)} tokens, the model's context is {limit}", "chat",
                           "send a shorter message")
        stream = TextStream(tok, write, stop_ids(self.target.model, tok))
        [gen] = decode(self.target.model, tok, self.target.kind, [ids], self.decoding, batch_size=1,
                       on_token=lambda _i, t: stream.add(t))
        stream.finish()
        answer = text_of(tok, gen.ids)
        if fmt.multi_turn:
            self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        if gen.finish_reason == "length":
            notices.append(f"stopped after {len(gen.ids)} new tokens (--max-new-tokens)")
        return answer, notices


CHAT_HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt; /system alone "
             "clears it),\n          /exit (or Ctrl-D). Ctrl-C stops an answer.")


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

