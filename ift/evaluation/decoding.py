"""The one decoding engine: evaluation's greedy generation and the sampling / streaming decoding of chat and generate.

    [out] = decode(model, tokenizer, "causal", [prompt_ids], Decoding(max_new_tokens=64))
    texts = generate(model, tokenizer, "causal", ["Headline: profits up. Sentiment:"], max_new_tokens=8)

Decoding: ift's own KV-cache loop (`shared_prefill`: left padding, position ids from the mask, a prefix shared by the
batch run once; finished rows leave the batch), with greedy picking or sampling (temperature, top-p) and a
per-token callback for streaming. Measured against transformers' `generate` on the same batches
(bench/eval_throughput.py --decode-paths, docs/benchmarks.md), it is faster and gives the same tokens, so it
stays the single causal path; `decode` greedy equals `generate` token for token. Seq2seq models decode through
transformers' `generate`, with a streamer for `decode`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

from ift.data.encoding import encode_pairs, pad_id, pad_rows
from ift.errors import IftError
from ift.evaluation.forward import (length_batches, check_kind, check_prompt, model_device, inference_mode,
                                     shared_prefill, row_progress, returned_cache, select_cache_rows, unwrap_peft, cache_argument)

DEFAULT_MAX_NEW_TOKENS = 256


# ---------------------------------------------------------------- decoding options


@dataclass(frozen=True)
class Decoding:
    """How tokens are picked: greedy (temperature 0, the default) or sampled with temperature and top-p."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise IftError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}", "--max-new-tokens",
                           "give a whole number >= 1")
        if self.temperature < 0:
            raise IftError(f"temperature must be >= 0, got {self.temperature}", "--temperature",
                           "use 0 for greedy decoding, or e.g. 0.7 to sample")
        if not 0 < self.top_p <= 1:
            raise IftError(f"top_p must be in (0, 1], got {self.top_p}", "--top-p", "e.g. --top-p 0.9 (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """New token ids (up to and including the first end-of-sequence token) and why decoding stopped."""

    ids: list[int]
    finish_reason: str  # "stop" (an end-of-sequence token) or "length" (max_new_tokens or the context)


# ---------------------------------------------------------------- greedy generation (evaluation)


def _encode_prompts(tokenizer, kind: str, prompts: Sequence[str | list[dict]], chat_template: bool,
                    tools: Sequence[list[dict] | None] | None = None) -> list[list[int]]:
    """Prompt ids exactly as training put them before the completion. A prompt that is a list of messages is a
    conversation's history: rendered in the tokenizer's chat template with the generation prompt, and with
    `tools[i]` (its function schemas) where given, as inference renders a prompt with tools."""
    from ift.data.conversations import history_ids
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    pairs = encode_pairs(tokenizer, kind, [prompts[i] for i in texts], [""] * len(texts), chat_template=chat_template,
                         add_eos=False) if texts else []
    out: list[list[int]] = [[] for _ in prompts]
    for i, (p, _) in zip(texts, pairs):
        out[i] = p
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            out[i] = history_ids(tokenizer, p, tools[i] if tools else None)
    for i, p in enumerate(out):
        check_prompt(p, i)
    return out


def generate(model, tokenizer, kind: str, prompts: list[str | list[dict]], *, max_new_tokens: int, batch_size: int = 16,
             chat_template: bool = False, desc: str | None = None,
             tools: Sequence[list[dict] | None] | None = None) -> list[str]:
    """Greedy continuations (new tokens only, special tokens skipped, stripped), batched with left padding.
    tools: per prompt, the function schemas a conversation's history is rendered with (None: none)."""
    ids = _generate_ids(model, tokenizer, kind, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        chat_template=chat_template, desc=desc, tools=tools)
    return [text_of(tokenizer, t) for t in ids]


def _generate_ids(model, tokenizer, kind: str, prompts: Sequence[str | list[dict]], *, max_new_tokens: int, batch_size: int,
                  chat_template: bool, desc: str | None = None,
                  tools: Sequence[list[dict] | None] | None = None) -> list[list[int]]:
    """New token ids per prompt, up to and including the first EOS (if one came)."""
    check_kind(kind)
    check_can_generate(model)
    encoded = _encode_prompts(tokenizer, kind, prompts, chat_template, tools)
    eos = _eos_ids(model, tokenizer)
    pad = pad_id(tokenizer, eos)
    device = model_device(model)
    out: list[list[int]] = [[] for _ in prompts]
    with inference_mode(model), row_progress(len(prompts), desc) as bar:
        for idx in length_batches([len(p) for p in encoded], batch_size):
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
    """Greedy decoding with the KV cache: the one causal decoding loop (`_decode_causal`), which chat and
    generate use too; a row leaves the batch once it emits EOS, so no step is spent on it."""
    return _decode_causal(model, prompts, [max_new_tokens] * len(prompts), Decoding(max_new_tokens=max_new_tokens),
                          None, eos, pad, device, None)


def _greedy_seq2seq(model, prompts: list[list[int]], max_new_tokens: int, eos: list[int], pad: int,
                    device) -> list[list[int]]:
    """transformers' generate, greedy: the encoder runs once, the decoder's right side needs no padding tricks."""
    ids, mask = pad_rows(prompts, pad, left=False)
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
    from ift.data.chat_templates import end_of_turn_token
    found: list[int] = []
    gen_cfg = getattr(unwrap_peft(model), "generation_config", None)
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

    base = unwrap_peft(model)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                  pad_token_id=pad, use_cache=True)
    start = getattr(base.config, "decoder_start_token_id", None)
    if base.config.is_encoder_decoder and start is not None:
        kwargs["decoder_start_token_id"] = start
    return GenerationConfig(**kwargs)


