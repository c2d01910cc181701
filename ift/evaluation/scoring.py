"""Rank classification: the log-likelihood of every answer choice given its prompt, each prompt run once.

Choices are scored WITHOUT the end-of-sequence token (and, with a chat template, without the tokens that
close the assistant turn), as T0 did: the score is log p(choice tokens | prompt), summed over the choice's
tokens ("accuracy") and divided by their number ("accuracy_norm").

Causal models: one forward pass per batch of prompts scores every choice of every prompt. Each row holds its
prompt followed by all its choices (each without its last token), and a 4-D attention mask lets every choice
token see the prompt and the earlier tokens of its own choice only, with position ids that continue from the
prompt, so each choice is scored as if it followed the prompt alone. The last prompt position gives every
choice's first token; the LM head runs on the rows' last positions only. A prefix all prompts of a batch share
(a chat system prompt, an instruction) runs once, and its KV cache is copied to every row. Where a custom mask
cannot stand for the model's own (flash or flex attention, recurrent or chunked layers, a sliding window shorter
than the rows, remote code), the prompts are prefilled with the KV cache on and the choice tokens after the first
continue from a copy of it, one row per choice. Seq2seq: the encoder runs once per prompt and the decoder scores
every choice. Position ids follow the attention mask, so scores do not depend on batch size or padding.
Log-probabilities are computed only where a choice token is predicted.
"""

from __future__ import annotations

from typing import Sequence

from ift.data.encoding import common_prefix, encode_pairs, pad_id, pad_rows
from ift.errors import IftError
from ift.evaluation.forward import (MIN_SHARED_PREFIX, accepts_argument, length_batches, check_kind, check_prompt, model_device,
                                     inference_mode, shared_prefill, row_progress, returned_cache, select_cache_rows, unwrap_peft,
                                     cache_argument)

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
        check_prompt(prompt_ids, i)
        out.append((prompt_ids, ids))
    return out


# ---------------------------------------------------------------- rank scoring


