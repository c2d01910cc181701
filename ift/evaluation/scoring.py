"""Rank classification: the log-likelihood of every answer choice given its prompt, each prompt run once.

Choices are scored WITHOUT the end-of-sequence token (and, with a chat template, without the tokens that
close the assistant turn), as T0 did: the score is log p(choice tokens | prompt), summed over the choice's
tokens ("accuracy") and divided by their number ("accuracy_norm").

Causal models: the left-padded prompts go through the model with the KV cache on (`_prefill`: a prefix all
prompts of a batch share runs once), the last prompt position gives every choice's first token, and the
remaining choice tokens continue from a copy of the cache (one row per choice). Seq2seq: the encoder runs
once per prompt and the decoder scores every choice. Position ids follow the attention mask, so scores do not
depend on batch size or padding. Log-probabilities are computed only where a choice token is predicted.
"""

from __future__ import annotations

from typing import Sequence

from ift.data.encoding import encode_pairs, pad_id, pad_rows
from ift.errors import IftError
from ift.evaluation.plumbing import (_batches, _check_kind, _check_prompt, _device, _inference,
                                     _prefill, _progress, _select_cache, _unwrap, _with_cache)

# Continuation rows per forward pass, as a multiple of the prompt batch: each row holds a copy of its
# prompt's KV cache, so this bounds memory at a few times that of the prompt pass.
CHOICES_PER_PROMPT = 4


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
    pad = pad_id(tokenizer, [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    with _inference(model), _progress(len(encoded), desc) as bar:
        if kind == "seq2seq":
            sums = _score_seq2seq(model, encoded, batch_size, pad, bar)
        else:
            sums = _score_causal(model, encoded, batch_size, pad, bar)
    return [[(s, s / len(c)) for s, c in zip(row, cs)] for row, (_, cs) in zip(sums, encoded)]


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
    cont_ids, cont_mask = pad_rows([c[:-1] for _, _, c in chunk], pad, left=False)
    targets, tmask = pad_rows([c[1:] for _, _, c in chunk], 0, left=False)
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
        ids, mask = pad_rows([encoded[i][0] for i in idx], pad, left=False)
        hidden = encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        items = [(b, j, c) for b, i in enumerate(idx) for j, c in enumerate(encoded[i][1])]
        step = max(1, batch_size * CHOICES_PER_PROMPT)
        for s in range(0, len(items), step):
            chunk = items[s:s + step]
            rows = torch.tensor([b for b, _, _ in chunk], dtype=torch.long, device=device)
            dec_ids, dec_mask = pad_rows([[start_id] + c[:-1] for _, _, c in chunk], pad, left=False)
            targets, tmask = pad_rows([c for _, _, c in chunk], 0, left=False)
            out = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden.index_select(0, rows)),
                        attention_mask=mask.to(device).index_select(0, rows), decoder_input_ids=dec_ids.to(device),
                        decoder_attention_mask=dec_mask.to(device), use_cache=False)
            lp = _choice_logprobs(out.logits, targets.to(device), tmask.to(device)).tolist()
            for (b, j, _), v in zip(chunk, lp):
                sums[idx[b]][j] = v
        bar.update(len(idx))
    return sums


def _choice_logprobs(logits, targets, mask):
    """Per row, the summed log-probability of `targets` where `mask` is set; log-softmax only there."""
    import torch

    sel = mask.bool()
    picked = logits[sel].float()  # [M, V]: choice positions only
    lp = picked.gather(-1, targets[sel].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1).expand_as(sel)[sel]
    return torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device).index_add_(0, rows, lp.double())


def _check_lm_head(model) -> None:
    get = getattr(_unwrap(model), "get_output_embeddings", None)
    if get is None or get() is None:
        raise IftError(f"this model ({type(_unwrap(model)).__name__}) has no language-modelling head, so it cannot "
                       "score answer choices", None, "load it as …ForCausalLM / …ForConditionalGeneration")


