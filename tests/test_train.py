"""The training loop on tiny models: it learns, saves the right weights, resumes exactly, accumulates
and distributes correctly, and stops cleanly on NaN or a signal."""

from __future__ import annotations

import json
import math
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


def write_toy(tmp: Path, n_train: int = 96, n_validation: int = 24) -> tuple[Path, Path]:
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

    for split, n in (("train", n_train), ("validation", n_validation), ("test", 24)):
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


def toy_recipe(tmp: Path, *, kind: str = "llama", adapter: str = "none", n_train: int = 96,
               n_validation: int = 24, dropout: float = 0.0, evaluation: dict | None = None, **training) -> Path:
    data, templates = write_toy(tmp, n_train, n_validation)
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "tie_word_embeddings": False, "attention_dropout": dropout}
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
        "evaluation": {"metrics": ["loss", "accuracy"], "max_new_tokens": 4, **(evaluation or {})},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def reset_accelerate_state() -> None:
    """Accelerate keeps process-wide state: cleared between in-process runs."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run starts from a clean accelerate state."""
    yield
    reset_accelerate_state()


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


def test_bin_packed_accumulation_matches_one_big_batch_of_bins(tmp_path):
    """data.packing: bfd — 4 bins in one micro-batch or 4 micro-batches of one bin: the same update (the loss is
    the mean over every loss token of the window)."""
    def recipe(folder, batch, accum):
        path = toy_recipe(folder, max_steps=1, eval_steps=100, save_steps=100, learning_rate=1e-2, max_grad_norm=0.0,
                          per_device_train_batch_size=batch, gradient_accumulation_steps=accum, logging_steps=1,
                          evaluation={"metrics": ["loss"]})
        raw = yaml.safe_load(path.read_text())
        raw["data"]["packing"] = "bfd"
        path.write_text(yaml.safe_dump(raw))
        return path

    big = run_train(recipe(tmp_path / "big", 4, 1))
    small = run_train(recipe(tmp_path / "small", 1, 4))
    # Adam's first step is about lr * sign(gradient): the gradient's norm is what shows its scale
    (b,), (s,) = ([h for h in json.loads((r / "metrics.json").read_text())["history"] if "train_loss" in h]
                  for r in (big, small))
    assert s["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    assert s["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6) and math.isfinite(b["grad_norm"])
    # bins of other widths: the head's tiniest gradients differ in their last bits, which Adam scales up
    assert_same_weights(final_weights(big), final_weights(small), atol=1e-4)


@pytest.mark.parametrize("optim, fused", [("adamw_torch_fused", True), ("adamw_torch", False)])
def test_optimizer_is_fused_unless_asked_otherwise(optim, fused):
    from accelerate import Accelerator

    from ift.training.optimizer import adamw, param_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    t = SimpleNamespace(optim=optim, learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8)
    opt = adamw(param_groups(model, 0.1), t, Accelerator(cpu=True))
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
    import ift.training.loss as loss_module
    original = loss_module.CompletionLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        loss, n = original(self, *args, **kwargs)
        calls["n"] += 1
        # call 1 is the pass on the longest batch before step 1 (on the CPU: ift/training/allocator.py)
        return (loss * float("nan") if calls["n"] > 6 and self.training else loss), n

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


# ---------------------------------------------------------------- exactness: accumulation, epochs, processes


