"""Tokenization: prepared rows -> token ids and loss labels (prompts masked, targets never cut); its report."""

from __future__ import annotations

import json
from collections import Counter
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa

from ift.data.cache import BATCH, CODE_VERSION, cache_file_path, cache_fingerprint, tokenizer_fingerprint
from ift.data.conversations import encode_conversations
from ift.data.chat_templates import end_of_turn_token
from ift.data.encoding import IGNORE, common_prefix, encode_pairs
from ift.errors import IftError
from ift.recipe import DataConfig

# `truncated` codes written by tokenize(): how a row got into the tokenized split. A conversation too long for
# max_length first loses whole earliest exchanges (TURNS_DROPPED); only if the last exchange alone is too long is
# its reply's tail cut (REPLY_CUT), and a final prompt that alone fills max_length drops the row. A conversation
# whose chat template renders earlier turns differently once later ones follow trains as one row per assistant
# turn (or group of turns): its first row is coded as above, each further row TURN_ROW
INTACT, PROMPT_CUT, FIRST_WINDOW, LATER_WINDOW, TURNS_DROPPED, REPLY_CUT, TURN_ROW = 0, 1, 2, 3, 4, 5, 6


def _cut(ids: list[int], budget: int, side: str, keep_head: int, keep_tail: int) -> list[int]:
    """The prompt cut to `budget` tokens from `side` of its content, keeping its first `keep_head` and
    last `keep_tail` tokens in place (BOS; EOS; a chat template's header and assistant tag)."""
    head, tail = ids[:keep_head], ids[len(ids) - keep_tail:] if keep_tail else []
    body = ids[keep_head: len(ids) - keep_tail]
    room = budget - len(head) - len(tail)
    if room <= 0:
        return ids[len(ids) - budget:] if side == "left" else ids[:budget]
    body = body[len(body) - room:] if side == "left" else body[:room]
    return head + body + tail


