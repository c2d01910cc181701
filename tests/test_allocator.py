"""ift/training/allocator.py: large freed blocks go back to the OS on a CPU run."""

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
    x = torch.ones(3 << 20)  # 12 MiB, mmapped: freeing it raises glibc's dynamic threshold to 12 MiB
    del x
    base = rss()
    held, pins = [], []
    for _ in range(16):  # 16 x 8 MiB, touched, each followed by a small live block (a later, smaller tensor):
        held.append(torch.ones(2 << 20))  # freed arena blocks below live ones cannot be trimmed from the top
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
    kept = {mode: int(subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()[-1]) for mode in ("default", "ift")}
    assert kept["default"] >= 96  # glibc as it comes keeps the freed 8 MiB blocks resident
    assert kept["ift"] < 16  # with ift's threshold they were unmapped


def test_a_users_own_setting_stands(monkeypatch):
    from ift.training.allocator import return_large_blocks

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert return_large_blocks() is False
