"""Evaluation: rank-classification and exact-match accuracy, ROUGE, per-source and per-template breakdowns.

Serves the training loop (validation every eval_steps, test at the end) and `ift eval`.

Token ids come from `ift.data.encoding`, so a prompt is scored exactly as training tokenized it.
Choices are scored WITHOUT the end-of-sequence token (and, with a chat template, without the tokens that
close the assistant turn), as T0 did: the score is log p(choice tokens | prompt), summed over the choice's
tokens ("accuracy") and divided by their number ("accuracy_norm").

Rank scoring runs each prompt once. Causal models: the left-padded prompts go through the model with the
KV cache on (a prefix all prompts of a batch share runs once), the last prompt position gives every
choice's first token, and the remaining choice tokens continue from a copy of the cache (one row per
choice). Seq2seq: the encoder runs once per prompt and the decoder scores every choice. Position ids
follow the attention mask, so scores do not depend on batch size or padding. Log-probabilities are
computed only where a choice token is predicted.

Generation is greedy. Causal models decode with the same prefill and KV cache, one step for the whole
batch, and drop a row as soon as it emits EOS; seq2seq models use transformers' `generate`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import re
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ift import atomic
from ift.data.encoding import encode_pairs
from ift.errors import IftError
from ift.evaluation.metrics import FAMILIES, ROUGE, SCORES
from ift.recipe import EvaluationConfig

ROUGE_KEYS = ROUGE
KNOWN_METRICS = FAMILIES
COMPARED = tuple(m for m in SCORES if m != "accuracy_norm")
ROUGE_MODULE = Path(__file__).resolve().parent / "metrics" / "rouge"
# A prefix shared by a batch's prompts runs once when at least this long (shorter: not worth a forward pass).
MIN_SHARED_PREFIX = 16
# Continuation rows per forward pass, as a multiple of the prompt batch: each row holds a copy of its
# prompt's KV cache, so this bounds memory at a few times that of the prompt pass.
CHOICES_PER_PROMPT = 4


# ---------------------------------------------------------------- text metrics


def normalize_answer(text: str) -> str:
    """Case-folded, surrounding whitespace and punctuation removed, inner whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    start, end = 0, len(text)
    while start < end and _is_trim(text[start]):
        start += 1
    while end > start and _is_trim(text[end - 1]):
        end -= 1
    return " ".join(text[start:end].split())