def check_can_generate(model) -> None:
    base = unwrap_peft(model)
    can = getattr(base, "can_generate", None)
    if not hasattr(model, "generate") or (callable(can) and not can()):
        raise IftError(f"this model ({type(base).__name__}) cannot generate text", None,
                       "load it with a language-modelling head (…ForCausalLM / …ForConditionalGeneration), or "
                       "use evaluation.accuracy_mode: rank without rouge in evaluation.metrics")


# ---------------------------------------------------------------- decoding with options (chat, generate)


def stop_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model's generation config's (end of turn)."""
    return _eos_ids(model, tokenizer)


def decode(model, tokenizer, kind: str, prompts: Sequence[Sequence[int]], decoding: Decoding = Decoding(), *,
           batch_size: int = 16, on_token: Callable[[int, int], None] | None = None,
           progress: Callable[[int], None] | None = None) -> list[Generation]:
    """New tokens for each prompt (token ids), batched by length with left padding and a KV cache.

    on_token(prompt_index, token_id) is called for every new token as soon as it is chosen (streaming);
    progress(n) after each finished batch of n prompts.
    """
    import torch

    check_can_generate(model)
    check_kind(kind)
    eos = stop_ids(model, tokenizer)
    pad = pad_id(tokenizer, eos)
    device = model_device(model)
    generator = None
    if not decoding.greedy:
        generator = torch.Generator()
        if decoding.seed is None:
            generator.seed()
        else:
            generator.manual_seed(decoding.seed)
    limit = context_limit(model)
    out: list[Generation | None] = [None] * len(prompts)
    with inference_mode(model):
        for idx in length_batches([len(p) for p in prompts], batch_size):
            batch = [list(prompts[i]) for i in idx]
            if kind == "causal":
                budgets = [_budget(len(p), decoding.max_new_tokens, limit) for p in batch]
                new = _decode_causal(model, batch, budgets, decoding, generator, eos, pad, device,
                                     (lambda r, t, idx=idx: on_token(idx[r], t)) if on_token else None)
            else:
                new = _decode_seq2seq(model, tokenizer, batch, decoding, eos, pad, device,
                                      (lambda r, t, idx=idx: on_token(idx[r], t)) if on_token else None)
            for i, ids in zip(idx, new):
                ids = _until_eos(ids, eos)
                out[i] = Generation(ids, "stop" if ids and ids[-1] in eos else "length")
            if progress:
                progress(len(idx))
    return out  # type: ignore[return-value]


def context_limit(model) -> int | None:
    value = getattr(unwrap_peft(model).config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _budget(prompt_len: int, max_new: int, limit: int | None) -> int:
    """New tokens a prompt may get: max_new, fewer where the model's context ends first (at least one)."""
    if limit is None:
        return max_new
    return max(1, min(max_new, limit - prompt_len))