def _state(run: Path) -> dict:
    """The trainer state of the run's last checkpoint (optimizer steps taken, epoch)."""
    last = max((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((last / "trainer_state.json").read_text())


# Two epochs over n rows, the same rows in the same order: B*accum rows in one batch, or accum micro-batches
# of B. 48 rows: 12 micro-batches of 4 per epoch, a multiple of 2 and 3; 44 rows: 11, a multiple of neither,
# so every epoch ends with a short window.
EPOCHS = dict(num_train_epochs=2, max_steps=-1, eval_steps=1000, save_steps=1000, learning_rate=1e-2,
              lr_scheduler_type="constant", max_grad_norm=1.0, optim="adamw_torch")


@pytest.mark.parametrize("n_train", [48, 44])
@pytest.mark.parametrize("accum", [2, 3])
def test_accumulation_over_epochs_equals_one_big_batch(tmp_path, accum, n_train):
    big = run_train(toy_recipe(tmp_path / "big", n_train=n_train, per_device_train_batch_size=4 * accum,
                               evaluation={"metrics": ["loss"]}, **EPOCHS))
    small = run_train(toy_recipe(tmp_path / "small", n_train=n_train, per_device_train_batch_size=4,
                                 gradient_accumulation_steps=accum, evaluation={"metrics": ["loss"]}, **EPOCHS))
    assert _state(big)["step"] == _state(small)["step"] == 2 * -(-n_train // (4 * accum))
    assert_same_weights(final_weights(big), final_weights(small), atol=1e-5)


def test_training_equals_a_plain_pytorch_reference(tmp_path):
    """Each window: sum of token losses over the window / its loss tokens, one clip, one AdamW step."""
    from ift.data.collate import Collator, train_dataloader
    from ift.data.prepare import build_splits
    from ift.data.tokenization import tokenize
    from ift.modeling.loading import load
    from ift.templates.library import TemplateLibrary

    accum, batch = 3, 4
    recipe_path = toy_recipe(tmp_path, adapter="lora", n_train=44, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accum, evaluation={"metrics": ["loss"]}, **EPOCHS)
    recipe = load_recipe(recipe_path)
    run = run_train(recipe_path)

    # the same rows in the same order, from ift's data stage; everything after it written here by hand
    from accelerate.utils import set_seed

    prepared = build_splits(recipe.data, TemplateLibrary(dirs=tuple(recipe.data.templates_dir)))
    set_seed(recipe.training.seed)  # the LoRA matrices' initialisation
    loaded = load(recipe.model, recipe.adapter)
    tokens, _ = tokenize(prepared.splits, loaded.tokenizer, loaded.kind, recipe.data)
    model = loaded.model
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    dl = train_dataloader(tokens["train"], batch, Collator(loaded.tokenizer, "causal"), seed=recipe.training.seed)
    steps = 0
    for epoch in range(2):
        dl.sampler.set_epoch(epoch)
        batches = list(dl)
        for start in range(0, len(batches), accum):
            window = batches[start:start + accum]
            n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
            for b in window:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                         b["labels"][:, 1:].flatten(), ignore_index=-100,
                                                         reduction="sum")
                (loss / n).backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad()
            steps += 1
    assert _state(run)["step"] == steps == 8
    ours = final_weights(run)
    theirs = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    for key, value in ours.items():
        match = [k for k in theirs if k.replace(".default", "") == key]
        assert len(match) == 1, key
        torch.testing.assert_close(value, theirs[match[0]], atol=1e-5, rtol=0, msg=key)


def test_resume_with_dropout_is_bit_exact(tmp_path):
    # 96 rows / 8 = 12 batches an epoch, 24 steps: the resume at step 16 is mid-epoch (skip_first_batches)
    steps = dict(max_steps=24, save_steps=8, eval_steps=12, dropout=0.1)
    a = run_train(toy_recipe(tmp_path / "a", **steps))
    b_recipe = toy_recipe(tmp_path / "b", **steps)
    b = run_train(b_recipe)
    import shutil

    shutil.rmtree(b / "checkpoints" / "step-24")
    shutil.rmtree(b / "final")
    run_train(b_recipe, resume="auto")
    assert_same_weights(final_weights(a), final_weights(b))


def test_checkpoint_is_renamed_only_after_every_process_saved(tmp_path):
    """Every rank writes its RNG file inside save_state: the rename waits for all of them."""
    from ift.train import FineTune
    from ift.training.checkpoints import Progress

    calls: list[str] = []

    class FakeAccelerator:
        is_main_process = True

        def wait_for_everyone(self):
            calls.append("barrier")

        def save_state(self, path):
            Path(path).mkdir(parents=True)
            calls.append("save_state")

    recipe = load_recipe(toy_recipe(tmp_path))
    ft = FineTune(recipe)
    ft.accelerator, ft.is_main, ft.progress = FakeAccelerator(), True, Progress(step=3)
    real_rename = Path.rename

    def rename(self, target):
        calls.append("rename")
        return real_rename(self, target)

    import unittest.mock

    with unittest.mock.patch.object(Path, "rename", rename):
        ft.save_checkpoint()
    assert calls.index("save_state") < calls.index("barrier", calls.index("save_state")) < calls.index("rename")
    assert (tmp_path / "run" / "checkpoints" / "step-3" / "trainer_state.json").exists()


def test_the_best_evaluation_always_has_a_checkpoint(tmp_path):
    # eval every 3 steps, save every 4; "higher loss is better" makes step 3 the best: not a save step
    run = run_train(toy_recipe(tmp_path, max_steps=10, eval_steps=3, save_steps=4, save_total_limit=1,
                               metric_for_best_model="loss", greater_is_better=True))
    metrics = json.loads((run / "metrics.json").read_text())
    best = metrics["best"]["step"]
    assert best == 3
    assert (run / "checkpoints" / f"step-{best}").is_dir()
    # what final/ holds is what the validation section describes: the best step's figures
    evals = {h["step"]: h["validation"] for h in metrics["history"] if "validation" in h}
    assert metrics["validation"]["step"] == best
    assert metrics["validation"]["loss"] == pytest.approx(evals[best]["loss"])


def test_half_precision_full_finetune_keeps_fp32_master_weights(tmp_path):
    """A bf16 checkpoint with dtype auto: an update far below bf16's resolution must not round away."""
    from conftest import build_tiny_llama, build_tiny_tokenizer

    folder = tmp_path / "bf16"
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    recipe = toy_recipe(tmp_path, max_steps=2, eval_steps=100, save_steps=100, learning_rate=1e-6,
                        evaluation={"metrics": ["loss"]})
    raw = yaml.safe_load(recipe.read_text())
    raw["model"] = {"name_or_path": str(folder), "dtype": "auto"}
    recipe.write_text(yaml.safe_dump(raw))
    run = run_train(recipe)
    before = load_file(folder / "model.safetensors")
    after = final_weights(run)
    moved = [k for k in after if not torch.equal(after[k].float(), before[k].float())]
    assert after["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    assert len(moved) == len(after), sorted(set(after) - set(moved))


def test_a_window_syncs_with_the_host_once_whatever_its_micro_batches(tmp_path, monkeypatch):
    """Loss-token and sequence counts stay on the device until the window ends: one tensor-to-Python conversion
    in the loop per window (on a GPU each one waits for the device), not one per micro-batch."""
    from ift.train import FineTune

    run = FineTune(load_recipe(toy_recipe(tmp_path, per_device_train_batch_size=2)))
    run.setup()
    batches = [b for b, _ in zip(run.train_dl, range(4))]
    calls: list = []
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        def counted(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.endswith((os.path.join("ift", "train.py"),
                                                   os.path.join("ift", "training", "loss.py"))):
                calls.append((_name, caller.f_code.co_filename, caller.f_lineno))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        run.train_window(batches[:1])
        one, calls[:] = list(calls), []
        run.train_window(batches)
        four = list(calls)
    finally:
        monkeypatch.undo()
        run.cleanup()
    assert len(one) == len(four) == 1, (one, four)


def test_an_update_the_fp16_scaler_skips_does_not_advance_the_schedule(tmp_path, monkeypatch):
    """fp16's GradScaler skips updates whose gradients overflowed (on GPUs, so the skip is simulated): the learning
    rate schedule follows applied updates only, and the skipped windows are counted in the checkpoint."""
    from accelerate.optimizer import AcceleratedOptimizer

    common = dict(max_steps=6, eval_steps=100, save_steps=6, logging_steps=1, lr_scheduler_type="linear",
                  warmup_steps=4, evaluation={"metrics": ["loss"]})
    plain = run_train(toy_recipe(tmp_path / "plain", **common))
    reset_accelerate_state()
    steps = {"n": 0}

    def skipped(self):
        steps["n"] += 1
        return steps["n"] <= 2  # the first two updates overflow

    monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(skipped))
    scaled = run_train(toy_recipe(tmp_path / "scaled", **common))
    rates = [[h["learning_rate"] for h in json.loads((r / "metrics.json").read_text())["history"]
              if "learning_rate" in h] for r in (plain, scaled)]
    # shifted by the two skipped updates: the warmup still at its start (0) after them
    assert rates[1] == [0.0, 0.0] + rates[0][:4] and rates[0][0] > 0, rates
    assert _state(scaled)["skipped_steps"] == 2 and _state(plain)["skipped_steps"] == 0


# ---------------------------------------------------------------- several processes (gloo on the CPU)

NAN_ON_RANK_1 = """
import os, sys
sys.path.insert(0, {repo!r})
import ift.training.loss as loss
original, calls = loss.CompletionLoss.forward, {{"n": 0}}

def poisoned(self, *args, **kwargs):
    total, n = original(self, *args, **kwargs)
    if self.training and os.environ.get("RANK") == "1":
        calls["n"] += 1
        if calls["n"] > 6:  # call 1 is the pass on the longest batch before step 1 (ift/training/allocator.py)
            total = total * float("nan")
    return total, n

loss.CompletionLoss.forward = poisoned
from ift.train import main
raise SystemExit(main(sys.argv[1:]))
"""


def _launch(script: str | Path, recipe: Path, **kwargs) -> subprocess.Popen:
    """Two CPU processes (gloo) through accelerate launch, as users run DDP."""
    return subprocess.Popen(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(recipe)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}, **kwargs)


@pytest.mark.slow
def test_two_processes_equal_one_over_epochs_with_accumulation(tmp_path):
    """2 processes x 2 rows x 3 micro-batches = 1 process x 4 rows x 3: same weights, steps, validation loss.

    44 rows: each epoch ends with a short window; 25 validation rows: Accelerate pads the last batch of one
    process with repeated rows, which must not count."""
    common = dict(n_train=44, n_validation=25, gradient_accumulation_steps=3, per_device_eval_batch_size=4,
                  **{**EPOCHS, "eval_steps": None})
    one = run_train(toy_recipe(tmp_path / "one", per_device_train_batch_size=4, **common))
    two = _launch(REPO / "ift" / "train.py", toy_recipe(tmp_path / "two", per_device_train_batch_size=2, **common))
    out = two.communicate(timeout=900)[0]
    assert two.returncode == 0, out[-3000:]
    two = tmp_path / "two" / "run"
    assert _state(one)["step"] == _state(two)["step"] == 8
    assert_same_weights(final_weights(one), final_weights(two), atol=1e-5)
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    evals = lambda m: [(h["step"], h["validation"]) for h in m["history"] if "validation" in h]  # noqa: E731
    assert [s for s, _ in evals(m1)] == [s for s, _ in evals(m2)] == [4, 8]  # once an epoch
    for (_, v1), (_, v2) in zip(evals(m1), evals(m2)):
        assert v2["loss"] == pytest.approx(v1["loss"], abs=1e-6)
        assert v2["accuracy"] == v1["accuracy"]
    assert m2["test"]["loss"] == pytest.approx(m1["test"]["loss"], abs=1e-6)
    checkpoint = max((two / "checkpoints").glob("step-*"))
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}


@pytest.mark.slow
def test_two_processes_evaluate_a_packed_run_as_one(tmp_path):
    """Packed training: the validation and test losses of 2 processes equal one process's, with 25 validation rows
    (Accelerate repeats rows to even out the shards, and drops them by row: a packed batch is one row)."""
    def recipe(folder, batch):
        path = toy_recipe(folder, n_train=16, n_validation=25, per_device_train_batch_size=batch,
                          per_device_eval_batch_size=4, max_steps=2, eval_steps=2, save_steps=100,
                          evaluation={"metrics": ["loss"]})
        raw = yaml.safe_load(path.read_text())
        raw["data"]["packing"] = True
        path.write_text(yaml.safe_dump(raw))
        return path

    one = run_train(recipe(tmp_path / "one", 4))
    two = _launch(REPO / "ift" / "train.py", recipe(tmp_path / "two", 2))
    out = two.communicate(timeout=900)[0]
    assert two.returncode == 0, out[-3000:]
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, tmp_path / "two" / "run"))
    v1, v2 = ([h["validation"]["loss"] for h in m["history"] if "validation" in h] for m in (m1, m2))
    assert v2 == pytest.approx(v1, abs=1e-5)
    assert m2["test"]["loss"] == pytest.approx(m1["test"]["loss"], abs=1e-5)