def _is_trim(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith("P")


def exact_match(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal to (any of) their reference(s) after `normalize_answer`, 0-1."""
    _check_pairs(predictions, references)
    hits = 0
    for pred, ref in zip(predictions, references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        hits += normalize_answer(pred) in {normalize_answer(r) for r in refs}
    return hits / len(predictions)


def rouge(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]],
          use_stemmer: bool = True) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum mean F-measure (0-1) through the metric module ift ships (offline, rouge_score inside).

    Texts are put one sentence per line first (`split_sentences`), as the standard summarization scripts do:
    rouge_score's rougeLsum reads sentences from newlines, and without them it equals rougeL.
    """
    per_pair = _rouge_per_pair(predictions, references, use_stemmer)
    return {k: sum(v) / len(v) for k, v in per_pair.items()}


# Words whose final period does not end a sentence (lower-cased, inner periods kept: "u.s", "e.g").
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc e.g i.e cf approx no nos fig inc ltd co corp dept est govt "
    "jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k u.n a.m p.m".split())
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s)")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: each line, split after . ! ? followed by a space, except after an abbreviation or an
    initial ("Mr.", "e.g.", "J.").

    The summarization scripts (transformers' run_summarization) use nltk's punkt model, which is data that must
    be downloaded (not available offline); this rule agrees with it on ordinary prose, and a score stays
    reproducible without any download.
    """
    out: list[str] = []
    for line in text.splitlines():
        start = 0
        for match in _SENTENCE_END.finditer(line):
            if match.group().startswith(".") and not match.group().startswith(".."):
                words = line[start:match.start()].split()
                word = words[-1].lstrip("\"'\u201c\u2018([").lower() if words else ""
                if word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                    continue
            out.append(line[start:match.end()].strip())
            start = match.end()
        if line[start:].strip():
            out.append(line[start:].strip())
    return out


def _rouge_per_pair(predictions: Sequence[str], references: Sequence[Any], use_stemmer: bool) -> dict[str, list[float]]:
    _check_pairs(predictions, references)
    # one sentence per line (for rougeLsum; the other types ignore line breaks)
    predictions = ["\n".join(split_sentences(p)) for p in predictions]
    refs = ["\n".join(split_sentences(r)) if isinstance(r, str) else ["\n".join(split_sentences(x)) for x in r]
            for r in references]
    # evaluate picks its feature set from the first reference: make all single or all multi
    if any(isinstance(r, list) for r in refs):
        refs = [[r] if isinstance(r, str) else r for r in refs]
    out = _rouge_module().compute(predictions=list(predictions), references=refs, use_stemmer=use_stemmer,
                                  use_aggregator=False)
    return {k: [float(x) for x in out[k]] for k in ROUGE_KEYS}


@functools.lru_cache(maxsize=1)
def _rouge_module():
    import evaluate

    if not (ROUGE_MODULE / "rouge.py").is_file():
        raise IftError("the ROUGE metric module is missing", str(ROUGE_MODULE), "reinstall ift (pip install -e .)")
    # a local path: evaluate imports the script from there, never from the Hub
    return evaluate.load(str(ROUGE_MODULE), keep_in_memory=True)


def _check_pairs(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise IftError(f"{len(predictions)} predictions but {len(references)} references", None,
                       "pass one reference (or list of references) per prediction")
    if not predictions:
        raise IftError("nothing to score: no predictions", None, "pass at least one prediction")


# ---------------------------------------------------------------- model plumbing


def _unwrap(model):
    """The transformers model under a peft wrapper (its config, forward signature, generation flags)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _device(model):
    return next(model.parameters()).device


@functools.lru_cache(maxsize=64)
def _forward_params(cls: type) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def _accepts(model, name: str) -> bool:
    return name in _forward_params(type(_unwrap(model)))


@contextlib.contextmanager
def _inference(model) -> Iterator[None]:
    """eval() + no_grad, then every submodule back to the train/eval state it had."""
    import torch

    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in states:
            m.training = training


def _pad(seqs: Sequence[Sequence[int]], value: int, left: bool):
    """Pad id lists to one tensor; returns (ids, mask) as LongTensors on the CPU."""
    import torch

    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def _pad_id(tokenizer, eos_ids: Sequence[int] = ()) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return eos_ids[0] if eos_ids else 0


def _choice_logprobs(logits, targets, mask):
    """Per row, the summed log-probability of `targets` where `mask` is set; log-softmax only there."""
    import torch

    sel = mask.bool()
    picked = logits[sel].float()  # [M, V]: choice positions only
    lp = picked.gather(-1, targets[sel].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1).expand_as(sel)[sel]
    return torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device).index_add_(0, rows, lp.double())


def _select_cache(cache, index):
    """A new cache holding rows `index` of `cache` (rows may repeat); `cache` itself is left untouched."""
    if hasattr(cache, "layers"):  # transformers Cache objects
        out = copy.copy(cache)
        out.layers = [copy.copy(layer) for layer in cache.layers]
        out.batch_select_indices(index)
        return out
    return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)  # legacy tuples


def _with_cache(model, cache) -> dict:
    """The KV cache as a forward keyword: `cache` where the model takes it (`past_key_values` is deprecated in
    transformers 5.x and removed in 5.40), else the old name (older transformers, remote code)."""
    return {"cache" if _accepts(model, "cache") else "past_key_values": cache}


def _returned_cache(out):
    """The KV cache a forward pass returned; reading `past_key_values` of a new output logs a deprecation."""
    return out.cache if "cache" in getattr(out, "__dataclass_fields__", ()) else out.past_key_values


def _progress(total: int, desc: str | None):
    from tqdm.auto import tqdm

    # no desc: no bar; disable=None: shown on a terminal, silent in logs and tests
    return tqdm(total=total, desc=desc, unit="row", disable=None if desc else True, leave=False)


