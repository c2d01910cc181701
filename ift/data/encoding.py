"""How a prompt/completion pair becomes token ids — the one definition training and evaluation share.

Loss masks come from token spans: the prompt's tokens are those of the prompt tokenized alone, the
completion's tokens are what follows them in prompt+completion (one pass over prompt and rest, joined,
where that is provably the same, see `_split_at_prompt`). Never a search for a response marker, never
a mask of every pad-id token (that would also hide the real EOS when pad == eos).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

if TYPE_CHECKING:  # annotations only: the ignore index and Kind are imported by light modules too
    from transformers import PreTrainedTokenizerBase

Kind = Literal["causal", "seq2seq"]
IGNORE = -100  # the label of a position that carries no loss (PyTorch's cross-entropy ignore_index)


def join(prompt: str, completion: str) -> str:
    """Prompt and completion as one text: promptsource strips both, so a space keeps words apart."""
    if not prompt or prompt[-1].isspace() or not completion or completion[0].isspace():
        return prompt + completion
    return prompt + " " + completion


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The prompt as a user turn, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def chat_full(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> str:
    """User turn + assistant turn, including the template's closing tokens (they carry loss)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
    )


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str, chat_template: bool) -> str:
    """The text a model is given at generation time: the same prefix training used."""
    return chat_prompt(tokenizer, prompt) if chat_template else prompt


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    kind: Kind,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    chat_template: bool = False,
    add_eos: bool = True,
) -> list[tuple[list[int], list[int]]]:
    """Token ids (prompt, completion) for each pair; batched so the fast tokenizer runs in parallel.

    causal: prompt ids + completion ids form the model input; the completion ends with EOS.
    seq2seq: prompt ids are the encoder input; completion ids are the labels (tokenizer adds EOS).
    """
    if kind == "seq2seq":
        enc = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        dec = tokenizer(text_target=list(completions), add_special_tokens=True)["input_ids"]
        eos = tokenizer.eos_token_id
        if add_eos and eos is not None:  # T5 tokenizers append EOS; others may not
            dec = [d if d and d[-1] == eos else d + [eos] for d in dec]
        elif not add_eos:
            dec = [d[:-1] if d and d[-1] == eos else d for d in dec]
        return list(zip(enc, dec))

    if chat_template:
        p_texts = [chat_prompt(tokenizer, p) for p in prompts]
        f_texts = [chat_full(tokenizer, p, c) for p, c in zip(prompts, completions)]
        # chat templates carry their own BOS; adding special tokens again would double it
        special = False
    else:
        p_texts = list(prompts)
        f_texts = [join(p, c) for p, c in zip(prompts, completions)]
        special = True
    eos = tokenizer.eos_token_id
    if not _one_pass_exact(tokenizer, special):  # prompt tokens not provably those of the full text
        pairs = _two_passes(tokenizer, p_texts, f_texts, completions, special)
    else:
        pairs = _split_at_prompt(tokenizer, p_texts, f_texts, completions, special)
    out = []
    for p, c in pairs:
        if chat_template and eos is not None and eos in c:
            pass  # the template closed the turn with EOS already (maybe followed by "\n", as ChatML does)
        elif add_eos and eos is not None and (not c or c[-1] != eos):
            c = c + [eos]
        if not add_eos and c and eos is not None and c[-1] == eos and not chat_template:
            c = c[:-1]
        out.append((p, c))
    return out


# One tokenizer pass per row (causal): the prompt and the rest of the full text are tokenized apart, each
# character once, and the full text's ids are the two joined. That equals tokenizing the full text only when
# (1) the tokenizer adds special tokens at the start only, (2) nothing rewrites text across the boundary (no
# normalizer, no added token that strips spaces or holds whitespace and so could span the boundary, no BPE
# dropout), and (3) the pre-tokenizer splits the full text at the boundary into the same pieces as the prompt
# alone and the rest alone. (3) is proven for GPT-2's byte-level regex (SmolLM2 and the test tokenizer use it with
# no post-processor that rewrites; GPT-2 itself ships a ByteLevel post-processor and takes two passes):
# `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, each piece a run of one class
# (plus one leading " "), so
#   A. the prompt ends in a non-space and the rest starts with " ", "\t", "\n" or "\r" (plain `join`): every
#      run stops at that whitespace in both texts, and only whitespace continues from there;
#   B. the prompt ends in one "\n"/"\t"/"\r" after a non-space, the rest starts with a non-space (a chat
#      template's "assistant\n"): that character is the piece `\s+(?!\S)` alone, `\s+` in context.
# BPE merges never cross pieces, so the ids join. Anything else ("Answer: " + "yes" merges into " yes"; "\n\n"
# alone is one piece, two in context) and any other tokenizer take two passes (prompt alone, full text).
# Python's isspace() holds for every Unicode White_Space character the regex's \s matches, so the checks
# below only ever err towards two passes. No offsets are asked for: reading them cost more than the encoding.
_WS = " \t\n\r"


