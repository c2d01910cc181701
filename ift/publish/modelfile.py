"""The Ollama Modelfile `ift export` writes next to the GGUF file: FROM the file, a TEMPLATE that reproduces the
run's prompt format in Ollama's Go template language (derived by rendering the chat template with markers and
checked against it on four conversations), and the end-of-turn tokens as stop parameters.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Sequence

from ift.errors import IftError
from ift.publish.gguf import adds_special_token, stop_tokens

MARKERS = {"system": "\u27e6S\u27e7", "user1": "\u27e6U1\u27e7", "assistant": "\u27e6A1\u27e7",
           "user2": "\u27e6U2\u27e7"}  # text no chat template contains, to find where messages land


# ---------------------------------------------------------------------------------------------- Modelfile


def _go_literal(text: str) -> str:
    """Text as a literal in a Go template (a `{{` would start an action)."""
    return text.replace("{{", '{{ "{{" }}')


def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


@dataclass
class ChatPieces:
    """A chat template cut at its messages: what comes before, between and after them."""

    head_system: str | None  # before the system prompt (None: the template takes no system message)
    system_to_user: str | None
    head: str  # before the first user message when there is no system prompt (a default one included)
    user_to_assistant: str  # after a user message: the assistant's turn opens
    assistant_to_user: str | None  # after an answer in the history, up to the next user message

    def render(self, system: str | None, turns: Sequence[str]) -> str:
        """What the Go template below renders for a conversation of alternating user / assistant turns."""
        text = (self.head_system + system + self.system_to_user) if system is not None else self.head
        for k, content in enumerate(turns):
            text += content + (self.user_to_assistant if k % 2 == 0 else self.assistant_to_user)
        return text


def chat_pieces(tokenizer) -> ChatPieces:
    """Cut the tokenizer's chat template into literal pieces by rendering conversations with markers."""
    m = MARKERS
    user1, user2, answer = ({"role": "user", "content": m["user1"]}, {"role": "user", "content": m["user2"]},
                            {"role": "assistant", "content": m["assistant"]})
    single = _render(tokenizer, [user1], True)
    head, _, after = single.partition(m["user1"])
    pieces = ChatPieces(None, None, head, after, None)
    with contextlib.suppress(Exception):  # templates without a system role raise
        full = _render(tokenizer, [{"role": "system", "content": m["system"]}, user1], True)
        head_system, _, rest = full.partition(m["system"])
        if m["system"] in full and rest.endswith(m["user1"] + after):
            pieces.head_system, pieces.system_to_user = head_system, rest[: -len(m["user1"] + after)]
    with contextlib.suppress(Exception):
        three = _render(tokenizer, [user1, answer, user2], True)
        prefix = head + m["user1"] + after + m["assistant"]
        if three.startswith(prefix) and three.endswith(m["user2"] + after):
            pieces.assistant_to_user = three[len(prefix): -len(m["user2"] + after)]
    return pieces


def _verified_pieces(tokenizer, pieces: ChatPieces) -> tuple[bool, bool]:
    """(system prompts reproduced, multi-turn reproduced): the pieces checked against the chat template."""
    def same(messages: list[dict], system: str | None, turns: list[str]) -> bool:
        try:
            return _render(tokenizer, messages, True) == pieces.render(system, turns)
        except Exception:
            return False

    convo = [("Hi there", "user"), ("Hello! How can I help?", "assistant"), ("Tell me a joke.", "user")]
    as_messages = [{"role": r, "content": c} for c, r in convo]
    system_ok = pieces.head_system is not None and same(
        [{"role": "system", "content": "Be brief."}, as_messages[0]], "Be brief.", [convo[0][0]])
    multi_ok = pieces.assistant_to_user is not None and same(as_messages, None, [c for c, _ in convo])
    if system_ok and multi_ok:
        multi_ok = same([{"role": "system", "content": "Be brief."}] + as_messages, "Be brief.", [c for c, _ in convo])
    return system_ok, multi_ok