class TokenEncoder:
    """datasets.map function (arrow format): rendered rows -> input_ids, attention_mask, labels, length.

    Each output example is (head, tail): head = tokens without loss (the prompt), tail = tokens with
    loss (the completion). Token columns are built as flat numpy arrays + offsets (converting nested
    Python lists to Arrow costs more than the tokenizer's own Python overhead).
    """

    def __init__(self, tokenizer: Any, kind: str, data: DataConfig):
        self.tokenizer, self.kind = tokenizer, kind
        self.max_length, self.mode = data.max_length, data.truncation
        self.train_on_prompt, self.chat = data.train_on_prompt, data.wraps_pairs
        self.train_on, self.template_spec = data.train_on, data.chat_template
        self.train_on_reasoning = data.train_on_reasoning
        self.end_of_turn = end_of_turn_token(tokenizer)
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        # a chat-wrapped prompt with no content: its head (system turn, user tag) and tail (end of turn,
        # assistant tag) stay when a long prompt is cut, so the model still sees a well-formed chat
        self.frame = encode_pairs(tokenizer, kind, [""], [""], chat_template=True, add_eos=False)[0][0] \
            if self.chat and kind == "causal" else []

    def __call__(self, table: pa.Table) -> pa.Table:
        prompts = table.column("prompt").to_pylist()
        completions = table.column("completion").to_pylist()
        raw = [t == "" for t in table.column("template").to_pylist()]
        convs = self._conversations(table)
        pairs = self._encode(prompts, completions, [r and not convs.get(i) for i, r in enumerate(raw)], set(convs))
        rows, heads, tails, status, override, labels = [], [], [], [], {}, {}
        for i, (p, c) in enumerate(pairs):
            if i in convs:
                first = True
                for encoded in convs[i]:
                    if encoded is None:  # the final prompt alone fills max_length (dropped, counted)
                        continue
                    labels[len(rows)] = encoded.labels
                    rows.append(i)
                    heads.append([])
                    tails.append(encoded.input_ids)
                    status.append(TURN_ROW if not first else REPLY_CUT if encoded.cut_tokens else TURNS_DROPPED
                                  if encoded.dropped_messages else INTACT)
                    first = False
                continue
            for head, tail, code in (self._raw(p, c) if raw[i] else self._pair(p, c)):
                if code in (FIRST_WINDOW, LATER_WINDOW):
                    override[len(rows)] = self.tokenizer.decode(tail, skip_special_tokens=True)
                rows.append(i)
                heads.append(head)
                tails.append(tail)
                status.append(code)
        out = table.take(pa.array(rows, type=pa.int64()))
        if override:
            comp = out.column("completion").to_pylist()
            for j, text in override.items():
                comp[j] = text
            out = out.set_column(out.schema.get_field_index("completion"), "completion", pa.array(comp, pa.string()))
        return self._columns(out, heads, tails, status, labels)

    def _conversations(self, table: pa.Table) -> dict[int, Any]:
        """Row -> its EncodedConversation (None when dropped), for the rows that are conversations."""
        if "messages" not in table.column_names:
            return {}
        import pyarrow.compute as pc

        lengths = pc.list_value_length(table.column("messages")).fill_null(0).to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(lengths > 0)
        if not len(idx):
            return {}
        if self.kind == "seq2seq":
            raise IftError("conversational sources train a decoder-only model in a chat template; a seq2seq model "
                           "has none", "data.sources", "use a causal model, or give the source templates")
        if self.template_spec == "none" or not getattr(self.tokenizer, "chat_template", None):
            raise IftError("conversations need a chat template, but " + (
                "data.chat_template is none" if self.template_spec == "none" else "the tokenizer has none"),
                "data.chat_template", "set data.chat_template: chatml or llama3 (their tokens are added to the "
                "tokenizer), or a .jinja file")
        messages = table.column("messages").take(pa.array(idx)).to_pylist()
        tools: list[Any] = [None] * len(messages)
        if "chat" in table.column_names:  # conversations with calls, reasoning or tools: the whole of them
            for k, chat in enumerate(table.column("chat").take(pa.array(idx)).to_pylist()):
                if chat:
                    whole = json.loads(chat)
                    messages[k], tools[k] = whole["messages"], whole.get("tools")
        sources = table.column("source").take(pa.array(idx)).to_pylist()
        limit = None if self.mode == "drop" else self.max_length  # drop: an over-long conversation leaves whole
        encoded = encode_conversations(self.tokenizer, messages, train_on=self.train_on, max_length=limit,
                                       end_of_turn=self.end_of_turn, sources=[f"source '{s}'" for s in sources],
                                       drop_overlong=True, tools=tools, train_on_reasoning=self.train_on_reasoning,
                                       rows=True)
        return {int(i): [None if e is not None and len(e.input_ids) > self.max_length else e for e in rows]
                for i, rows in zip(idx, encoded)}

    def _encode(self, prompts: list[str], completions: list[str], raw: list[bool],
                skip: set[int] = frozenset()) -> list[tuple[list[int], list[int]]]:
        pairs: list[Any] = [([], [])] * len(prompts)
        for is_raw in (False, True):
            idx = [i for i, r in enumerate(raw) if r == is_raw and i not in skip]
            if not idx:
                continue
            if is_raw and self.kind == "seq2seq":
                raise IftError("raw-text sources (no templates) train a causal model on the text itself; "
                               "a seq2seq model needs prompt/target pairs", "data.sources",
                               "give the source templates, or use a causal model")
            encoded = encode_pairs(self.tokenizer, self.kind, [prompts[i] for i in idx],
                                   [completions[i] for i in idx], chat_template=self.chat and not is_raw)
            for i, pair in zip(idx, encoded):
                pairs[i] = pair
        return pairs

    def _columns(self, out: pa.Table, heads: list[list[int]], tails: list[list[int]], status: list[int],
                 explicit: dict[int, list[int]] | None = None) -> pa.Table:
        """explicit: output row -> its labels, for conversations (loss on every assistant reply, not one tail)."""
        h = np.fromiter(map(len, heads), dtype=np.int64, count=len(heads))
        t = np.fromiter(map(len, tails), dtype=np.int64, count=len(tails))
        if self.kind == "seq2seq":
            ids, ids_off = _flat(heads, h), _offsets(h)
            labels, lab_off = _flat(tails, t), _offsets(t)
            length = h + t
        else:
            ids = _flat([x for pair in zip(heads, tails) for x in pair], np.stack([h, t], 1).ravel())
            ids_off = lab_off = _offsets(h + t)
            labels = ids.copy()
            if not self.train_on_prompt:  # -100 on each row's first len(head) positions
                starts = np.repeat(ids_off[:-1], h + t)
                within = np.arange(len(ids), dtype=np.int64) - starts
                labels[within < np.repeat(h, h + t)] = IGNORE
            for j, lab in (explicit or {}).items():
                labels[ids_off[j]:ids_off[j + 1]] = lab
            length = h + t
        mask = np.ones(len(ids), dtype=np.int8)
        return (out.append_column("input_ids", pa.ListArray.from_arrays(pa.array(ids_off), pa.array(ids)))
                .append_column("attention_mask", pa.ListArray.from_arrays(pa.array(ids_off), pa.array(mask)))
                .append_column("labels", pa.ListArray.from_arrays(pa.array(lab_off), pa.array(labels)))
                .append_column("length", pa.array(length.astype(np.int32)))
                .append_column("truncated", pa.array(np.asarray(status, dtype=np.int8))))

    def _pair(self, p: list[int], c: list[int]) -> list[tuple[list[int], list[int], int]]:
        """Fit a pair into max_length by cutting the prompt (or dropping the row): never the target."""
        limit = self.max_length
        if self.kind == "seq2seq":
            if len(c) > limit:
                return []  # the target cannot be cut: drop
            if len(p) <= limit:
                return [(p, c, INTACT)]
            if self.mode == "drop":
                return []
            return [(_cut(p, limit, self.mode, 0, int(bool(p) and p[-1] == self.eos)), c, PROMPT_CUT)]
        if len(p) + len(c) <= limit:
            return [(p, c, INTACT)]
        budget = limit - len(c)
        if self.mode == "drop" or budget < 1:
            return []  # drop rather than cut the target
        return [(_cut(p, budget, self.mode, *self._frame(p)), c, PROMPT_CUT)]

    def _frame(self, p: list[int]) -> tuple[int, int]:
        """How many leading and trailing prompt tokens are template, not content (kept when cutting)."""
        if not self.frame:
            return int(self.bos is not None and bool(p) and p[0] == self.bos), 0
        head = common_prefix([p, self.frame])
        tail = common_prefix([p[::-1], self.frame[::-1]])
        return head, min(tail, len(self.frame) - head, len(p) - head)

    def _raw(self, p: list[int], c: list[int]) -> list[tuple[list[int], list[int], int]]:
        """Raw text: loss on every token; text longer than max_length is split into windows, not cut."""
        limit = self.max_length
        if len(p) + len(c) <= limit:
            return [(p, c, INTACT)]
        tokens = p + c
        windows = []
        for n, start in enumerate(range(0, len(tokens), limit)):
            piece = tokens[start:start + limit]
            if len(piece) < 2:
                continue  # a 1-token window predicts nothing
            head = piece[:max(len(p) - start, 0)]  # leading BOS of the first window: no loss, as unsplit
            windows.append((head, piece[len(head):], FIRST_WINDOW if n == 0 else LATER_WINDOW))
        return windows