# ---------------------------------------------------------------- encoding


def _encode_choices(tokenizer, kind: str, prompts: Sequence[str], choices: Sequence[Sequence[str]],
                    chat_template: bool) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, [choice ids]) per row, through the encoding training used; no EOS on choices."""
    flat_p = [p for p, cs in zip(prompts, choices) for _ in cs]
    flat_c = [c for cs in choices for c in cs]
    pairs = encode_pairs(tokenizer, kind, flat_p, flat_c, chat_template=chat_template, add_eos=False) if flat_p else []
    tail: list[int] = []
    if chat_template and kind == "causal" and flat_p:
        # what the template appends after any answer: the completion ids of an empty answer
        tail = encode_pairs(tokenizer, kind, [flat_p[0]], [""], chat_template=True, add_eos=False)[0][1]
    out, k = [], 0
    for i, (p, cs) in enumerate(zip(prompts, choices)):
        if not cs:
            out.append(([], []))  # nothing to score
            continue
        ids = []
        for c in cs:
            cid = pairs[k][1]
            if tail and len(cid) > len(tail) and cid[-len(tail):] == tail:
                cid = cid[: -len(tail)]
            if not cid:
                raise IftError(f"answer choice {c!r} has no tokens", f"row {i}", "give every answer choice some text")
            ids.append(cid)
            k += 1
        prompt_ids = pairs[k - len(cs)][0]  # a prompt's ids do not depend on the completion
        _check_prompt(prompt_ids, i)
        out.append((prompt_ids, ids))
    return out


def _check_prompt(ids: list[int], index: int) -> None:
    if not ids:  # nothing to condition on: the first answer token would have no logits
        raise IftError("the prompt has no tokens", f"row {index}", "give every row a non-empty prompt")


def _encode_prompts(tokenizer, kind: str, prompts: Sequence[str | list[dict]], chat_template: bool) -> list[list[int]]:
    """Prompt ids exactly as training put them before the completion. A prompt that is a list of messages is a
    conversation's history: rendered in the tokenizer's chat template with the generation prompt."""
    from ift.data.conversations import history_ids

    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    pairs = encode_pairs(tokenizer, kind, [prompts[i] for i in texts], [""] * len(texts), chat_template=chat_template,
                         add_eos=False) if texts else []
    out: list[list[int]] = [[] for _ in prompts]
    for i, (p, _) in zip(texts, pairs):
        out[i] = p
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            out[i] = history_ids(tokenizer, p)
    for i, p in enumerate(out):
        _check_prompt(p, i)
    return out


# ---------------------------------------------------------------- rank scoring


def score_choices(model, tokenizer, kind: str, prompts: list[str], choices: list[list[str]], *,
                  chat_template: bool = False, batch_size: int = 16,
                  desc: str | None = None) -> list[list[tuple[float, float]]]:
    """(summed log-prob, mean log-prob per token) of every choice given its prompt; independent of batch size."""
    _check_kind(kind)
    if len(prompts) != len(choices):
        raise IftError(f"{len(prompts)} prompts but {len(choices)} choice lists", None, "pass one list per prompt")
    _check_lm_head(model)
    encoded = _encode_choices(tokenizer, kind, prompts, choices, chat_template)
    pad = _pad_id(tokenizer, [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    with _inference(model), _progress(len(encoded), desc) as bar:
        if kind == "seq2seq":
            sums = _score_seq2seq(model, encoded, batch_size, pad, bar)
        else:
            sums = _score_causal(model, encoded, batch_size, pad, bar)
    return [[(s, s / len(c)) for s, c in zip(row, cs)] for row, (_, cs) in zip(sums, encoded)]


def _batches(lengths: Sequence[int], batch_size: int, keep: Sequence[bool] | None = None) -> Iterator[list[int]]:
    """Indices in batches of similar length (less padding); longest first, so running out of memory shows early."""
    order = sorted((i for i in range(len(lengths)) if keep is None or keep[i]), key=lambda i: -lengths[i])
    for start in range(0, len(order), max(1, batch_size)):
        yield order[start:start + batch_size]


def _prefill(model, prompts: Sequence[Sequence[int]], pad: int, device):
    """Prompts through the model with the KV cache on: (next-token logits [B, V], cache, attention mask [B, T]).

    Left padding; position ids follow the mask. A prefix every prompt of the batch shares (an instruction,
    few-shot examples, a chat system prompt) runs once and its cache is copied to every row; the padding then
    sits between that prefix and each prompt's own tokens, masked like any padding.
    """
    import torch

    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    n = len(prompts)
    # at least one token of each prompt stays in the second pass: its logits predict the answer
    shared = min(_common_prefix(prompts), min(len(p) for p in prompts) - 1) if n > 1 else 0
    cache = None
    if shared >= MIN_SHARED_PREFIX:
        head = torch.tensor([list(prompts[0][:shared])], device=device)
        out = model(input_ids=head, attention_mask=torch.ones_like(head),
                    position_ids=torch.arange(shared, device=device).unsqueeze(0), use_cache=True, **keep_last)
        cache = _select_cache(_returned_cache(out), torch.zeros(n, dtype=torch.long, device=device))
    else:
        shared = 0
    ids, tail_mask = _pad([p[shared:] for p in prompts], pad, left=True)
    mask = torch.cat([torch.ones((n, shared), dtype=torch.long), tail_mask], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                **_with_cache(model, cache), use_cache=True, **keep_last)
    return out.logits[:, -1].float(), _returned_cache(out), mask


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for k in range(n):
        if any(s[k] != first[k] for s in seqs):
            return k
    return n


def _score_causal(model, encoded, batch_size: int, pad: int, bar) -> list[list[float]]:
    device = _device(model)
    sums: list[list[float]] = [[0.0] * len(cs) for _, cs in encoded]
    for idx in _batches([len(p) for p, _ in encoded], batch_size, [bool(cs) for _, cs in encoded]):
        last, cache, mask = _prefill(model, [encoded[i][0] for i in idx], pad, device)
        first = last.log_softmax(-1)  # next-token distribution after each prompt
        items = [(b, j, c) for b, i in enumerate(idx) for j, c in enumerate(encoded[i][1])]
        for b, j, c in items:
            sums[idx[b]][j] = float(first[b, c[0]])
        rest = [it for it in items if len(it[2]) > 1]
        step = max(1, batch_size * CHOICES_PER_PROMPT)
        for start in range(0, len(rest), step):
            chunk = rest[start:start + step]
            more = _continue_choices(model, cache, mask, chunk, pad, device)
            for (b, j, _), extra in zip(chunk, more.tolist()):
                sums[idx[b]][j] += extra
        bar.update(len(idx))
    return sums


def _continue_choices(model, cache, prompt_mask, chunk, pad: int, device):
    """Log-prob of choice tokens 2..n, each choice continuing from its own prompt's cached keys/values."""
    import torch

    rows = torch.tensor([b for b, _, _ in chunk], dtype=torch.long)
    cont_ids, cont_mask = _pad([c[:-1] for _, _, c in chunk], pad, left=False)
    targets, tmask = _pad([c[1:] for _, _, c in chunk], 0, left=False)
    # positions continue from each prompt's real length, whatever padding its batch needed
    start = prompt_mask.sum(-1)[rows]
    pos = start.unsqueeze(1) + torch.arange(cont_ids.shape[1]).unsqueeze(0)
    out = model(input_ids=cont_ids.to(device),
                attention_mask=torch.cat([prompt_mask[rows], cont_mask], dim=1).to(device),
                position_ids=pos.to(device), **_with_cache(model, _select_cache(cache, rows.to(device))),
                use_cache=True)
    return _choice_logprobs(out.logits, targets.to(device), tmask.to(device)).cpu()