@pytest.mark.slow
def test_nan_on_one_process_stops_both(tmp_path):
    script = tmp_path / "poisoned_train.py"
    script.write_text(NAN_ON_RANK_1.format(repo=str(REPO)))
    proc = _launch(script, toy_recipe(tmp_path, per_device_train_batch_size=4))
    try:
        out = proc.communicate(timeout=180)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("a NaN on one process left the other one waiting")
    assert proc.returncode != 0
    assert out.count("the loss became nan at step 6") == 2, out[-3000:]  # each process says so, at one step
    assert (tmp_path / "run" / "checkpoints" / "step-4" / "trainer_state.json").is_file()
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_with_a_checkpoint(tmp_path):
    import psutil

    recipe = toy_recipe(tmp_path, max_steps=1_000_000, save_steps=10_000_000, eval_steps=10_000_000,
                        per_device_train_batch_size=4, logging_steps=1)
    proc = _launch(REPO / "ift" / "train.py", recipe)
    lines: list[str] = []
    training = threading.Event()

    def read() -> None:
        for chunk in iter(lambda: proc.stdout.read(256), ""):
            lines.append(chunk)
            if "loss=" in chunk:
                training.set()

    threading.Thread(target=read, daemon=True).start()
    assert training.wait(timeout=300), "".join(lines)[-3000:]
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if any("train.py" in part for part in p.cmdline()) and "--multi_gpu" not in p.cmdline()]
    ranks = {p.environ().get("RANK"): p for p in workers if p.environ().get("RANK") is not None}
    assert set(ranks) == {"0", "1"}, [p.cmdline() for p in workers]
    ranks["1"].send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("SIGTERM to one process left the other one running: " + "".join(lines)[-2000:])
    out = "".join(lines)
    assert "stopped by signal" in out, out[-3000:]
    checkpoints = list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1, out[-3000:]
    saved = {p.name for p in checkpoints[0].iterdir()}
    assert {"trainer_state.json", "random_states_0.pkl", "random_states_1.pkl"} <= saved