def _flat(seqs: list[list[int]], lengths: np.ndarray) -> np.ndarray:
    return np.fromiter(chain.from_iterable(seqs), dtype=np.int32, count=int(lengths.sum()))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    return out


def _tokenized_features(features: Any) -> Any:
    import datasets

    extra = {"input_ids": datasets.List(datasets.Value("int32")), "attention_mask": datasets.List(datasets.Value("int8")),
             "labels": datasets.List(datasets.Value("int32")), "length": datasets.Value("int32"),
             "truncated": datasets.Value("int8")}
    return datasets.Features({**{k: v for k, v in features.items() if k not in extra}, **extra})


def tokenize(splits: Any, tokenizer: Any, kind: str, data: DataConfig) -> tuple[Any, dict]:
    """Token ids and loss labels for every split (cached by fingerprint); report of what was cut or dropped."""
    import datasets

    if kind not in ("causal", "seq2seq"):
        raise IftError(f"unknown model kind '{kind}'", "model.kind", "use causal or seq2seq")
    if data.wraps_pairs and kind == "causal" and not getattr(tokenizer, "chat_template", None):
        raise IftError(f"data.chat_template is {data.chat_template} but the tokenizer has no chat template",
                       "data.chat_template", "set data.chat_template: auto (or none), a named template (chatml, "
                       "llama3), or use an instruct model whose tokenizer has one")
    tok_fp = tokenizer_fingerprint(tokenizer)
    settings = (kind, data.max_length, data.truncation, data.train_on_prompt, data.chat_template, data.train_on,
                data.train_on_reasoning)
    out, report = {}, {"settings": {"kind": kind, "max_length": data.max_length, "truncation": data.truncation,
                                    "train_on_prompt": data.train_on_prompt, "chat_template": data.chat_template,
                                    "train_on": data.train_on, "train_on_reasoning": data.train_on_reasoning,
                                    "end_of_turn": end_of_turn_token(tokenizer)}}
    encoder = TokenEncoder(tokenizer, kind, data)
    for split, ds in splits.items():
        fp = cache_fingerprint("tokenize", ds._fingerprint, tok_fp, settings, CODE_VERSION)
        num_proc = data.num_proc if data.num_proc > 1 and len(ds) >= 2 * BATCH else None
        features = _tokenized_features(ds.features)
        if not len(ds):  # datasets would return an empty dataset without the token columns
            out[split] = datasets.Dataset.from_dict({k: [] for k in features}, features=features)
            report[split] = token_report(ds, out[split])
            continue
        mapped = ds.with_format("arrow").map(
            encoder, batched=True, batch_size=BATCH, remove_columns=ds.column_names,
            features=features, new_fingerprint=fp, num_proc=num_proc,
            cache_file_name=cache_file_path("tokenize", fp), desc=f"tokenizing {split}")
        out[split] = mapped.with_format(None)
        report[split] = token_report(ds, out[split])
        if not len(out[split]):
            raise IftError(f"split '{split}' ends up empty: all {len(ds)} rows are longer than data.max_length "
                           f"({data.max_length} tokens) and were dropped", "data.max_length",
                           "raise data.max_length, or set data.truncation: left (or right) so long prompts are cut "
                           "instead (targets are never cut)")
    if "train" in report:
        train = report["train"]["sources"]
        total = max(sum(v["tokens"] for v in train.values()), 1)
        report["mixture_tokens"] = {n: {"tokens": v["tokens"], "token_share": round(v["tokens"] / total, 4)}
                                    for n, v in train.items()}
    return datasets.DatasetDict(out), report


