"""The training loop on tiny models: it learns, saves the right weights, resumes exactly, accumulates
and distributes correctly, and stops cleanly on NaN or a signal."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ift.errors import IftError
from ift.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]

TEMPLATES = """dataset: toy
templates:
  11111111-0000-0000-0000-000000000001: !Template
    id: 11111111-0000-0000-0000-000000000001
    name: word_class
    jinja: "Words: {{word}}\\nIs there an animal or a tool? ||| {{answer_choices[label]}}"
    answer_choices: tool ||| animal
    metadata: !TemplateMetadata
      original_task: true
      choices_in_prompt: true
      metrics: [Accuracy]
      languages: [en]
    reference: ''
"""

ANIMALS = ["cat", "dog", "horse", "cow", "sheep", "goat", "lion", "tiger", "bear", "wolf", "fox", "deer"]
TOOLS = ["hammer", "saw", "drill", "wrench", "chisel", "pliers", "spade", "rake", "axe", "file", "clamp", "level"]


FILLER = ["red", "big", "old", "new", "small", "blue", "green", "quick", "slow", "warm", "cold", "dark",
          "light", "soft", "hard", "loud", "calm", "wet", "dry", "young"]


def write_toy(tmp: Path, n_train: int = 96) -> tuple[Path, Path]:
    """A learnable task with no row repeated across splits: which class of key word hides among fillers."""
    data = tmp / "toy"
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    keys = [(w, 1) for w in ANIMALS] + [(w, 0) for w in TOOLS]
    seen: set[str] = set()

    def rows(n):
        out = []
        while len(out) < n:
            key, label = rng.choice(keys)
            words = rng.sample(FILLER, 3)
            words.insert(rng.randrange(4), key)
            text = " ".join(words)
            if text not in seen:
                seen.add(text)
                out.append({"word": text, "label": label})
        return out

    for split, n in (("train", n_train), ("validation", 24), ("test", 24)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    templates = tmp / "templates" / "toy"
    templates.mkdir(parents=True, exist_ok=True)
    (templates / "templates.yaml").write_text(TEMPLATES)
    return data, tmp / "templates"


def tiny_base(tmp: Path) -> Path:
    """A 'pretrained' tiny Llama on disk, for adapters (LoRA needs a base worth keeping)."""
    from conftest import build_tiny_llama, build_tiny_tokenizer

    folder = tmp / "base"
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def toy_recipe(tmp: Path, *, kind: str = "llama", adapter: str = "none", **training) -> Path:
    data, templates = write_toy(tmp)
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "tie_word_embeddings": False}
    if kind == "t5":
        config = {"model_type": "t5", "d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 2,
                  "num_decoder_layers": 2, "num_heads": 4}
    model = {"init": "scratch", "config": config, "vocab_size": 300, "dtype": "float32"}
    if adapter != "none":
        model = {"name_or_path": str(tiny_base(tmp)), "dtype": "float32"}
    recipe = {
        "model": model,
        "adapter": {"method": adapter, "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"sources": [{"name": "toy", "path": str(data), "templates": ["toy/word_class"]}],
                 "templates_dir": [str(templates)], "max_length": 64, "seed": 1},
        "training": {"output_dir": str(tmp / "run"), "seed": 7, "max_steps": 12, "per_device_train_batch_size": 8,
                     "per_device_eval_batch_size": 16, "learning_rate": 3e-3, "lr_scheduler_type": "constant",
                     "logging_steps": 2, "eval_steps": 6, "save_steps": 4, "save_total_limit": 5,
                     "report_to": ["none"], **training},
        "evaluation": {"metrics": ["loss", "accuracy"], "max_new_tokens": 4},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide state; each in-process run starts from a clean one."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_train(recipe: Path, *overrides: str, resume=None) -> Path:
    from ift.train import train

    return train(load_recipe(recipe, overrides), resume=resume)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    name = "adapter_model.safetensors" if (final / "adapter_config.json").exists() else "model.safetensors"
    return load_file(final / name)


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def test_full_finetune_learns_and_saves_a_loadable_model(tmp_path):
    recipe = toy_recipe(tmp_path, max_steps=80, eval_steps=40, save_steps=40)
    run = run_train(recipe)
    metrics = json.loads((run / "metrics.json").read_text())
    losses = [h["train_loss"] for h in metrics["history"] if "train_loss" in h]
    assert losses[-1] < 0.3 * losses[0], losses
    assert metrics["test"]["accuracy"] >= 0.9
    assert (run / "predictions" / "test.jsonl").exists()
    assert (run / "recipe.yaml").exists() and (run / "README.md").exists()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert tokenizer("Word: cat")["input_ids"]
    assert not list((run / "final").glob("*.bin"))


def test_lora_saves_only_the_adapter(tmp_path):
    run = run_train(toy_recipe(tmp_path, adapter="lora", max_steps=4))
    files = {p.name for p in (run / "final").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files
    assert all("lora_" in key for key in final_weights(run))


def test_resume_from_a_checkpoint_ends_with_the_same_weights(tmp_path):
    a = run_train(toy_recipe(tmp_path / "a"))
    b_recipe = toy_recipe(tmp_path / "b")
    b = run_train(b_recipe)
    assert_same_weights(final_weights(a), final_weights(b))  # the same seed gives the same run
    # throw away everything after step 4, as if the run had died there, and resume
    import shutil

    for step in (8, 12):
        shutil.rmtree(b / "checkpoints" / f"step-{step}", ignore_errors=True)
    shutil.rmtree(b / "final")
    run_train(b_recipe, resume="auto")
    assert_same_weights(final_weights(a), final_weights(b))
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    assert ma["test"]["accuracy"] == mb["test"]["accuracy"]
    assert ma["test"]["loss"] == pytest.approx(mb["test"]["loss"], abs=1e-6)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    common = dict(max_steps=1, eval_steps=100, save_steps=100, learning_rate=1e-2, max_grad_norm=0.0)
    big = run_train(toy_recipe(tmp_path / "big", per_device_train_batch_size=8, **common))
    small = run_train(toy_recipe(tmp_path / "small", per_device_train_batch_size=2,
                                 gradient_accumulation_steps=4, **common))
    assert_same_weights(final_weights(big), final_weights(small), atol=1e-5)


@pytest.mark.parametrize("optim, fused", [("adamw_torch_fused", True), ("adamw_torch", False)])
def test_optimizer_is_fused_unless_asked_otherwise(optim, fused):
    from accelerate import Accelerator

    from ift.train import _adamw, _param_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    t = SimpleNamespace(optim=optim, learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8)
    opt = _adamw(_param_groups(model, 0.1), t, Accelerator(cpu=True))
    assert bool(opt.defaults.get("fused")) is fused
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # no decay on biases and norms
    model(torch.ones(2, 4)).sum().backward()
    before = model[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model[0].weight)


def test_seq2seq_t5_trains(tmp_path):
    run = run_train(toy_recipe(tmp_path, kind="t5", max_steps=30, eval_steps=30, save_steps=30, learning_rate=5e-3))
    metrics = json.loads((run / "metrics.json").read_text())
    losses = [h["train_loss"] for h in metrics["history"] if "train_loss" in h]
    assert losses[-1] < 0.5 * losses[0]
    assert "accuracy" in metrics["test"]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from ift import loss as loss_module

    original = loss_module.CompletionLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        loss, n = original(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 5 and self.training else loss), n

    monkeypatch.setattr(loss_module.CompletionLoss, "forward", poisoned)
    with pytest.raises(IftError, match="the loss became nan at step 6"):
        run_train(toy_recipe(tmp_path))
    assert (tmp_path / "run" / "checkpoints" / "step-4").is_dir()
    assert not (tmp_path / "run" / "final").exists()


def test_an_existing_run_is_not_overwritten(tmp_path):
    recipe = toy_recipe(tmp_path, max_steps=2)
    run_train(recipe)
    with pytest.raises(IftError, match="already holds a run"):
        run_train(recipe)


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ift", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_equals_an_uninterrupted_run(tmp_path):
    # the kill lands at step 10 of 300: a wide margin, so a fast machine cannot finish first
    steps = dict(max_steps=300, save_steps=5, eval_steps=100, save_total_limit=2)
    reference = _cli("train", str(toy_recipe(tmp_path / "a", **steps)))
    out = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, out[-3000:]

    recipe = toy_recipe(tmp_path / "b", **steps)
    proc = _cli("train", str(recipe))
    deadline = time.time() + 300
    while not (tmp_path / "b" / "run" / "checkpoints" / "step-10").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "run" / "final").exists()
    resumed = _cli("train", str(recipe), "--resume")
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    assert_same_weights(final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run"))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exit(tmp_path):
    # far more steps than can run before the signal, so a fast machine cannot finish first
    recipe = toy_recipe(tmp_path, max_steps=1_000_000, save_steps=10_000_000, eval_steps=10_000_000)
    proc = _cli("train", str(recipe))
    lines: list[str] = []
    training = threading.Event()

    def read() -> None:
        for chunk in iter(lambda: proc.stdout.read(256), ""):
            lines.append(chunk)
            if "train:" in chunk and "loss=" in chunk:
                training.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert training.wait(timeout=300), "".join(lines)[-3000:]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    reader.join(timeout=30)
    out = "".join(lines)
    assert proc.returncode == 143, out[-3000:]
    assert "stopped by signal" in out
    checkpoints = list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").exists()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    common = dict(max_steps=3, eval_steps=100, save_steps=100, learning_rate=1e-2, max_grad_norm=0.0)
    one = toy_recipe(tmp_path / "one", per_device_train_batch_size=8, **common)
    two = toy_recipe(tmp_path / "two", per_device_train_batch_size=4, **common)
    p1 = subprocess.run([sys.executable, "-m", "ift", "train", str(one)], cwd=REPO, capture_output=True, text=True)
    assert p1.returncode == 0, p1.stderr[-3000:]
    # Accelerate runs several CPU processes (gloo) through torchrun when told to use the CPU
    p2 = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                         "--mixed_precision", "no", "--dynamo_backend", "no", "ift/train.py", str(two)],
                        cwd=REPO, capture_output=True, text=True, timeout=900,
                        env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "one" / "run"), final_weights(tmp_path / "two" / "run"), atol=1e-5)