SHARDED_EVAL = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import copy, torch
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard
from conftest import build_tiny_llama, build_tiny_tokenizer
from ift.evaluation.evaluate import evaluate
from ift.training.loss import CompletionLoss
from ift.recipe import EvaluationConfig
from ift.evaluation.in_training import full_weights, mean_loss

acc = Accelerator()
tok = build_tiny_tokenizer()
model = build_tiny_llama(tok)
reference = copy.deepcopy(model)
rows = [{{"prompt": f"Headline {{i}}: profits {{'up' if i % 2 else 'down'}}. Sentiment:", "source": "s",
          "template": "t", "completion": "positive" if i % 2 else "negative",
          "choices": ["negative", "positive"] if i < 4 else []}} for i in range(7)]  # 4 ranked, 3 generated
cfg = EvaluationConfig(metrics=["accuracy", "rouge"], max_new_tokens=6)
wrapped = CompletionLoss(model, "causal")
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(wrapped)
assert type(next(wrapped.parameters())).__name__ == "DTensor"
with full_weights(wrapped):
    scores, predictions = evaluate(wrapped.model, tok, "causal", rows, cfg, accelerator=acc)
assert type(next(wrapped.parameters())).__name__ == "DTensor"  # sharded again for training
want_scores, want = evaluate(reference, tok, "causal", rows, cfg)
assert [p["prediction"] for p in predictions] == [p["prediction"] for p in want], (predictions, want)
assert scores["accuracy"] == want_scores["accuracy"] and scores["rouge1"] == want_scores["rouge1"]
print(f"rank {{acc.process_index}}: sharded evaluation equals the full model's", flush=True)
"""


@pytest.mark.slow
def test_accuracy_and_rouge_evaluation_on_fsdp2_shards(tmp_path):
    """Accelerate runs FSDP only on GPUs, so the test shards by hand with torch's fully_shard over gloo:
    rows split unevenly (4 and 3), generation of different lengths, no lockstep between the processes."""
    script = tmp_path / "sharded_eval.py"
    script.write_text(SHARDED_EVAL.format(repo=str(REPO), tests=str(REPO / "tests")))
    proc = subprocess.run(["torchrun", "--nproc_per_node", "2", str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stdout.count("sharded evaluation equals the full model's") == 2


FSDP2_ON_ONE_CPU_PROCESS = """
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


