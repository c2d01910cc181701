"""Atomic file writes: readers see the old file or the new one, never half of one.

    from ift import atomic
    atomic.write_text(run_dir / "metrics.json", text)
    atomic.write_bytes(run_dir / "plots" / "loss.png", png)

The data goes to a temporary file in the target's folder (same file system, so the rename is atomic), is
fsynced, then renamed over the target. A new file gets the permissions a plain `open(path, "w")` gives it
(0o666 less the umask); a file that already exists keeps its mode, as an in-place rewrite would.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

__all__ = ["write_bytes", "write_text"]

# O_EXCL: never reuse someone else's file; O_BINARY (Windows): no newline translation
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write `text` (newlines as given, no translation) atomically; returns the path."""
    return write_bytes(path, text.encode(encoding))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` atomically, creating missing parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _open_temp(path: Path) -> tuple[int, Path]:
    # os.open with mode 0o666 lets the kernel apply the umask (mkstemp would force 0o600)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:
            continue