def arrow_table(ds: Any) -> pa.Table | None:
    return ds.with_format("arrow")[:] if len(ds) else None


def _loss_counts(labels: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = labels.combine_chunks() if isinstance(labels, pa.ChunkedArray) else labels
    offsets = arr.offsets.to_numpy()
    values = arr.flatten().to_numpy()
    carries = np.concatenate([[0], np.cumsum(values != IGNORE)])
    return carries[offsets[1:] - offsets[0]] - carries[offsets[:-1] - offsets[0]]


def length_percentiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    q = np.percentile(values, [50, 90, 95, 99])
    return {"p50": float(q[0]), "p90": float(q[1]), "p95": float(q[2]), "p99": float(q[3]),
            "max": int(values.max()), "mean": round(float(values.mean()), 1)}


def token_report(before: Any, after: Any) -> dict:
    """Rows, tokens, loss tokens, length percentiles, truncated and dropped rows: per split and source."""
    t_in, t_out = arrow_table(before), arrow_table(after)
    src_in = Counter(t_in.column("source").to_pylist()) if t_in is not None else Counter()
    entry: dict[str, Any] = {"rows_in": len(before), "rows": len(after), "sources": {}}
    if t_out is None:  # nothing left (or nothing given)
        sources, length = np.array([], dtype=object), np.array([], dtype=np.int64)
        status, loss = np.array([], dtype=np.int8), np.array([], dtype=np.int64)
    else:
        sources = np.array(t_out.column("source").to_pylist(), dtype=object)
        length = t_out.column("length").to_numpy()
        status = t_out.column("truncated").to_numpy()
        loss = _loss_counts(t_out.column("labels"))
    entry.update(_counts(length, status, loss, len(before)))
    entry["length"] = length_percentiles(length)
    for name in sorted(set(src_in) | set(sources.tolist())):
        m = sources == name
        entry["sources"][name] = {**_counts(length[m], status[m], loss[m], src_in.get(name, 0)),
                                  "rows": int(m.sum()), "length": length_percentiles(length[m])}
    return entry


def _counts(length: np.ndarray, status: np.ndarray, loss: np.ndarray, rows_in: int) -> dict[str, int]:
    originals = int(((status != LATER_WINDOW) & (status != TURN_ROW)).sum())
    out = {"tokens": int(length.sum()), "loss_tokens": int(loss.sum()), "truncated": int((status == PROMPT_CUT).sum()),
           "split_into_windows": int((status == FIRST_WINDOW).sum()),
           "windows": int(((status == FIRST_WINDOW) | (status == LATER_WINDOW)).sum()), "dropped": rows_in - originals}
    dropped_turns, reply_cut = int((status == TURNS_DROPPED).sum()), int((status == REPLY_CUT).sum())
    if dropped_turns or reply_cut:  # conversations: earliest exchanges dropped / the last reply's tail cut
        out.update(turns_dropped=dropped_turns, reply_cut=reply_cut)
    turn_rows = int((status == TURN_ROW).sum())
    if turn_rows:  # conversations trained as one row per assistant turn: the rows beyond each one's first
        out.update(turn_rows=turn_rows)
    return out