def score_choices(model, tokenizer, kind: str, prompts: list[str], choices: list[list[str]], *,
                  chat_template: bool = False, batch_size: int = 16,
                  desc: str | None = None) -> list[list[tuple[float, float]]]:
    """(summed log-prob, mean log-prob per token) of every choice given its prompt; independent of batch size."""
    check_kind(kind)
    if len(prompts) != len(choices):
        raise IftError(f"{len(prompts)} prompts but {len(choices)} choice lists", None, "pass one list per prompt")
    _check_lm_head(model)
    encoded = _encode_choices(tokenizer, kind, prompts, choices, chat_template)
    pad = pad_id(tokenizer, [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    with inference_mode(model), row_progress(len(encoded), desc) as bar:
        if kind == "seq2seq":
            sums = _score_seq2seq(model, encoded, batch_size, pad, bar)
        else:
            sums = _score_causal(model, encoded, batch_size, pad, bar)
    return [[(s, s / len(c)) for s, c in zip(row, cs)] for row, (_, cs) in zip(sums, encoded)]


def _score_causal(model, encoded, batch_size: int, pad: int, bar) -> list[list[float]]:
    device = model_device(model)
    sums: list[list[float]] = [[0.0] * len(cs) for _, cs in encoded]
    for idx in length_batches([len(p) for p, _ in encoded], batch_size, [bool(cs) for _, cs in encoded]):
        batch = [encoded[i] for i in idx]
        longest = max(len(p) + sum(len(c) - 1 for c in cs) for p, cs in batch)
        scored = (_score_packed(model, batch, pad, device) if packable(model, longest)
                  else _score_continued(model, batch, batch_size, pad, device))
        for i, row in zip(idx, scored):
            sums[i] = row
        bar.update(len(idx))
    return sums


def packable(model, length: int) -> bool:
    """Whether a custom 4-D attention mask over rows of `length` positions means what the model's own mask would:
    transformers' code (not remote code), sdpa or eager attention (flash and flex take no such mask), full
    attention in every layer, or a sliding window no shorter than the rows."""
    base = unwrap_peft(model)
    config = base.config
    if not type(base).__module__.startswith("transformers.") or config.is_encoder_decoder:
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager") or not accepts_argument(model, "position_ids"):
        return False
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:  # linear, recurrent, chunked layers
        return False
    window = getattr(config, "sliding_window", None)
    slides = "sliding_attention" in kinds or (window is not None and getattr(config, "use_sliding_window", True))
    return not slides or (window is not None and length <= window)


def _score_packed(model, batch, pad: int, device) -> list[list[float]]:
    """Every choice of every prompt in one forward pass: a row is the prompt, then each choice but its last token,
    each choice seeing only the prompt and itself (see the module docstring)."""
    import torch

    n = len(batch)
    shared = min(common_prefix([p for p, _ in batch]), min(len(p) for p, _ in batch) - 1) if n > 1 else 0
    cache = None
    if shared >= MIN_SHARED_PREFIX:  # the batch's common prefix runs once; its cache is copied to every row
        head = torch.tensor([list(batch[0][0][:shared])], device=device)
        out = model(input_ids=head, attention_mask=torch.ones_like(head),
                    position_ids=torch.arange(shared, device=device).unsqueeze(0), use_cache=True,
                    **({"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}))
        cache = select_cache_rows(returned_cache(out), torch.zeros(n, dtype=torch.long, device=device))
    else:
        shared = 0
    ids, pos, seg = [], [], []  # seg: -1 the prompt, j the j-th choice's tokens
    for p, cs in batch:
        ids.append(list(p[shared:]))
        pos.append(list(range(shared, len(p))))
        seg.append([-1] * (len(p) - shared))
        for j, c in enumerate(cs):
            ids[-1] += c[:-1]
            pos[-1] += range(len(p), len(p) + len(c) - 1)
            seg[-1] += [j] * (len(c) - 1)
    input_ids, real = pad_rows(ids, pad, left=True)
    positions, _ = pad_rows(pos, 0, left=True)
    segments, _ = pad_rows(seg, -2, left=True)
    width = input_ids.shape[1]
    real = real.bool()
    sees = (real[:, None, :] & real[:, :, None] & (positions[:, None, :] <= positions[:, :, None])
            & ((segments[:, None, :] == -1) | (segments[:, None, :] == segments[:, :, None])))
    sees |= torch.eye(width, dtype=torch.bool)  # a padding row sees itself: no row of the softmax is empty
    sees = torch.cat([torch.ones((n, width, shared), dtype=torch.bool), sees], dim=2).unsqueeze(1)
    if unwrap_peft(model).config._attn_implementation == "eager":  # eager adds the mask to the scores
        dtype = unwrap_peft(model).get_input_embeddings().weight.dtype
        sees = torch.zeros(sees.shape, dtype=dtype).masked_fill_(~sees, torch.finfo(dtype).min)
    # the LM head runs on the last `keep` positions: every row's last prompt token and its choice tokens
    keep = max(1 + sum(len(c) - 1 for c in cs) for _, cs in batch)
    kwargs = {"logits_to_keep": keep} if accepts_argument(model, "logits_to_keep") else {}
    if cache is not None:
        kwargs.update(cache_argument(model, cache))
    out = model(input_ids=input_ids.to(device), attention_mask=sees.to(device), position_ids=positions.to(device),
                use_cache=cache is not None, **kwargs)
    logp = out.logits[:, -keep:].float().log_softmax(-1)
    rows, cols, targets, slots = [], [], [], []
    for b, (_, cs) in enumerate(batch):
        col = keep - (1 + sum(len(c) - 1 for c in cs))  # the last prompt token, within the kept positions
        after = col  # the column before choice j's first continuation token
        for j, c in enumerate(cs):
            for t, tok in enumerate(c):
                rows.append(b)
                cols.append(col if t == 0 else after + t)
                targets.append(tok)
                slots.append((b, j))
            after += len(c) - 1
    lp = logp[torch.tensor(rows, device=logp.device), torch.tensor(cols, device=logp.device),
              torch.tensor(targets, device=logp.device)].double().tolist()
    sums: list[list[float]] = [[0.0] * len(cs) for _, cs in batch]
    for (b, j), v in zip(slots, lp):
        sums[b][j] += v
    return sums


def _score_continued(model, batch, batch_size: int, pad: int, device) -> list[list[float]]:
    """The prompts prefilled with the KV cache on; choice tokens after the first continue from a copy of it."""
    sums: list[list[float]] = [[0.0] * len(cs) for _, cs in batch]
    last, cache, mask = shared_prefill(model, [p for p, _ in batch], pad, device)
    first = last.log_softmax(-1)  # next-token distribution after each prompt
    items = [(b, j, c) for b, (_, cs) in enumerate(batch) for j, c in enumerate(cs)]
    for b, j, c in items:
        sums[b][j] = float(first[b, c[0]])
    rest = [it for it in items if len(it[2]) > 1]
    step = max(1, batch_size * CHOICES_PER_PROMPT)
    for start in range(0, len(rest), step):
        chunk = rest[start:start + step]
        more = _continue_choices(model, cache, mask, chunk, pad, device)
        for (b, j, _), extra in zip(chunk, more.tolist()):
            sums[b][j] += extra
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
                position_ids=pos.to(device), **cache_argument(model, select_cache_rows(cache, rows.to(device))),
                use_cache=True)
    return _choice_logprobs(out.logits, targets.to(device), tmask.to(device)).cpu()


def _score_seq2seq(model, encoded, batch_size: int, pad: int, bar) -> list[list[float]]:
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    device = model_device(model)
    config = unwrap_peft(model).config
    start_id = config.decoder_start_token_id if config.decoder_start_token_id is not None else pad
    encoder = model.get_encoder()
    sums: list[list[float]] = [[0.0] * len(cs) for _, cs in encoded]
    for idx in length_batches([len(p) for p, _ in encoded], batch_size, [bool(cs) for _, cs in encoded]):
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
    get = getattr(unwrap_peft(model), "get_output_embeddings", None)
    if get is None or get() is None:
        raise IftError(f"this model ({type(unwrap_peft(model)).__name__}) has no language-modelling head, so it cannot "
                       "score answer choices", None, "load it as …ForCausalLM / …ForConditionalGeneration")


