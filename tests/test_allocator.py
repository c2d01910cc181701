"""ift/training/allocator.py: freed blocks of 16 MiB and more go back to the OS on a CPU run; smaller ones stay."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import os, sys
    import torch
    sys.path.insert(0, {repo!r})
    if sys.argv[1] == "ift":
        from ift.training.allocator import return_large_blocks
        assert return_large_blocks()
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * page
    x = torch.ones(7 << 20)  # 28 MiB, mmapped: freeing it raises glibc's dynamic threshold to 28 MiB
    del x
    size = int(sys.argv[2]) << 18  # floats
    base = rss()
    held, pins = [], []
    for _ in range(16):  # 16 blocks, touched, each followed by a small live block (a later, smaller tensor):
        held.append(torch.ones(size))  # freed arena blocks below live ones cannot be trimmed from the top
        pins.append(torch.ones(1024))
    del held
    print((rss() - base) >> 20)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what this sets")
def test_freed_activations_return_to_the_os(tmp_path):
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(repo=repo))

    def kept(mode: str, mib: int) -> int:
        out = subprocess.run([sys.executable, str(script), mode, str(mib)], capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    assert kept("default", 20) >= 240  # glibc as it comes keeps 16 freed 20 MiB blocks resident
    assert kept("ift", 20) < 16  # with ift's threshold (16 MiB) they were unmapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what this sets")
def test_blocks_below_the_threshold_stay_in_the_arena(tmp_path):
    """Activations of a few MB are reused from malloc's arenas, not mapped afresh (and zeroed by the kernel) on
    every allocation: a 4 MiB threshold cost 25-35% of the tokens/s on PhraseBank and DialogSum (docs/benchmarks.md)."""
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(repo=repo))
    out = subprocess.run([sys.executable, str(script), "ift", "8"], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip().splitlines()[-1]) >= 96  # 16 freed 8 MiB blocks kept for reuse


def test_a_users_own_setting_stands(monkeypatch):
    from ift.training.allocator import return_large_blocks

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert return_large_blocks() is False
