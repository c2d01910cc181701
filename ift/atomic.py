"""Atomic file writes: readers see the old file or the new one, never half of one.

    from ift import atomic
    atomic.write_text(run_dir / "metrics.json", text)
    atomic.write_bytes(run_dir / "plots" / "loss.png", png)

The data goes to a temporary file in the target's folder (same file system, so the rename is atomic), is
fsynced, then renamed over the target. A new file gets the permissions a plain `open(path, "w")` gives it
(0o666 less the umask); a file that already exists keeps its mode, as an in-place rewrite would.

Folders that libraries fill before ift renames them into place get the same treatment with
`apply_umask(folder)`: safetensors (0.8) writes every file through a 0600 temporary file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

__all__ = ["apply_umask", "write_bytes", "write_text"]

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


def apply_umask(folder: str | os.PathLike) -> None:
    """Give `folder` and everything in it the modes a plain open() / mkdir() gives (0o666 / 0o777 less the umask)."""
    folder = Path(folder)
    file_mode = _new_file_mode(folder)
    dir_mode = file_mode | (file_mode & 0o444) >> 2  # x wherever r: 0o644 -> 0o755, 0o600 -> 0o700
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, dir_mode)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, dir_mode if executable else file_mode)


def _new_file_mode(folder: Path) -> int:
    # a probe file shows the mode without touching the process umask (os.umask can only be read by setting
    # it, which races with other threads creating files)
    fd, probe = _open_temp(folder / "mode-probe")
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        os.unlink(probe)
