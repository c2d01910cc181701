"""Tool calling at inference: the tools a user hands the model (``--tools FILE``).

``read_tools`` reads a JSON file holding a list of function schemas (or ``{"tools": [...]}``), checked as training
checks a row's tools (``ift.data.formats.row_tools``). Replies are read back into reasoning, answer and calls by
``ift.evaluation.tool_calls.parse_reply``, the parser evaluation scores calls with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ift.data.formats import row_tools
from ift.errors import IftError


def read_tools(path: Path | str) -> list[dict[str, Any]]:
    """The function schemas of a JSON file (a list, or an object with a ``tools`` list); IftError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise IftError(f"cannot read the tools file: {err.__class__.__name__}", str(path),
                       "give a readable JSON file with a list of function schemas") from None
    try:
        value = json.loads(text)
    except ValueError as err:
        raise IftError(f"the tools file is not valid JSON ({err.msg}, line {err.lineno})", str(path),
                       "give a JSON list of function schemas") from None
    if isinstance(value, dict) and "tools" in value:
        value = value["tools"]
    tools = row_tools(value, str(path), "the tools file")
    if not tools:
        raise IftError("the tools file lists no tools", str(path), "give at least one function schema")
    return tools
