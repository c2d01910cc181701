"""Chat templates: the recipe's data.chat_template resolved on a tokenizer, its special tokens added, and
the end-of-turn token that loss masks and generation stop at.

``setup_chat_tokenizer`` gives a tokenizer the recipe's template and the special tokens it needs, once, before
the model loads; ``end_of_turn_token`` names the token generation stops at.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ift.errors import IftError

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
    # ChatML with tools: the schemas in the system turn, each call a <tool_call> JSON block ({"name", "arguments"})
    # in the assistant turn, tool results in "tool" turns; earlier turns render the same whatever follows
    "chatml_tools": (
        "{%- if messages and messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
        "{%- set rest = messages[1:] %}{%- else %}{%- set system = '' %}{%- set rest = messages %}{%- endif %}"
        "{%- if tools %}{{ '<|im_start|>system\\n' + (system + '\\n\\n' if system else '') }}"
        "{{ 'You may call these functions. To call one, answer with <tool_call>{\"name\": ..., \"arguments\": "
        "{...}}</tool_call>.\\n<tools>' }}"
        "{%- for tool in tools %}{{ '\\n' + (tool | tojson) }}{%- endfor %}{{ '\\n</tools><|im_end|>\\n' }}"
        "{%- elif system %}{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{%- endif %}"
        "{%- for m in rest %}"
        "{%- if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' + (m['content'] or '') }}"
        "{%- for c in (m['tool_calls'] or []) %}{%- set f = c['function'] if c['function'] is defined else c %}"
        "{{ ('\\n' if m['content'] or not loop.first else '') + '<tool_call>\\n' + "
        "({'name': f['name'], 'arguments': f['arguments']} | tojson) + '\\n</tool_call>' }}{%- endfor %}"
        "{{ '<|im_end|>\\n' }}"
        "{%- else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "chatml_tools": "<|im_end|>"}
TEMPLATE_TOKENS = {  # special tokens a base model's tokenizer needs for each named template
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "chatml_tools": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}
# tried in order when the template is the tokenizer's own and no end-of-turn string is given
EOT_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<｜end▁of▁sentence｜>", "<|endoftext|>",
                   "</s>")


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
    return next((t for t in EOT_CANDIDATES if t in template and t in vocab), None)


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


