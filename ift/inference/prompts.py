"""A run's prompt format, and the prompts `ift generate` reads: what the model was trained to see before its answer.

Prompt format (`PromptFormat`): exactly what training put before the completion — the tokenizer's chat
template for runs with `data.chat_template: true` (prompt ids as `ift.data.encoding` builds them, so a single user
turn encodes to the very ids evaluation scores), the bare prompt otherwise; for template runs the prompt part
of a promptsource template can be filled from the user's text (`--template`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ift.errors import IftError

if TYPE_CHECKING:
    from ift.recipe import Recipe
    from ift.templates.template import Template

ROLES = ("system", "user", "assistant", "tool")


# -------------------------------------------------------------------------------------------- prompt format


@dataclass
class PromptFormat:
    """What a run's model was trained to see before its answer."""

    kind: str = "causal"
    chat_template: bool = False  # wrap in the tokenizer's chat template (data.chat_template: true)
    template: Template | None = None  # the prompt part of a promptsource template, filled from the user's text
    fields: tuple[str, ...] = ()  # the row fields that prompt part reads
    origin: str = ""  # where the format comes from, for messages
    tools: list[dict] | None = None  # function schemas handed to the chat template (--tools FILE)

    @property
    def multi_turn(self) -> bool:
        return self.chat_template

    def describe(self) -> str:
        parts = ["the tokenizer's chat template" if self.chat_template else "the bare prompt (no chat template)"]
        if self.template is not None:
            parts.append(f"promptsource template {self.template.ref} (your text fills "
                         f"{', '.join(self.fields) or 'nothing: it reads no field'})")
        if self.tools:
            parts.append(f"tools {', '.join(t['function']['name'] for t in self.tools)}")
        return " + ".join(parts) + (f", from {self.origin}" if self.origin else "")

    def fill(self, text_or_row: str | dict, where: str | None = None) -> str:
        """The template's prompt for the user's text (its one field) or a row of fields; the text itself without one."""
        if self.template is None:
            if isinstance(text_or_row, dict):
                raise IftError("a row of fields needs a template to render it", where,
                               "give a prompt or messages, or --template REF")
            return text_or_row
        row = text_or_row
        if isinstance(row, str):
            stripped = row.strip()
            if len(self.fields) == 1:
                row = {self.fields[0]: stripped}
            elif stripped.startswith("{"):
                row = _json_object(stripped, where)
            elif not self.fields:
                row = {}
            else:
                example = json.dumps({f: "..." for f in self.fields})
                raise IftError(f"template {self.template.ref} reads several fields ({', '.join(self.fields)})", where,
                               f"type them as one JSON object, e.g. {example}")
        missing = [f for f in self.fields if f not in row]
        if missing:
            raise IftError(f"no field {', '.join(map(repr, missing))} for template {self.template.ref}", where,
                           f"give every field the template reads: {', '.join(self.fields)}")
        prompt, _ = self.template.render(row, truncate=False)
        if not prompt.strip():
            raise IftError(f"template {self.template.ref} renders an empty prompt for this input", where,
                           "check the field values (promptsource templates skip rows they do not apply to)")
        return prompt

    def messages_text(self, tokenizer, messages: Sequence[dict]) -> str:
        """The text the model reads before its answer, for a conversation ending with a user turn."""
        if self.chat_template:
            return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                                 tools=self.tools or None)
        return messages[-1]["content"]

    def encode(self, tokenizer, messages: Sequence[dict], where: str | None = None) -> list[int]:
        """Prompt ids for a conversation ending with a user turn, exactly as training encoded a prompt.

        One user turn goes through `ift.data.encoding.encode_pairs` itself (the ids evaluation scores and generates
        from); a longer conversation through the same chat template, without special tokens added on top.
        """
        from ift.data.encoding import encode_pairs

        _check_messages(messages, where)
        if not self.chat_template and len(messages) > 1:
            raise IftError("this prompt format has no place for several turns or a system message", where,
                           "the run trained without a chat template: give one prompt (a single user turn)")
        if len(messages) == 1 and not self.tools:
            ids = encode_pairs(tokenizer, self.kind, [messages[0]["content"]], [""], chat_template=self.chat_template,
                               add_eos=False)[0][0]
        else:
            ids = tokenizer(self.messages_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
        if not ids:
            raise IftError("the prompt has no tokens", where, "give a non-empty prompt")
        return list(ids)


def _json_object(text: str, where: str | None, example: str = '{"field": "value"}') -> dict:
    """One JSON object from a typed prompt or a JSON Lines line; IftError naming where otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise IftError(f"not valid JSON: {err.msg} (column {err.colno})", where,
                       f"give one JSON object, e.g. {example}") from None
    if not isinstance(value, dict):
        raise IftError(f"expected a JSON object, got {type(value).__name__}", where, f"e.g. {example}")
    return value


def _check_messages(messages: Sequence[Any], where: str | None) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise IftError("messages must be a non-empty list", where,
                       'give [{"role": "user", "content": "..."}] (the last turn is the user\'s)')
    for k, m in enumerate(messages):
        calls = isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls")
        if not isinstance(m, dict) or m.get("role") not in ROLES or not (
                isinstance(m.get("content"), str) or (calls and m.get("content") is None)):
            raise IftError(f"message {k} is not a {{role, content}} object with role system, user, assistant or "
                           "tool", where, 'e.g. {"role": "user", "content": "Hello"}')
    if messages[-1]["role"] not in ("user", "tool"):
        raise IftError(f"the last message is the {messages[-1]['role']}'s, not the user's", where,
                       "end the conversation with the user turn (or the tool result) the model should answer")


def template_prompt(tpl: Template) -> tuple[Template, tuple[str, ...]]:
    """The prompt part of a template (before '|||') as a template of its own, and the fields it reads."""
    from jinja2 import TemplateSyntaxError, meta

    from ift.templates.sandbox import ENV
    from ift.templates.template import SEPARATOR

    prompt_part = tpl.jinja.split(SEPARATOR, 1)[0]
    try:
        tree = ENV.parse(prompt_part)
    except TemplateSyntaxError as err:
        raise IftError(f"the prompt of template {tpl.ref} cannot be rendered on its own: {err.message}", tpl.location,
                       "use --raw and type the whole prompt, or a template whose '|||' is outside any {% block %}") \
            from None
    fields = sorted(meta.find_undeclared_variables(tree) - set(ENV.globals) - {"answer_choices"})
    return dataclasses.replace(tpl, jinja=prompt_part), tuple(fields)


def run_prompt_format(recipe: Recipe, kind: str, *, template: str | None = None, raw: bool = False,
                      origin: str = "") -> PromptFormat:
    """The prompt format a run trained with; `template` ("none" = bare text) overrides the template choice.

    Without `template`: chat-template runs take the user's text as the user turn (free chat); runs without a
    chat template whose first templated source has a template fill the prompt of that source's eval_template
    (else its first template) — the only format such a run has seen.
    """
    chat = recipe.data.chat_run and kind == "causal" and not raw
    fmt = PromptFormat(kind=kind, chat_template=chat, origin=origin)
    if raw or template == "none":
        return fmt
    ref = template
    if ref is None and not chat:
        ref = next((s.eval_template or s.templates[0] for s in recipe.data.sources if s.eval_template or s.templates),
                   None)
    if ref is None:
        return fmt
    from ift.templates.library import TemplateLibrary

    tpl = TemplateLibrary(dirs=tuple(recipe.data.templates_dir)).get(ref)
    fmt.template, fmt.fields = template_prompt(tpl)
    return fmt


# ---------------------------------------------------------------------------------------------- prompt files


@dataclass
class PromptRow:
    line: int  # 1-based line number in the input file (1 for --prompt)
    record: dict  # the input line as read (written back with the prediction added)
    messages: list[dict]


def read_records(path: Path, *, field_name: str = "prediction") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON Lines file; each problem names its line."""
    path = Path(path)
    where_file = str(path)
    if not path.exists():
        raise IftError("input file not found", where_file, "give an existing .jsonl file (--input) or --prompt TEXT")
    if not path.is_file():
        raise IftError("input is not a file", where_file, "give a .jsonl file with one JSON object per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise IftError(f"input is not UTF-8 text (byte {err.start})", where_file, "save the file as UTF-8") from None
    records: list[tuple[int, dict]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        record = _json_object(line, where, '{"prompt": "..."} per line (JSON Lines)')
        if field_name in record:
            raise IftError(f"the line already has a '{field_name}' field, which the output would overwrite", where,
                           "rename that field, or choose another output field with --field")
        if "prompt" not in record and "messages" not in record and not record:
            raise IftError("the line is an empty object", where, 'give {"prompt": "..."} or {"messages": [...]}')
        records.append((number, record))
    if not records:
        raise IftError("the input file has no prompts (it is empty)", where_file,
                       'give one JSON object per line, e.g. {"prompt": "..."} or {"messages": [...]}')
    return records


def to_rows(records: Sequence[tuple[int, dict]], fmt: PromptFormat, *, source: str = "input",
            system: str | None = None) -> list[PromptRow]:
    """The conversation each record asks for, in `fmt`; a problem names the record's line."""
    return [PromptRow(number, record, row_messages(record, fmt, f"{source}, line {number}", system))
            for number, record in records]


def read_prompts(path: Path, fmt: PromptFormat, *, system: str | None = None, field_name: str = "prediction") \
        -> list[PromptRow]:
    """The prompts of a JSON Lines file: one object per line with `prompt` (text) or `messages` (a conversation
    ending with the user's turn), or, with a template, the fields it reads."""
    return to_rows(read_records(path, field_name=field_name), fmt, source=str(path), system=system)


def row_messages(record: dict, fmt: PromptFormat, where: str, system: str | None = None) -> list[dict]:
    """The conversation an input line asks the model to continue.

    `prompt` and `messages` are taken as they are (a prompt as in evaluation's rows: a template run's prompt is
    already rendered); a line with neither is a row of fields for the format's template, rendered by it.
    """
    if "messages" in record:
        messages = record["messages"]
        _check_messages(messages, where)
        if not fmt.chat_template:
            if len(messages) > 1:
                raise IftError("the line has a conversation, but this prompt format has no chat template", where,
                               "give one user turn (or a prompt), or use a model/run with a chat template")
        messages = [dict(m) for m in messages]
    elif "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise IftError(f"prompt must be a string, got {type(prompt).__name__}", where, 'e.g. {"prompt": "Hello"}')
        if not prompt.strip():
            raise IftError("the prompt is empty", where, "give every line a non-empty prompt")
        messages = [{"role": "user", "content": prompt}]
    elif fmt.template is not None:
        messages = [{"role": "user", "content": fmt.fill(record, where)}]
    else:
        raise IftError("the line has neither a 'prompt' nor a 'messages' field", where,
                       'give {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]}, '
                       "or --template REF to render the line's fields")
    if system and fmt.chat_template and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return messages

