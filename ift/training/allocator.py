"""CPU memory: blocks of 4 MiB and more come from mmap and go back to the OS when freed.

glibc's malloc raises its mmap threshold to the size of every mmapped block freed (up to 32 MiB), so after the
first steps a training process keeps its activations in malloc's arenas; batches of varying length leave
freed blocks there that no later shape fits, and the resident size grows far past the live tensors (13.3 GB
measured for a PhraseBank LoRA run whose tensors peak at 4.7 GB). A fixed threshold stops the growth: large
tensors are mapped and unmapped, small ones stay in the arenas. Measured on 16 steps of
recipes/phrasebank_lora.yaml (bench/train_memory.py, docs/benchmarks.md): peak RSS 5.26 → 4.79 GB at 208 → 225
tokens/s (a 64 KiB threshold halved the speed; padding batches to a multiple of 64 raised the RSS). On
recipes/dialogsum.yaml (640-token batches, activations of tens of MB) it costs speed: 16.35 -> 9.51 GB peak RSS at
273 -> 178 tokens/s (fresh mappings are zeroed on every touch); kept for now because glibc's growth is what ran a
24 GB machine out of memory, and a better threshold is still to be measured.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD = 4 << 20


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
