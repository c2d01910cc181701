"""The tokenized view: rendered rows encoded as training encodes them, the tokens that carry loss marked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ift.data.chat_templates import CHAT_TEMPLATES, setup_chat_tokenizer
from ift.data.encoding import IGNORE
from ift.data.reports import preview_rows
from ift.errors import IftError
from ift.modeling.tokenizer import load_tokenizer, resolve_kind
from ift.recipe import DataConfig, ModelConfig, SourceConfig, load_recipe
from ift.run import RunDir

# data.chat_template values offered; "" keeps the recipe's (or auto without one)
CHAT_CHOICES = ("", "auto", "none", "tokenizer", *CHAT_TEMPLATES)
# what a row's `truncated` code says (ift.data.tokenization's INTACT, PROMPT_CUT, FIRST_WINDOW, LATER_WINDOW)
CUT_NOTES = {1: "prompt truncated to max_length", 2: "first window of a long text", 3: "window of a long text"}


@dataclass(frozen=True)
class TokenizerSpec:
    """A run folder, a recipe, or a tokenizer folder / Hub id; the model kind; the chat template; max_length."""

    source: str
    kind: str = "auto"
    chat_template: str = ""
    max_length: int | None = None


@dataclass
class Encoder:
    tokenizer: Any
    kind: str
    data: DataConfig
    chat_template: str


@dataclass
class TokenRow:
    index: int
    tokens: list[tuple[str, bool]]  # (token text, carries loss); causal: the input, seq2seq: the decoder
    encoder: list[str]  # seq2seq: the encoder input's tokens
    loss: int
    truncated: str


def load_encoder(spec: TokenizerSpec) -> Encoder:
    """The tokenizer, model kind and data settings `spec` names, set up as training sets them up."""
    source = spec.source.strip()
    if not source:
        raise IftError("no tokenizer given", "tokenizer", "type a run folder, a recipe, or a tokenizer folder")
    path = Path(source).expanduser()
    recipe = None
    run = RunDir(path)
    if path.is_dir() and run.recipe.is_file():  # a run folder: the tokenizer it trained with
        recipe = load_recipe(run.recipe)
        folder = next((p for p in (run.tokenizer, run.final) if p.is_dir()), None)
        if folder is None:
            raise IftError("the run folder has neither tokenizer/ nor final/", source,
                           "pick a finished run, or give the recipe or a tokenizer folder")
        model = recipe.model.model_copy(update={"tokenizer": str(folder)})
    elif path.is_file() and path.suffix in (".yaml", ".yml"):
        recipe = load_recipe(path)
        model = recipe.model
    else:
        model = ModelConfig(name_or_path=source, tokenizer=source,
                            kind=spec.kind if spec.kind in ("causal", "seq2seq") else "auto")
    if spec.kind in ("causal", "seq2seq"):
        model = model.model_copy(update={"kind": spec.kind})
    tokenizer = load_tokenizer(model)
    if model.kind != "auto":
        kind = model.kind
    elif recipe is None and not (path / "config.json").is_file():
        raise IftError("cannot tell the model kind from a tokenizer alone", "kind", "choose causal or seq2seq")
    else:
        kind = resolve_kind(model)
    data = recipe.data if recipe is not None else DataConfig(sources=[SourceConfig(path="studio")])
    update: dict[str, Any] = {}
    if spec.chat_template:
        update["chat_template"] = spec.chat_template
    if spec.max_length:
        update["max_length"] = spec.max_length
    data = data.model_copy(update=update)
    setup_chat_tokenizer(tokenizer, data.chat_template, data.special_tokens)
    return Encoder(tokenizer, kind, data, data.chat_template)


def token_rows(encoder: Encoder, rows: Sequence[tuple[int, str, str, list[str] | None]]) -> list[TokenRow]:
    """(index, prompt, target, choices) rows as `ift data preview` shows them: token ids and loss labels from
    `ift.data.reports.preview_rows`, the training encoding (chat wrapping, truncation, EOS)."""
    import datasets

    if not rows:
        return []
    ds = datasets.Dataset.from_dict({
        "prompt": [r[1] for r in rows], "completion": [r[2] for r in rows],
        "choices": [list(r[3] or []) for r in rows], "source": ["studio"] * len(rows),
        "template": ["draft"] * len(rows), "row": [r[0] for r in rows],
    })
    encoded = preview_rows(ds, encoder.tokenizer, encoder.kind, encoder.data, n=len(rows), seed=0)
    by_row = {}
    for row in encoded:  # a long raw text may become several windows: the first is shown
        by_row.setdefault(row["row"], row)
    out = []
    for index, *_ in rows:
        row = by_row.get(index)
        if row is None:
            out.append(TokenRow(index, [], [], 0, "dropped: longer than max_length (data.truncation: drop)"))
            continue
        ids, labels = row["input_ids"], row["labels"]
        note = CUT_NOTES.get(row.get("truncated") or 0, "")
        if encoder.kind == "seq2seq":
            decoder = [t for t in labels if t != IGNORE]
            out.append(TokenRow(index, [(_piece(encoder.tokenizer, t), True) for t in decoder],
                                [_piece(encoder.tokenizer, t) for t in ids], len(decoder), note))
        else:
            marks = [(_piece(encoder.tokenizer, t), label != IGNORE) for t, label in zip(ids, labels)]
            out.append(TokenRow(index, marks, [], sum(m for _, m in marks), note))
    return out


def _piece(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
