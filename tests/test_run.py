"""The run folder's owner: metrics schema and evaluation records, the lock, checkpoint manifests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ift.errors import IftError
from ift.run import RunDir


def test_training_figures_and_evaluation_records_live_side_by_side(tmp_path):
    rd = RunDir(tmp_path)
    rd.record_training(history=[{"step": 1, "train_loss": 2.0}], best={"step": 1, "value": 1.0},
                       validation={"loss": 1.0, "step": 1})
    record = rd.add_evaluation(model="base", split="test", metrics={"accuracy": 0.5}, rows=10, limit=None,
                               weights="tiny", dtype="float32", quantization=None, predictions=None, by="ift-eval")
    rd.add_evaluation(model="base", split="test", metrics={"accuracy": 0.9}, rows=2, limit=2,
                      weights="tiny", dtype="float32", quantization=None, predictions=None, by="ift-eval")
    rd.record_training(history=[], test={"accuracy": 0.8})  # training's end keeps the records
    data = rd.metrics()
    assert data["validation"] == {"loss": 1.0, "step": 1} and data["test"] == {"accuracy": 0.8}
    assert [r["id"] for r in data["evaluations"]] == [record["id"], "ift-eval-base-test-2"]
    assert rd.latest_evaluation("base", "test")["metrics"] == {"accuracy": 0.5}  # --limit runs are not "full"
    assert rd.latest_evaluation("base", "test", full=False)["limit"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary file left
    rd.metrics_file.write_text("{broken")
    with pytest.raises(IftError, match="not valid JSON"):
        rd.metrics()


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    rd = RunDir(tmp_path)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run.lock").write_text(json.dumps({"pid": owner.pid, "host": os.uname().nodename}))
        with pytest.raises(IftError, match=f"in use by process {owner.pid}"):
            rd.lock().acquire()
    finally:
        owner.kill()
        owner.wait()
    said = []
    lock = rd.lock()
    lock.acquire(say=said.append)  # the owner is dead now: its lock is stale
    assert "stale lock" in said[0] and str(owner.pid) in said[0]
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run.lock").exists()


def _checkpoint(rd: RunDir, step: int) -> None:
    folder = rd.checkpoint(step)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 1000)
    (folder / "trainer_state.json").write_text("{}")
    rd.write_manifest(folder)


def test_manifest_finds_truncated_missing_and_altered_files(tmp_path):
    rd = RunDir(tmp_path)
    for step in (4, 8, 12, 16):
        _checkpoint(rd, step)
    assert rd.verify(rd.checkpoint(4)) is None
    (rd.checkpoint(16) / "model.safetensors").write_bytes(b"x" * 10)  # truncated
    (rd.checkpoint(12) / "trainer_state.json").unlink()  # missing
    (rd.checkpoint(8) / "trainer_state.json").write_text("[]")  # same size, other bytes
    assert "has 10 bytes, the manifest says 1,000" in rd.verify(rd.checkpoint(16))
    assert "trainer_state.json is missing" in rd.verify(rd.checkpoint(12))
    assert "does not match its checksum" in rd.verify(rd.checkpoint(8))
    said = []
    assert rd.newest_valid_checkpoint(say=said.append) == rd.checkpoint(4)
    assert len(said) == 3 and all("skipping checkpoint" in s for s in said)
    (rd.checkpoint(4) / "manifest.json").unlink()
    assert "no manifest" in rd.verify(rd.checkpoint(4))
    said.clear()  # an older ift's checkpoint (state file, no manifest) is still resumed, with a warning
    assert rd.newest_valid_checkpoint(say=said.append) == rd.checkpoint(4)
    assert "not verified" in said[-1]
