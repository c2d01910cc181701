"""bench/gpu_check.py runs every part on the CPU at toy sizes, so a lent GPU's minutes go to measuring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_passes_on_cpu_at_toy_sizes(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "OUT": str(tmp_path)})
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {name: part.get("error") for name, part in report["parts"].items() if not part.get("ok")}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    parts = report["parts"]
    assert set(parts) == {"correctness", "qlora", "throughput", "packing", "liger", "eval", "fsdp", "deepspeed"}
    assert "only on CUDA" in parts["fsdp"]["skipped"] and "needs CUDA" in parts["deepspeed"]["skipped"]
    assert "run only on CUDA" in parts["liger"]["skipped"]
    assert parts["correctness"]["resume_exact"] and parts["qlora"]["loss_falls"]
    qlora = parts["qlora"]
    assert qlora["best_step"] == 2 and qlora["adapter_only_checkpoints"] and qlora["resume_exact"]
    assert set(parts["throughput"]["configs"]) == {"tiny-lora", "tiny-full"}
    assert all(c["ift"]["tokens_per_second"] > 0 and c["trl"]["tokens_per_second"] > 0
               for c in parts["throughput"]["configs"].values())
    packing = parts["packing"]
    assert set(packing["modes"]) == {"false", "true", "bfd"} and packing["loss_difference"] < 1e-3
    assert all(m["tokens_per_second"] > 0 for m in packing["modes"].values())
    # bins of max_length tokens hold many of these short rows: fewer, fuller batches than padding
    assert packing["modes"]["bfd"]["tokens_per_step"] > packing["modes"]["false"]["tokens_per_step"]
    assert (tmp_path / "gpu_check.log").read_text().strip().endswith("gpu_check.json")
