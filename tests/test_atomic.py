"""ift.atomic and the files written through it: whole-or-nothing, with the user's usual permissions (umask)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


@pytest.fixture()
def umask():
    """Set the process umask for one test; the previous one comes back afterwards."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_umask_mode(tmp_path, umask, mask, expected):
    from ift import atomic

    umask(mask)
    atomic.write_text(tmp_path / "a" / "b.txt", "héllo\n")
    atomic.write_bytes(tmp_path / "c.bin", b"\0\1")
    assert (tmp_path / "a" / "b.txt").read_bytes() == "héllo\n".encode()
    assert (tmp_path / "c.bin").read_bytes() == b"\0\1"
    assert _mode(tmp_path / "a" / "b.txt") == _mode(tmp_path / "c.bin") == expected


def test_rewrite_keeps_the_mode_the_user_chose_and_leaves_no_temp(tmp_path, umask):
    from ift import atomic

    path = tmp_path / "f.txt"
    atomic.write_text(path, "one")
    path.chmod(0o640)
    atomic.write_text(path, "two")
    assert path.read_text() == "two" and _mode(path) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_failed_write_keeps_the_old_file(tmp_path, umask, monkeypatch):
    from ift import atomic

    path = tmp_path / "f.txt"
    atomic.write_text(path, "old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        atomic.write_text(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_apply_umask_opens_up_a_folder_libraries_wrote(tmp_path, umask):
    import tempfile

    import torch
    from safetensors.torch import save_file

    from ift import atomic

    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as merge's temporary folder
    (folder / "sub").mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "sub" / "model.safetensors"))  # 0600 with safetensors 0.8
    (folder / "run.sh").write_text("#!/bin/sh\n")
    (folder / "run.sh").chmod(0o700)
    atomic.apply_umask(folder)
    assert _mode(folder) == _mode(folder / "sub") == 0o755
    assert _mode(folder / "sub" / "model.safetensors") == 0o644 and _mode(folder / "run.sh") == 0o755
    assert sorted(p.name for p in folder.iterdir()) == ["run.sh", "sub"]  # no probe left


def test_predictions_and_metrics_are_0644_under_umask_022(tmp_path, umask):
    from ift.evaluation.evaluate import write_predictions
    from ift.run import RunDir

    write_predictions(tmp_path / "predictions" / "test.jsonl", [{"prompt": "p", "prediction": "x"}])
    RunDir(tmp_path).record_training(history=[], test={"accuracy": 1.0})
    assert _mode(tmp_path / "predictions" / "test.jsonl") == 0o644
    assert _mode(tmp_path / "metrics.json") == 0o644
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"history": [], "test": {"accuracy": 1.0}}


def test_model_card_is_0644_under_umask_022(tmp_path, umask, monkeypatch):
    import ift.publish.card as card
    monkeypatch.setattr(card, "build_model_card", lambda *a, **k: "---\nlicense: apache-2.0\n---\n# card\n")
    path = card.write_model_card(tmp_path, None)
    assert path == tmp_path / "README.md" and path.read_text().endswith("# card\n")
    assert _mode(path) == 0o644


def test_new_template_file_follows_the_umask(tmp_path, umask):
    from ift.templates.files import add_template

    umask(0o002)  # a group-writable setup: a new templates.yaml must not come out 0644 regardless
    add_template("mine", "t1", "{{text}} ||| {{label}}", templates_dir=tmp_path)
    path = tmp_path / "mine" / "templates.yaml"
    assert _mode(path) == 0o664
    path.chmod(0o600)
    add_template("mine", "t2", "{{text}} ||| {{label}}", templates_dir=tmp_path)
    assert _mode(path) == 0o600  # an existing file keeps its mode


def test_gguf_hash_index_follows_the_umask(tmp_path, umask):
    import ift.modeling.model_source as modeling
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    modeling._sha256(gguf, tmp_path / "cache")
    assert _mode(tmp_path / "cache" / "sha256-index.json") == 0o644
