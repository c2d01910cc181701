"""How a prompt/completion pair becomes token ids — the one definition training and evaluation share.

Loss masks come from token spans: the prompt is tokenized alone and together with the completion;
the completion's tokens are what follows the prompt's. Never a search for a response marker, never
a mask of every pad-id token (that would also hide the real EOS when pad == eos).
"""

from __future__ import annotations

from typing import Literal, Sequence

from transformers import PreTrainedTokenizerBase

Kind = Literal["causal", "seq2seq"]


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
    p_ids = tokenizer(p_texts, add_special_tokens=special)["input_ids"]
    f_ids = tokenizer(f_texts, add_special_tokens=special)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
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
        if chat_template and eos is not None and eos in c:
            pass  # the template closed the turn with EOS already (maybe followed by "\n", as ChatML does)
        elif add_eos and eos is not None and (not c or c[-1] != eos):
            c = c + [eos]
        if not add_eos and c and eos is not None and c[-1] == eos and not chat_template:
            c = c[:-1]
        out.append((list(p), list(c)))
    return out


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