def _one_pass_exact(tokenizer: PreTrainedTokenizerBase, special: bool) -> bool:
    """Whether prompt and rest tokenized apart give the full text's ids (on rows with a clean boundary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None or not hasattr(backend, "encode_batch_fast"):
        return False
    try:
        from tokenizers import models, pre_tokenizers, processors

        pre, post, model = backend.pre_tokenizer, backend.post_processor, backend.model
        if not (isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex and not pre.add_prefix_space):
            return False
        if not (isinstance(model, models.BPE) and not model.dropout):
            return False
        if post is not None and not isinstance(post, processors.TemplateProcessing):
            return False  # e.g. a ByteLevel post-processor that trims offsets
        for t in backend.get_added_tokens_decoder().values():
            if t.lstrip or t.rstrip or t.single_word or any(ch.isspace() for ch in t.content):
                return False
    except (ImportError, AttributeError):
        return False
    # a plain call also clears truncation or padding a caller left on the shared backend
    head = tokenizer("", add_special_tokens=special)["input_ids"]
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    if tokenizer("a b", add_special_tokens=special)["input_ids"] != head + plain:
        return False  # special tokens after the text (an appended EOS): two passes handle those
    return backend.truncation is None and backend.padding is None


def _clean_boundary(p_text: str, f_text: str) -> bool:
    """Whether the full text splits at the prompt's end exactly as prompt and rest split alone (rules A and B)."""
    n = len(p_text)
    if not f_text.startswith(p_text):
        return False
    if n == 0 or n == len(f_text):
        return True
    last, nxt = p_text[-1], f_text[n]
    rule_a = not last.isspace() and nxt in _WS
    rule_b = last in "\t\n\r" and (n == 1 or not p_text[-2].isspace()) and not nxt.isspace()
    return rule_a or rule_b


def _split_at_prompt(
    tokenizer: PreTrainedTokenizerBase, p_texts: list[str], f_texts: list[str], completions: Sequence[str],
    special: bool,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, rest ids) per row: one pass over prompt and rest where the boundary is clean, else two."""
    backend = tokenizer.backend_tokenizer
    clean = [i for i, (p, f) in enumerate(zip(p_texts, f_texts)) if _clean_boundary(p, f)]
    heads = backend.encode_batch_fast([p_texts[i] for i in clean], add_special_tokens=special)
    rests = backend.encode_batch_fast([f_texts[i][len(p_texts[i]):] for i in clean], add_special_tokens=False)
    pairs: list[Any] = [None] * len(p_texts)
    for i, h, r in zip(clean, heads, rests):
        pairs[i] = (h.ids, r.ids)
    doubtful = [i for i, pair in enumerate(pairs) if pair is None]
    if doubtful:  # only these rows pay for tokenizing the prompt alone and the full text
        two = _two_passes(tokenizer, [p_texts[i] for i in doubtful], [f_texts[i] for i in doubtful],
                          [completions[i] for i in doubtful], special)
        for i, pair in zip(doubtful, two):
            pairs[i] = pair
    return pairs


def _two_passes(
    tokenizer: PreTrainedTokenizerBase, p_texts: list[str], f_texts: list[str], completions: Sequence[str],
    special: bool,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, rest ids) per row from the prompt tokenized alone and the full text tokenized whole."""
    p_ids = tokenizer(p_texts, add_special_tokens=special)["input_ids"]
    f_ids = tokenizer(f_texts, add_special_tokens=special)["input_ids"]
    eos = tokenizer.eos_token_id
    pairs = []
    for i, (p, f) in enumerate(zip(p_ids, f_ids)):
        if f[: len(p)] == p:
            c = f[len(p):]
        else:
            # A token merged across the boundary (e.g. "Answer:" + " yes"): keep the prompt's own
            # tokenization and encode the rest alone, so prompt ids stay identical at inference.
            rest = f_texts[i][len(p_texts[i]):] if f_texts[i].startswith(p_texts[i]) else completions[i]
            c = tokenizer(rest, add_special_tokens=False)["input_ids"]
            # a tokenizer that appends EOS itself would put it in the middle otherwise
            if p and eos is not None and p[-1] == eos and not special:
                p = p[:-1]
        pairs.append((p, c))
    return pairs


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    kind: Kind,
    prompt: str,
    completion: str,
    *,
    chat_template: bool = False,
    add_eos: bool = True,
) -> tuple[list[int], list[int]]:
    return encode_pairs(tokenizer, kind, [prompt], [completion], chat_template=chat_template, add_eos=add_eos)[0]


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all of `seqs` share (a prompt and its chat frame; a batch of prompts)."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for k in range(n):
        if any(s[k] != first[k] for s in seqs):
            return k
    return n


def pad_id(tokenizer: Any, eos_ids: Sequence[int] | None = None) -> int:
    """The id padding is written with (never attended, never in a loss): the pad token, else the first
    end-of-sequence id (`eos_ids`, default the tokenizer's eos), else 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if eos_ids is None:
        eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return int(eos_ids[0]) if eos_ids else 0


def pad_rows(rows: Sequence[Sequence[int]], value: int, *, width: int | None = None, left: bool = False) -> tuple[Any, Any]:
    """Id lists -> (ids, mask) LongTensors of `width` columns (default the longest row), padded with `value` on
    the right (training, scoring) or the left (generation); mask is 1 on the rows' own tokens."""
    import torch

    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not len(row):
            continue
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols] = torch.tensor(list(row), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask
