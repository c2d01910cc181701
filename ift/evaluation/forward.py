"""The forward passes rank scoring and decoding share: peft unwrapping, inference mode, padding, length batches,
the KV cache across transformers versions, and the prefill that runs a batch of prompts once."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from typing import Iterator, Sequence

from ift.data.encoding import common_prefix, pad_rows
from ift.errors import IftError

# A prefix shared by a batch's prompts runs once when at least this long (shorter: not worth a forward pass).
MIN_SHARED_PREFIX = 16


# ---------------------------------------------------------------- the model under evaluation


def unwrap_peft(model):
    """The transformers model under a peft wrapper (its config, forward signature, generation flags)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_device(model):
    return next(model.parameters()).device


@functools.lru_cache(maxsize=64)
def _forward_params(cls: type) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def accepts_argument(model, name: str) -> bool:
    return name in _forward_params(type(unwrap_peft(model)))


@contextlib.contextmanager
def inference_mode(model) -> Iterator[None]:
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


def select_cache_rows(cache, index):
    """A new cache holding rows `index` of `cache` (rows may repeat); `cache` itself is left untouched."""
    if hasattr(cache, "layers"):  # transformers Cache objects
        out = copy.copy(cache)
        out.layers = [copy.copy(layer) for layer in cache.layers]
        out.batch_select_indices(index)
        return out
    return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)  # legacy tuples


def cache_argument(model, cache) -> dict:
    """The KV cache as a forward keyword: `cache` where the model takes it (`past_key_values` is deprecated in
    transformers 5.x and removed in 5.40), else the old name (older transformers, remote code)."""
    return {"cache" if accepts_argument(model, "cache") else "past_key_values": cache}


def returned_cache(out):
    """The KV cache a forward pass returned; reading `past_key_values` of a new output logs a deprecation."""
    return out.cache if "cache" in getattr(out, "__dataclass_fields__", ()) else out.past_key_values


def row_progress(total: int, desc: str | None):
    from tqdm.auto import tqdm

    # no desc: no bar; disable=None: shown on a terminal, silent in logs and tests
    return tqdm(total=total, desc=desc, unit="row", disable=None if desc else True, leave=False)


def length_batches(lengths: Sequence[int], batch_size: int, keep: Sequence[bool] | None = None) -> Iterator[list[int]]:
    """Indices in batches of similar length (less padding); longest first, so running out of memory shows early."""
    order = sorted((i for i in range(len(lengths)) if keep is None or keep[i]), key=lambda i: -lengths[i])
    for start in range(0, len(order), max(1, batch_size)):
        yield order[start:start + batch_size]


def shared_prefill(model, prompts: Sequence[Sequence[int]], pad: int, device):
    """Prompts through the model with the KV cache on: (next-token logits [B, V], cache, attention mask [B, T]).

    Left padding; position ids follow the mask. A prefix every prompt of the batch shares (an instruction,
    few-shot examples, a chat system prompt) runs once and its cache is copied to every row; the padding then
    sits between that prefix and each prompt's own tokens, masked like any padding.
    """
    import torch

    keep_last = {"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}
    n = len(prompts)
    # at least one token of each prompt stays in the second pass: its logits predict the answer
    shared = min(common_prefix(prompts), min(len(p) for p in prompts) - 1) if n > 1 else 0
    cache = None
    if shared >= MIN_SHARED_PREFIX:
        head = torch.tensor([list(prompts[0][:shared])], device=device)
        out = model(input_ids=head, attention_mask=torch.ones_like(head),
                    position_ids=torch.arange(shared, device=device).unsqueeze(0), use_cache=True, **keep_last)
        cache = select_cache_rows(returned_cache(out), torch.zeros(n, dtype=torch.long, device=device))
    else:
        shared = 0
    ids, tail_mask = pad_rows([p[shared:] for p in prompts], pad, left=True)
    mask = torch.cat([torch.ones((n, shared), dtype=torch.long), tail_mask], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                **cache_argument(model, cache), use_cache=True, **keep_last)
    return out.logits[:, -1].float(), returned_cache(out), mask


# ---------------------------------------------------------------- checks


def check_prompt(ids: list[int], index: int) -> None:
    if not ids:  # nothing to condition on: the first answer token would have no logits
        raise IftError("the prompt has no tokens", f"row {index}", "give every row a non-empty prompt")


def check_kind(kind: str) -> None:
    if kind not in ("causal", "seq2seq"):
        raise IftError(f"unknown model kind '{kind}'", None, "use 'causal' or 'seq2seq'")

