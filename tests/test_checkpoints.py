"""Checkpoints hold the trainable state only, and load back exactly: LoRA, QLoRA (bitsandbytes' 4-bit layers run
on the CPU), and the best-checkpoint reload that final/ and the test figures come from."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from safetensors import safe_open

from ift.errors import IftError
from test_train import assert_same_weights, final_weights, run_train, toy_recipe


def _saved_keys(checkpoint) -> set[str]:
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def _qlora_recipe(folder, **training):
    pytest.importorskip("bitsandbytes")
    # best by loss, with greater_is_better: the first evaluation is the best, so the best step is not the last
    return toy_recipe(folder, adapter="qlora", max_steps=12, eval_steps=4, save_steps=4, learning_rate=3e-2,
                      metric_for_best_model="loss", greater_is_better=True, **training)


def test_lora_checkpoints_hold_the_adapter_not_the_frozen_base(tmp_path):
    run = run_train(toy_recipe(tmp_path, adapter="lora", max_steps=4, save_steps=4, eval_steps=100))
    saved = _saved_keys(run / "checkpoints" / "step-4")
    assert saved and all("lora_" in key for key in saved), sorted(saved)[:5]
    assert len(saved) == len(final_weights(run))  # the adapter's weights, each once
    base = (run.parent / "base" / "model.safetensors").stat().st_size
    assert (run / "checkpoints" / "step-4" / "model.safetensors").stat().st_size < base / 4


def _assert_resume_is_bit_exact(make_recipe, tmp_path) -> None:
    """A run, and the same run cut back to its step-4 checkpoint and resumed: the same final weights."""
    a = run_train(make_recipe(tmp_path / "a"))
    b_recipe = make_recipe(tmp_path / "b")
    b = run_train(b_recipe)
    for step in (8, 12):
        shutil.rmtree(b / "checkpoints" / f"step-{step}")
    shutil.rmtree(b / "final")
    run_train(b_recipe, resume="auto")
    assert_same_weights(final_weights(a), final_weights(b))


def test_lora_resume_from_a_trainable_only_checkpoint_is_bit_exact(tmp_path):
    _assert_resume_is_bit_exact(lambda folder: toy_recipe(folder, adapter="lora", dropout=0.1), tmp_path)


def test_a_qlora_run_whose_best_step_is_not_its_last_ends_with_final(tmp_path):
    run = run_train(_qlora_recipe(tmp_path))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best"]["step"] == 4  # not 12: finish() reloads step-4
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert "test" in metrics
    saved = _saved_keys(run / "checkpoints" / "step-4")
    assert not any("absmax" in k or "quant" in k for k in saved) and all("lora_" in k for k in saved)
    # final/ holds the step-4 adapter, not the last step's
    with safe_open(str(run / "checkpoints" / "step-4" / "model.safetensors"), framework="pt") as f:
        step4 = {k.split("base_model.model.", 1)[1]: f.get_tensor(k) for k in f.keys()}
    final = {k.split("base_model.model.", 1)[1].replace(".weight", ".default.weight"): v
             for k, v in final_weights(run).items()}
    assert_same_weights(step4, final)


def test_qlora_resume_is_bit_exact(tmp_path):
    _assert_resume_is_bit_exact(_qlora_recipe, tmp_path)


def test_a_checkpoint_of_another_adapter_is_refused_by_name(tmp_path):
    recipe = toy_recipe(tmp_path, adapter="lora", max_steps=4, save_steps=4, eval_steps=100)
    run = run_train(recipe)
    shutil.rmtree(run / "final")
    raw = yaml.safe_load(recipe.read_text())
    raw["adapter"]["target_modules"] = ["q_proj"]  # fewer LoRA layers: the file has weights this model lacks
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(IftError, match=r"step-4 does not match this model: \d+ weights this model does not have"):
        run_train(recipe, resume="auto")