def _score_seq2seq(model, encoded, batch_size: int, pad: int, bar) -> list[list[float]]:
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    device = _device(model)
    config = _unwrap(model).config
    start_id = config.decoder_start_token_id if config.decoder_start_token_id is not None else pad
    encoder = model.get_encoder()
    sums: list[list[float]] = [[0.0] * len(cs) for _, cs in encoded]
    for idx in _batches([len(p) for p, _ in encoded], batch_size, [bool(cs) for _, cs in encoded]):
        ids, mask = _pad([encoded[i][0] for i in idx], pad, left=False)
        hidden = encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        items = [(b, j, c) for b, i in enumerate(idx) for j, c in enumerate(encoded[i][1])]
        step = max(1, batch_size * CHOICES_PER_PROMPT)
        for s in range(0, len(items), step):
            chunk = items[s:s + step]
            rows = torch.tensor([b for b, _, _ in chunk], dtype=torch.long, device=device)
            dec_ids, dec_mask = _pad([[start_id] + c[:-1] for _, _, c in chunk], pad, left=False)
            targets, tmask = _pad([c for _, _, c in chunk], 0, left=False)
            out = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden.index_select(0, rows)),
                        attention_mask=mask.to(device).index_select(0, rows), decoder_input_ids=dec_ids.to(device),
                        decoder_attention_mask=dec_mask.to(device), use_cache=False)
            lp = _choice_logprobs(out.logits, targets.to(device), tmask.to(device)).tolist()
            for (b, j, _), v in zip(chunk, lp):
                sums[idx[b]][j] = v
        bar.update(len(idx))
    return sums