class FsdpOnCpu(accelerate.Accelerator):
    # Accelerate refuses FSDP on a CPU; its FSDP2 preparation itself runs on one gloo process. The settings are
    # recipes/accelerate/fsdp_2gpu.yaml's.
    def prepare(self, *args):
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=True,
            reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT")
        self.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what later states copy
        return super().prepare(*args)


accelerate.Accelerator = FsdpOnCpu
import ift.train as T

setup = T.FineTune.setup


def report(self):
    setup(self)
    from torch.distributed.fsdp import FSDPModule

    inner = self.accelerator.unwrap_model(self.loss_model).model
    head, embed = inner.get_output_embeddings().weight, inner.get_input_embeddings().weight
    optimized = {{id(p) for g in self.optimizer.param_groups for p in g["params"]}}
    print("FSDP " + json.dumps({{
        "units": [n for n, m in self.loss_model.named_modules() if isinstance(m, FSDPModule)],
        "tied": head is embed, "head_optimized": id(head) in optimized}}), flush=True)


T.FineTune.setup = report
raise SystemExit(T.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_fsdp2_shards_each_decoder_layer_keeps_the_head_tied_and_trains_as_unsharded(tmp_path):
    """Accelerate's own FSDP2 preparation with the shipped accelerate config's settings, on one gloo process:
    one unit per decoder layer, the tied head still the embedding and in the optimizer, accuracy evaluated during
    training, and the same final weights as the unsharded run."""
    def recipe(folder):
        path = toy_recipe(folder, max_steps=4, save_steps=4, eval_steps=2)
        raw = yaml.safe_load(path.read_text())
        raw["model"]["config"]["tie_word_embeddings"] = True
        path.write_text(yaml.safe_dump(raw))
        return path

    plain = run_train(recipe(tmp_path / "plain"))
    script = tmp_path / "fsdp_train.py"
    script.write_text(FSDP2_ON_ONE_CPU_PROCESS.format(repo=str(REPO), tests=str(REPO / "tests")))
    proc = subprocess.run(["torchrun", "--nproc_per_node", "1", str(script), str(recipe(tmp_path / "fsdp"))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    report = json.loads(out.split("FSDP ", 1)[1].splitlines()[0])
    assert [u for u in report["units"] if ".layers." in u] == ["model.model.layers.0", "model.model.layers.1"]
    assert report["tied"] and report["head_optimized"], report
    sharded = tmp_path / "fsdp" / "run"
    evals = [h for h in json.loads((sharded / "metrics.json").read_text())["history"] if "validation" in h]
    assert [h["step"] for h in evals] == [2, 4] and "accuracy" in evals[0]["validation"]
    assert_same_weights(final_weights(plain), final_weights(sharded), atol=1e-6)


# ---------------------------------------------------------------- faults: damaged checkpoints, full disks, two runs


def test_resume_skips_a_damaged_checkpoint_and_still_ends_exact(tmp_path, capsys):
    a = run_train(toy_recipe(tmp_path / "a"))
    b_recipe = toy_recipe(tmp_path / "b")
    b = run_train(b_recipe)
    import shutil

    weights = b / "checkpoints" / "step-12" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # as a full disk or a killed copy leaves it
    shutil.rmtree(b / "final")
    run_train(b_recipe, resume="auto")
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "step-12" in out and "resumed from" in out and "step-8" in out
    assert_same_weights(final_weights(a), final_weights(b))


def test_a_checkpoint_that_does_not_load_is_named(tmp_path):
    recipe = toy_recipe(tmp_path, max_steps=4)
    run = run_train(recipe)
    import shutil

    shutil.rmtree(run / "final")
    with pytest.raises(IftError, match="checkpoint .*step-4 does not load") as err:
        run_train(recipe, "model.config.hidden_size=64", resume="auto")  # another model's shapes
    assert "move it away" in err.value.fix


def test_no_space_left_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    from accelerate import Accelerator

    from ift.run import RunDir

    real, calls = Accelerator.save_state, {"n": 0}

    def save_state(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            (Path(output_dir) / "half-written").parent.mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "half-written").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(IftError, match=r"could not write checkpoint .*step-6: No space left on device \(.* GiB free\)"):
        run_train(toy_recipe(tmp_path))
    rd = RunDir(tmp_path / "run")
    assert rd.checkpoint_steps() == [4] and rd.verify(rd.checkpoint(4)) is None
    assert not list(rd.checkpoints.glob("*.tmp"))
    assert not (tmp_path / "run" / "run.lock").exists()  # released on the way out


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path):
    recipe = toy_recipe(tmp_path, max_steps=2)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "run.lock").write_text(json.dumps({"pid": owner.pid, "host": os.uname().nodename}))
        with pytest.raises(IftError, match=f"in use by process {owner.pid}"):
            run_train(recipe)
    finally:
        owner.kill()
        owner.wait()
    assert not (tmp_path / "run" / "recipe.yaml").exists()  # nothing written into the other run's folder
    run_train(recipe)  # its owner is gone: the stale lock is taken over
    assert (tmp_path / "run" / "final").is_dir() and not (tmp_path / "run" / "run.lock").exists()


def test_tied_weights_are_saved_once_and_resume_exactly(tmp_path, caplog):
    """SmolLM2 ties its head to its embedding: checkpoints hold the storage once, without Accelerate's warning."""
    import logging
    import shutil

    def recipe(folder):
        path = toy_recipe(folder, max_steps=8, save_steps=4, eval_steps=100, evaluation={"metrics": ["loss"]})
        raw = yaml.safe_load(path.read_text())
        raw["model"]["config"]["tie_word_embeddings"] = True
        path.write_text(yaml.safe_dump(raw))
        return path

    with caplog.at_level(logging.WARNING):
        a = run_train(recipe(tmp_path / "a"))
    assert "Removed shared tensor" not in caplog.text
    b_recipe = recipe(tmp_path / "b")
    b = run_train(b_recipe)
    shutil.rmtree(b / "checkpoints" / "step-8")
    shutil.rmtree(b / "final")
    run_train(b_recipe, resume="auto")
    assert_same_weights(final_weights(a), final_weights(b))
    state = load_file(b / "checkpoints" / "step-8" / "model.safetensors")
    assert sum("embed_tokens" in k or "lm_head" in k for k in state) == 1


def test_bf16_on_a_cpu_without_native_bf16_trains_in_fp32_and_says_so(tmp_path, monkeypatch, capsys):
    """bf16 autocast on an AVX2-only CPU runs torch's reference GEMM (24x slower than fp32 measured): fp32 instead."""
    import yaml as _yaml

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    run = run_train(toy_recipe(tmp_path, max_steps=2, mixed_precision="bf16", eval_steps=2, save_steps=2))
    assert "no native bf16 matrix multiply" in capsys.readouterr().out
    saved = _yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["training"]["mixed_precision"] == "no"
    reset_accelerate_state()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    run = run_train(toy_recipe(tmp_path / "native", max_steps=2, mixed_precision="bf16", eval_steps=2, save_steps=2))
    assert _yaml.safe_load((run / "recipe.yaml").read_text())["training"]["mixed_precision"] == "bf16"


def test_bf16_lora_holds_the_base_in_bf16_evaluates_under_autocast_and_trains_the_same(tmp_path, monkeypatch):
    """Under bf16 autocast a LoRA run keeps its frozen Linear weights in bf16 (no per-step casts) and gets the very
    same adapter as with float32 base weights cast by autocast; its evaluations run under the autocast its records
    name ("bf16 autocast"), which they did not before (the inner model was called outside autocast)."""
    import ift.evaluation.evaluate as evaluation
    import ift.training.model_setup as model_setup

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    seen = []
    original = evaluation.evaluate

    def watched(model, *args, **kwargs):
        q = next(m for n, m in model.named_modules() if n.endswith("q_proj.base_layer"))
        seen.append((torch.is_autocast_enabled("cpu"), q.weight.dtype))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", watched)
    options = dict(adapter="lora", max_steps=4, mixed_precision="bf16", eval_steps=2, save_steps=2,
                   evaluation={"metrics": ["loss", "accuracy"], "compare_base": True})
    run = run_train(toy_recipe(tmp_path / "bf16-base", **options))
    assert seen and all(s == (True, torch.bfloat16) for s in seen)
    records = json.loads((run / "metrics.json").read_text())

    reset_accelerate_state()
    monkeypatch.setattr(model_setup, "frozen_base_in_compute_dtype", lambda *a: None)
    seen.clear()
    reference = run_train(toy_recipe(tmp_path / "fp32-base", **options))
    assert seen and all(s == (True, torch.float32) for s in seen)
    assert_same_weights(final_weights(run), final_weights(reference))
    assert all(v.dtype == torch.float32 for v in final_weights(run).values())
    assert records["test"]["accuracy"] == json.loads((reference / "metrics.json").read_text())["test"]["accuracy"]


def test_a_short_bf16_cpu_run_trains_with_eager_attention_like_sdpa(tmp_path, monkeypatch):
    """model.attn_implementation: auto trains a short bf16 run on the CPU with eager attention (faster there than
    torch's CPU flash-attention backward: ift/modeling/attention.py) and ends near the adapter sdpa gives; the saved
    final/ config does not pin the kernel, and `sdpa` keeps sdpa."""
    import ift.evaluation.evaluate as evaluation

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    seen = []
    original = evaluation.evaluate

    def watched(model, *args, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        seen.append(base.config._attn_implementation)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", watched)
    options = dict(adapter="lora", max_steps=6, mixed_precision="bf16", eval_steps=3, save_steps=3)
    # unpadded batches: the kernels' bf16 rounding, not the padding's, is what this compares (padding is compared
    # in fp32 by test_a_cpu_run_meets_its_largest_batch_first_in_a_few_lengths_and_trains_as_without)
    unpadded = "data.pad_to_multiple_of=null"
    run = run_train(toy_recipe(tmp_path / "auto", **options), unpadded)
    assert seen and set(seen) == {"eager"}
    assert "eager" not in (run / "final" / "adapter_config.json").read_text()

    reset_accelerate_state()
    seen.clear()
    reference = run_train(toy_recipe(tmp_path / "sdpa", **options), "model.attn_implementation=sdpa", unpadded)
    assert seen and set(seen) == {"sdpa"}
    eager_w, sdpa_w = final_weights(run), final_weights(reference)
    assert eager_w.keys() == sdpa_w.keys()
    for key in eager_w:  # bf16 attention either way: the kernels round differently, the updates agree
        torch.testing.assert_close(eager_w[key], sdpa_w[key], atol=2e-3, rtol=2e-2, msg=key)
    loss = [json.loads((r / "metrics.json").read_text())["validation"]["loss"] for r in (run, reference)]
    assert abs(loss[0] - loss[1]) < 0.01 * loss[1], loss


def test_a_cpu_run_meets_its_largest_batch_first_in_a_few_lengths_and_trains_as_without(tmp_path, monkeypatch):
    """On the CPU the first forward and backward is on the run's longest rows, and every training batch is padded
    to a multiple of 16 tokens (ift/training/allocator.py, ift.data.collate.train_padding: the peak first, and a
    few tensor sizes glibc reuses, so no later batch grows the heap). The pass's gradients are dropped and the
    dropout stream left as it was: the run ends with the very weights it has without the pass. Padding carries no
    loss: without dropout (whose draws follow the padded shape) the weights are those of unpadded batches, up to
    the float rounding of other matmul shapes."""
    from ift.training.loss import CompletionLoss

    shapes = []
    forward = CompletionLoss.forward

    def watched(self, input_ids, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            shapes.append(tuple(input_ids.shape))
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(CompletionLoss, "forward", watched)

    def trained(name: str, *overrides: str) -> dict:
        reset_accelerate_state()
        shapes.clear()
        recipe = toy_recipe(tmp_path / name, adapter="lora", max_steps=6, eval_steps=6, save_steps=6,
                            evaluation={"metrics": ["loss"]})
        return final_weights(run_train(recipe, *overrides))

    first = trained("first", "adapter.dropout=0.2")
    warm, steps = shapes[0], shapes[1:]
    assert len(steps) == 6 and warm[0] == 8
    assert all(width % 16 == 0 or width == warm[1] for _, width in shapes), shapes
    assert warm[1] >= max(s[1] for s in steps)
    assert warm[1] > steps[0][1] or len({s[1] for s in steps}) == 1, shapes

    import ift.train as train_module

    monkeypatch.setattr(train_module, "largest_batch_first", lambda *a: None)
    without = trained("without", "adapter.dropout=0.2")
    assert len(shapes) == 6  # no extra pass
    assert_same_weights(first, without)

    padded = trained("padded")
    unpadded = trained("unpadded", "data.pad_to_multiple_of=null")
    assert any(width % 16 for _, width in shapes), shapes
    # the pass (and the top width) is the longest row's (these 6 unpadded steps meet it), not the next multiple of 16
    assert warm[1] == max(width for _, width in shapes) == 49, (warm, shapes)
    assert_same_weights(padded, unpadded, atol=1e-5)
