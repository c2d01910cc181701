"""CPU memory: blocks of 16 MiB and more come from mmap and go back to the OS when freed.

glibc's malloc raises its mmap threshold to the size of every mmapped block freed (up to 32 MiB), so after the
first steps a training process keeps its activations in malloc's arenas; batches of varying length leave
freed blocks there that no later shape fits, and the resident size grows far past the live tensors (13.3 GB
measured for a PhraseBank LoRA run whose tensors peak at 4.7 GB). A fixed threshold stops the growth: the
largest tensors (a batch's MLP activations) are mapped and unmapped, smaller ones stay in the arenas and are
reused. The threshold is a trade: every mapped block is zeroed by the kernel when first touched, every step.
Measured with bench/train_memory.py (docs/benchmarks.md, "CPU memory"), peak RSS / tokens/s on one host:
  recipes/phrasebank_lora.yaml, 16 steps: glibc 6.49 GB / 179.5, 16 MiB 6.27 / 172.2, 4 MiB 5.56 / 135.3
  recipes/dialogsum.yaml, 6 steps:        glibc 16.25 GB / 220.9, 16 MiB 13.39 / 227.8
(estimates 4.27 and 10.72 GB): 16 MiB keeps both within 1.5x the estimate at glibc's speed. 4 MiB, the earlier
setting, cost 25% here and 35% on DialogSum on another host (9.51 GB / 177.5 against glibc's 16.35 / 272.9).
Other allocators do not do better at glibc's speed (bench/heap_replay.py, docs/benchmarks.md "jemalloc"): jemalloc
preloaded (Ray's build; PyPI has no jemalloc or tcmalloc of their own) peaks at 1.19x the PhraseBank estimate but
hands pages back within each step and runs at 0.72-0.76x the tokens/s; told to keep them, it fragments worse
than glibc (2.25x). An 8 MiB threshold helps PhraseBank and costs DialogSum 25% of its tokens/s.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD = 16 << 20


def return_large_blocks(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process (once, at the start of a CPU run); False where the C library
    is not glibc or the user set MALLOC_MMAP_THRESHOLD_ (their choice stands)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: no mallopt, or not this one
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


def largest_batch_first(loss_model, batch: dict, autocast: contextlib.AbstractContextManager) -> None:
    """One forward and backward on the run's largest batch before the first step, its gradients dropped and the
    random stream left as it was: the run's peak comes at its start (an out-of-memory error too), and glibc's
    heap then holds blocks that every later, smaller batch fits into.

    Without it the longest batch lands wherever the shuffle puts it, on a heap by then cut into blocks for the
    shorter shapes seen so far, and takes fresh memory on top: the whole recipes/phrasebank_lora.yaml run peaked
    at 11.3 GB (9.7 GB on another host) when its one 232-token batch came at step 108 of 117, after ~6.9 GB for
    every step before it.
    With it (and batch lengths padded to a multiple of 16: ift.data.collate.train_padding) the whole PhraseBank
    run peaked in this pass (8.99 GB; 8.0 GB after it, 8.58 at the longest batch), though where glibc places a
    given width is not predictable: a replay of 40 batches then the longest grew the heap past the pass's peak
    (docs/benchmarks.md, "CPU memory").
    """
    import torch

    was_training = loss_model.training
    with torch.random.fork_rng(devices=[]):  # dropout draws: the run's stream stays as without this pass
        loss_model.train()
        with autocast:
            loss, _ = loss_model(**batch)
        loss.backward()
    loss_model.zero_grad(set_to_none=True)
    loss_model.train(was_training)