# ---------------------------------------------------------------- generation


def generate(model, tokenizer, kind: str, prompts: list[str | list[dict]], *, max_new_tokens: int, batch_size: int = 16,
             chat_template: bool = False, desc: str | None = None) -> list[str]:
    """Greedy continuations (new tokens only, special tokens skipped, stripped), batched with left padding."""
    ids = _generate_ids(model, tokenizer, kind, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        chat_template=chat_template, desc=desc)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]


def _generate_ids(model, tokenizer, kind: str, prompts: Sequence[str | list[dict]], *, max_new_tokens: int, batch_size: int,
                  chat_template: bool, desc: str | None = None) -> list[list[int]]:
    """New token ids per prompt, up to and including the first EOS (if one came)."""
    _check_kind(kind)
    check_can_generate(model)
    encoded = _encode_prompts(tokenizer, kind, prompts, chat_template)
    eos = _eos_ids(model, tokenizer)
    pad = _pad_id(tokenizer, eos)
    device = _device(model)
    out: list[list[int]] = [[] for _ in prompts]
    with _inference(model), _progress(len(prompts), desc) as bar:
        for idx in _batches([len(p) for p in encoded], batch_size):
            batch = [encoded[i] for i in idx]
            if kind == "causal":
                new = _greedy_causal(model, batch, max_new_tokens, eos, pad, device)
            else:
                new = _greedy_seq2seq(model, batch, max_new_tokens, eos, pad, device)
            for i, ids in zip(idx, new):
                out[i] = _until_eos(ids, eos)
            bar.update(len(idx))
    return out


def _greedy_causal(model, prompts: list[list[int]], max_new_tokens: int, eos: list[int], pad: int,
                   device) -> list[list[int]]:
    """Greedy decoding with the KV cache: the one causal decoding loop (ift.inference.generate), which chat and
    generate use too; a row leaves the batch once it emits EOS, so no step is spent on it."""
    from ift.inference.generate import Decoding, _decode_causal

    return _decode_causal(model, prompts, [max_new_tokens] * len(prompts), Decoding(max_new_tokens=max_new_tokens),
                          None, eos, pad, device, None)


def _greedy_seq2seq(model, prompts: list[list[int]], max_new_tokens: int, eos: list[int], pad: int,
                    device) -> list[list[int]]:
    """transformers' generate, greedy: the encoder runs once, the decoder's right side needs no padding tricks."""
    ids, mask = _pad(prompts, pad, left=False)
    gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         generation_config=_generation_config(model, max_new_tokens, eos, pad))
    return gen[:, 1:].tolist()  # the output starts with the decoder start token