def _pick(logits, decoding: Decoding, generator):
    """Next token per row: argmax (greedy), or a draw from the temperature-scaled top-p distribution (on the CPU,
    so a seed gives the same draws on every device)."""
    import torch

    if decoding.greedy:
        return logits.argmax(-1).cpu()
    probs = torch.softmax(logits.float().cpu() / decoding.temperature, dim=-1)
    if decoding.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= decoding.top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _decode_causal(model, prompts: list[list[int]], budgets: list[int], decoding: Decoding, generator,
                   eos: list[int], pad: int, device, on_token) -> list[list[int]]:
    """ift's KV-cache loop (`shared_prefill`, cache handling and stopping; evaluation's greedy decoding runs it too) with a
    token picker and a callback; a row leaves the batch once it emits EOS or spends its budget."""
    import torch

    logits, cache, mask = shared_prefill(model, prompts, pad, device)
    out: list[list[int]] = [[] for _ in prompts]
    alive = torch.arange(len(prompts))  # batch row -> prompt index
    pos = mask.sum(-1)  # the next token's position in each row
    left = torch.tensor(budgets)
    stop = torch.tensor(eos)
    for _ in range(max(budgets)):
        nxt = _pick(logits, decoding, generator)
        for r, i in enumerate(alive.tolist()):
            out[i].append(int(nxt[r]))
            if on_token is not None:
                on_token(i, int(nxt[r]))
        left = left - 1
        going = ~torch.isin(nxt, stop) & (left > 0)
        if not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(1)
            alive, nxt, pos, mask, left = alive[keep], nxt[keep], pos[keep], mask[keep], left[keep]
            cache = select_cache_rows(cache, keep.to(device))
        mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype)], dim=1)
        step = model(input_ids=nxt.unsqueeze(1).to(device), attention_mask=mask.to(device),
                     position_ids=pos.unsqueeze(1).to(device), **cache_argument(model, cache), use_cache=True)
        logits, cache, pos = step.logits[:, -1].float(), returned_cache(step), pos + 1
    return out


def _decode_seq2seq(model, tokenizer, prompts: list[list[int]], decoding: Decoding, eos: list[int], pad: int,
                    device, on_token) -> list[list[int]]:
    """transformers' generate (as `_greedy_seq2seq` decodes seq2seq models for evaluation), the model's generation
    config with ift's decoding options; streamed through a BaseStreamer."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    base = unwrap_peft(model)
    config = copy.deepcopy(base.generation_config)
    config.update(max_new_tokens=decoding.max_new_tokens, do_sample=not decoding.greedy, num_beams=1,
                  eos_token_id=eos, pad_token_id=pad, use_cache=True,
                  temperature=decoding.temperature if not decoding.greedy else None,
                  top_p=decoding.top_p if not decoding.greedy else None, top_k=None)
    start = getattr(base.config, "decoder_start_token_id", None)
    if start is not None:
        config.decoder_start_token_id = start

    class Stream(BaseStreamer):
        first = True

        def put(self, value):
            if self.first:  # the decoder start tokens
                self.first = False
                return
            for r, t in enumerate(value.reshape(len(prompts), -1)[:, -1].tolist()):
                on_token(r, int(t))

        def end(self):
            pass

    if decoding.seed is not None:
        torch.manual_seed(decoding.seed)
    ids, mask = pad_rows(prompts, pad, left=False)
    gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                         streamer=Stream() if on_token is not None else None)
    return gen[:, 1:].tolist()  # the output starts with the decoder start token


def text_of(tokenizer, ids: Sequence[int]) -> str:
    """An answer's text as evaluation reads it: special tokens skipped, surrounding whitespace stripped."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()