def ollama_template(tokenizer, fmt) -> tuple[str, list[str]]:
    """An Ollama TEMPLATE (Go template) giving the prompt text training used; and comments on its limits."""
    comments: list[str] = []
    if not fmt.chat_template:
        prompt = "{{ .Prompt }}"
        if fmt.template is not None:
            filled = _template_as_go(fmt.template)
            if filled is not None:
                prompt = filled
                comments.append(f"your message fills promptsource template {fmt.template.ref} (as `ift chat` does)")
            else:
                comments.append(f"template {fmt.template.ref} cannot be written in Go: send prompts already rendered")
        comments.append("trained without a chat template: every message is one prompt, answered after a space")
        return prompt, comments
    pieces = chat_pieces(tokenizer)
    bos = tokenizer.bos_token if adds_special_token(tokenizer, tokenizer.bos_token_id, True) else None
    strip = (lambda s: s[len(bos):] if s is not None and bos and s.startswith(bos) else s)  # noqa: E731
    system_ok, multi_ok = _verified_pieces(tokenizer, pieces)
    head, head_system = _go_literal(strip(pieces.head)), _go_literal(strip(pieces.head_system or ""))
    user_to_assistant = _go_literal(pieces.user_to_assistant)
    if system_ok:
        start = (f"{{{{ if .System }}}}{head_system}{{{{ .System }}}}{_go_literal(pieces.system_to_user)}"
                 f"{{{{ else }}}}{head}{{{{ end }}}}")
    else:
        start = head
        comments.append("the chat template takes no system prompt: SYSTEM / .System is ignored")
    if multi_ok:
        body = (f'{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{{{{ .Content }}}}{user_to_assistant}'
                f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{_go_literal(pieces.assistant_to_user)}'
                f"{{{{ end }}}}{{{{ end }}}}")
    else:
        body = f"{{{{ .Prompt }}}}{user_to_assistant}"
        comments.append("multi-turn conversations could not be derived from the chat template: one turn at a time")
    return start + body, comments


def _template_as_go(tpl) -> str | None:
    """A promptsource prompt of plain text around one `{{ field }}` as Go (the field = the user's message)."""
    from jinja2 import nodes

    from ift.templates.sandbox import ENV

    try:
        tree = ENV.parse(tpl.jinja)
    except Exception:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], nodes.Output):
        return None
    parts = tree.body[0].nodes
    names = [p for p in parts if isinstance(p, nodes.Name)]
    if len(names) != 1 or any(not isinstance(p, (nodes.TemplateData, nodes.Name)) for p in parts):
        return None
    pieces = [p.data if isinstance(p, nodes.TemplateData) else "\0" for p in parts]
    before, _, after = "".join(pieces).partition("\0")
    return _go_literal(before.lstrip()) + "{{ .Prompt }}" + _go_literal(after.rstrip())


def modelfile_text(gguf_name: str, tokenizer, fmt, notes: Sequence[str] = ()) -> str:
    """An Ollama Modelfile for the GGUF file next to it: the run's prompt format, its stop tokens, greedy decoding."""
    template, comments = ollama_template(tokenizer, fmt)
    if '"""' in template:
        raise IftError('the prompt format contains """, which a Modelfile cannot quote', "Modelfile",
                       "write the Modelfile by hand")
    lines = ["# Ollama Modelfile written by `ift export`: ollama create NAME -f Modelfile", "",
             f"FROM ./{gguf_name}", ""]
    lines += [f"# {c}" for c in list(comments) + list(notes)]
    lines += [f'TEMPLATE """{template}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(t)}" for t in stop_tokens(tokenizer, fmt.chat_template)]
    lines += ["# greedy, as ift chat / generate / eval decode by default; raise it for varied answers",
              "PARAMETER temperature 0", ""]
    return "\n".join(lines)