def _until_eos(ids: list[int], eos: Sequence[int]) -> list[int]:
    for k, t in enumerate(ids):
        if t in eos:
            return ids[: k + 1]
    return ids


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model's (e.g. a chat template's end of turn)."""
    from ift.data.conversations import end_of_turn_token

    found: list[int] = []
    gen_cfg = getattr(_unwrap(model), "generation_config", None)
    turn = end_of_turn_token(tokenizer)  # a chat template's end of turn, e.g. ChatML set on a base model
    turn_id = tokenizer.convert_tokens_to_ids(turn) if turn else None
    for source in (tokenizer.eos_token_id, getattr(gen_cfg, "eos_token_id", None), turn_id):
        for t in source if isinstance(source, (list, tuple)) else [source]:
            if t is not None and t not in found:
                found.append(int(t))
    if not found:
        raise IftError("the tokenizer has no end-of-sequence token, so generation could never stop", None,
                       "set tokenizer.eos_token (and train with it) or evaluate with accuracy_mode: rank")
    return found


def _generation_config(model, max_new_tokens: int, eos: list[int], pad: int):
    from transformers import GenerationConfig

    base = _unwrap(model)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                  pad_token_id=pad, use_cache=True)
    start = getattr(base.config, "decoder_start_token_id", None)
    if base.config.is_encoder_decoder and start is not None:
        kwargs["decoder_start_token_id"] = start
    return GenerationConfig(**kwargs)


def check_can_generate(model) -> None:
    base = _unwrap(model)
    can = getattr(base, "can_generate", None)
    if not hasattr(model, "generate") or (callable(can) and not can()):
        raise IftError(f"this model ({type(base).__name__}) cannot generate text", None,
                       "load it with a language-modelling head (…ForCausalLM / …ForConditionalGeneration), or "
                       "use evaluation.accuracy_mode: rank without rouge in evaluation.metrics")


def _check_lm_head(model) -> None:
    get = getattr(_unwrap(model), "get_output_embeddings", None)
    if get is None or get() is None:
        raise IftError(f"this model ({type(_unwrap(model)).__name__}) has no language-modelling head, so it cannot "
                       "score answer choices", None, "load it as …ForCausalLM / …ForConditionalGeneration")


def _check_kind(kind: str) -> None:
    if kind not in ("causal", "seq2seq"):
        raise IftError(f"unknown model kind '{kind}'", None, "use 'causal' or 'seq2seq'")


# ---------------------------------------------------------------- evaluate


def evaluate(model, tokenizer, kind: str, rows, cfg: EvaluationConfig, *, chat_template: bool = False,
             accelerator=None, batch_size: int | None = None, limit: int | None = None,
             desc: str = "eval") -> tuple[dict, list[dict]]:
    """Accuracy / ROUGE over `rows` (prompt, completion, choices, source, template); metrics 0-1 and predictions.

    With an accelerator of several processes, each process scores a contiguous share of the rows and the
    predictions are gathered, so every process returns the same full result.
    """
    _check_kind(kind)
    rows = _as_rows(rows, limit, desc)
    _check_metrics(cfg)
    bs = batch_size or cfg.batch_size
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        from accelerate.utils import gather_object

        lo, hi = shard_range(len(rows), accelerator.num_processes, accelerator.process_index)
        local = _predict(accelerator.unwrap_model(model), tokenizer, kind, rows[lo:hi], cfg, chat_template, bs,
                         desc if accelerator.is_main_process else None, offset=lo)
        predictions = gather_object(local)
    else:
        predictions = _predict(model, tokenizer, kind, rows, cfg, chat_template, bs, desc)
    return summarize(predictions, cfg), predictions


def shard_range(n: int, num_processes: int, index: int) -> tuple[int, int]:
    """Contiguous share of n rows for process `index` (sizes differ by at most one), as accelerate splits."""
    per, extra = divmod(n, num_processes)
    start = index * per + min(index, extra)
    return start, start + per + (1 if index < extra else 0)


def _as_rows(rows, limit: int | None, desc: str) -> list[dict]:
    if rows is None:
        raise IftError(f"no rows to evaluate ({desc})", None, "check the data section of the recipe")
    if limit is not None and limit < len(rows):
        # evenly spread, not the first `limit`: splits are ordered by source, and every source should count
        keep = [round(i * (len(rows) - 1) / max(limit - 1, 1)) for i in range(limit)] if limit > 1 else [0]
        rows = rows.select(keep) if hasattr(rows, "select") else [rows[i] for i in keep]
    out = rows.to_list() if hasattr(rows, "to_list") else list(rows)
    if not out:
        raise IftError(f"the {desc} split is empty", None,
                       "give the source a non-empty split, or set data.validation_size / data.test_size")
    for i, r in enumerate(out):
        missing = [k for k in ("prompt", "completion") if k not in r]
        if missing:
            raise IftError(f"row {i} has no {', '.join(missing)}", desc,
                           "evaluation rows come from ift.data.prepare.build_splits (prompt, completion, choices, ...)")
    if not any(_target(r) for r in out):
        raise IftError(f"no row of the {desc} split has a target", None,
                       "evaluate a labeled split (test splits of some datasets, e.g. GLUE, are unlabeled)")
    return out


def _target(row: dict) -> str:
    return (row.get("completion") or "").strip()


def _check_metrics(cfg: EvaluationConfig) -> None:
    unknown = [m for m in cfg.metrics if m not in KNOWN_METRICS]
    if unknown:
        raise IftError(f"unknown metric(s) {', '.join(map(repr, unknown))}", "evaluation.metrics",
                       f"use any of {', '.join(KNOWN_METRICS)}")


def _predict(model, tokenizer, kind, rows: list[dict], cfg: EvaluationConfig, chat_template: bool,
             batch_size: int, desc: str | None, offset: int = 0) -> list[dict]:
    """One prediction dict per row with a target, in row order."""
    rows = [r for r in rows if _target(r)]
    want_acc, want_rouge = "accuracy" in cfg.metrics, "rouge" in cfg.metrics
    # conversations are answered, not ranked: the reply to the last user turn, given the history
    rank = [i for i, r in enumerate(rows)
            if want_acc and cfg.accuracy_mode in ("auto", "rank") and r.get("choices") and not r.get("messages")]
    ranked = set(rank)
    # Exact match on free-form targets (summaries) is meaningless; in auto mode with ROUGE asked for,
    # rows without choices are scored by ROUGE alone, so the headline accuracy stays a classification figure.
    exact = want_acc and (cfg.accuracy_mode == "generate" or (cfg.accuracy_mode == "auto" and not want_rouge))
    gen = [i for i in range(len(rows)) if i not in ranked and (exact or want_rouge or rows[i].get("messages"))]
    preds = [_blank_prediction(r) for r in rows]
    if gen:
        check_can_generate(model)  # before any scoring: fail fast
    if rank:
        gold = [_gold_index(rows[i], offset + i, desc) for i in rank]
        scores = score_choices(model, tokenizer, kind, [rows[i]["prompt"] for i in rank],
                               [list(rows[i]["choices"]) for i in rank], chat_template=chat_template,
                               batch_size=batch_size, desc=f"{desc}: choices" if desc else None)
        for i, g, sc in zip(rank, gold, scores):
            _fill_rank(preds[i], rows[i]["choices"], sc, g)
    if gen:
        texts = generate(model, tokenizer, kind, [_prompt(rows[i]) for i in gen],
                         max_new_tokens=cfg.max_new_tokens, batch_size=batch_size, chat_template=chat_template,
                         desc=f"{desc}: generate" if desc else None)
        for i, text in zip(gen, texts):
            p = preds[i]
            p["prediction"], p["mode"] = text, "generate"
            same = normalize_answer(text) == normalize_answer(p["target"])
            if exact:
                p["correct"] = same
            if rows[i].get("messages"):
                p["exact_match"] = same
    return preds


def _prompt(row: dict) -> str | list[dict]:
    """What the model answers: a template row's prompt, or a conversation's history up to its last user turn."""
    return [dict(m) for m in row["messages"][:-1]] if row.get("messages") else row["prompt"]


def _blank_prediction(row: dict) -> dict:
    out = {"prompt": row["prompt"], "target": row["completion"], "prediction": None, "correct": None,
           "correct_norm": None, "choice_scores": None, "mode": None,
           "source": row.get("source") or "", "template": row.get("template") or ""}
    if row.get("messages"):  # the history the model answered, saved with the prediction
        out["history"] = [dict(m) for m in row["messages"][:-1]]
    return out


def _gold_index(row: dict, index: int, desc: str | None) -> int:
    choices = list(row["choices"])
    target = row["completion"]
    # the exact text first, then the normalised one (e.g. "Positive." for "positive")
    for candidates, key in (([c.strip() for c in choices], target.strip()),
                            ([normalize_answer(c) for c in choices], normalize_answer(target))):
        if key in candidates:
            return candidates.index(key)
    raise IftError(f"the target {target!r} is not one of the answer choices {choices}",
                   f"{desc or 'eval'} row {index}, source {row.get('source')!r}, template {row.get('template')!r}",
                   "make the template's answer_choices contain its target, or set evaluation.accuracy_mode: generate")


def _fill_rank(pred: dict, choices: Sequence[str], scores: list[tuple[float, float]], gold: int) -> None:
    best = max(range(len(scores)), key=lambda k: scores[k][0])
    best_norm = max(range(len(scores)), key=lambda k: scores[k][1])
    pred.update(prediction=choices[best], correct=best == gold, correct_norm=best_norm == gold, mode="rank",
                choice_scores=[{"choice": c, "sum": s, "mean": m} for c, (s, m) in zip(choices, scores)])


def summarize(predictions: list[dict], cfg: EvaluationConfig) -> dict:
    """Totals plus the same figures per source and per template."""
    rouge_of: dict[int, dict[str, float]] = {}
    if "rouge" in cfg.metrics:
        gen = [i for i, p in enumerate(predictions) if p["mode"] == "generate"]
        if gen:
            pairs = _rouge_per_pair([predictions[i]["prediction"] for i in gen],
                                    [predictions[i]["target"] for i in gen], cfg.rouge_use_stemmer)
            rouge_of = {i: {k: pairs[k][n] for k in ROUGE_KEYS} for n, i in enumerate(gen)}
    everything = list(range(len(predictions)))
    metrics = _figures(predictions, everything, rouge_of)
    for key, name in (("source", "by_source"), ("template", "by_template")):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(predictions):
            groups[p[key]].append(i)
        metrics[name] = {g: _figures(predictions, idx, rouge_of) for g, idx in sorted(groups.items())}
    return metrics


def _figures(predictions: list[dict], idx: list[int], rouge_of: dict[int, dict[str, float]]) -> dict:
    out: dict[str, Any] = {}
    correct = [predictions[i]["correct"] for i in idx if predictions[i]["correct"] is not None]
    if correct:
        out["accuracy"] = sum(correct) / len(correct)
    norm = [predictions[i]["correct_norm"] for i in idx if predictions[i]["correct_norm"] is not None]
    if norm:
        out["accuracy_norm"] = sum(norm) / len(norm)
    exact = [predictions[i]["exact_match"] for i in idx if predictions[i].get("exact_match") is not None]
    if exact:
        out["exact_match"] = sum(exact) / len(exact)
    scored = [rouge_of[i] for i in idx if i in rouge_of]
    for k in ROUGE_KEYS if scored else ():
        out[k] = sum(s[k] for s in scored) / len(scored)
    out["n"] = len(idx)
    return out


# ---------------------------------------------------------------- files


def write_predictions(path: str | Path, predictions: Iterable[dict]) -> None:
    """One JSON object per line, written to a temporary file and renamed into place."""
    lines = [json.dumps(p, ensure_ascii=False, default=float) + "\n" for p in predictions]
    atomic.write_text(path, "".join(lines))


def compare_table(base: dict, tuned: dict) -> list[dict]:
    """Rows (metric, base, fine-tuned, delta) for the metrics either side has; None where one is missing."""
    rows = []
    for name in COMPARED:
        b, t = base.get(name), tuned.get(name)
        if b is None and t is None:
            continue
        rows.append({"metric": name, "base": b, "fine-tuned": t,
                     "delta": (t - b) if (b is not None and t is not None) else None})
    return rows
