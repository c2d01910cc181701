"""`ift generate`: answers for a file of prompts, decoded in batches as evaluation decodes them, as JSON Lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, Sequence

from ift import atomic
from ift.errors import IftError
from ift.evaluation.decoding import Decoding, context_limit, decode, text_of
from ift.inference.prompts import PromptRow
from ift.inference.target import Target


def generate_rows(target: Target, rows: Sequence[PromptRow], decoding: Decoding, *, batch_size: int = 16,
                  field_name: str = "prediction", show_progress: bool | None = None) -> list[dict]:
    """Each input record with `field_name` added: the model's answer, decoded as evaluation decodes it."""
    from tqdm.auto import tqdm

    tok = target.tokenizer
    encoded = [target.format.encode(tok, r.messages, f"line {r.line}") for r in rows]
    limit = context_limit(target.model)
    for r, ids in zip(rows, encoded):
        if limit is not None and len(ids) >= limit:
            raise IftError(f"the prompt is {len(ids)} tokens, the model's context is {limit}", f"line {r.line}",
                           "shorten the prompt")
    with tqdm(total=len(rows), desc="generate", unit="prompt", disable=None if show_progress is None
              else not show_progress, leave=False, file=sys.stderr) as bar:
        gens = decode(target.model, tok, target.kind, encoded, decoding, batch_size=batch_size, progress=bar.update)
    return [_answer(r.record, field_name, text_of(tok, g.ids), bool(target.format.tools)) for r, g in zip(rows, gens)]


def _answer(record: dict, field_name: str, text: str, tools: bool) -> dict:
    """The record with the answer; reasoning apart (``reasoning``) and, when the prompt had tools, the calls the
    answer makes (``tool_calls``), the answer field keeping the reply's text without them."""
    from ift.evaluation.tool_calls import parse_reply

    reply = parse_reply(text, bare_json=tools)
    if reply.reasoning is None and not reply.tool_calls:
        return {**record, field_name: text}
    out = {**record, field_name: reply.content}
    if reply.reasoning is not None:
        out["reasoning"] = reply.reasoning
    if reply.tool_calls:
        out["tool_calls"] = reply.tool_calls
    return out


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    """One JSON object per line, written atomically (a temporary file renamed into place)."""
    return atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
