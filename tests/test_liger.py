"""ift/training/liger.py: `model.liger`'s decision and refusals, which run on the CPU.

Liger's kernels themselves are Triton (CUDA): their loss against ift's, and the speed with and without, are the
GPU check's part `liger` (bench/gpu_check.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml

from ift.errors import IftError
from ift.recipe import ModelConfig, Recipe, load_recipe
from ift.training.liger import FUSED_HEADS, LigerChoice, apply_liger, liger_choice
from ift.training.loss import LOGIT_TRANSFORMS
from test_train import run_train, toy_recipe

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def scratch(config: dict, liger) -> ModelConfig:
    return ModelConfig(init="scratch", config=config, liger=liger)


@pytest.fixture()
def no_liger_kernel(monkeypatch):
    """This machine as one without liger-kernel, whether or not it is installed here."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real(name, *a))


def test_true_on_the_cpu_is_refused_in_one_error_before_anything_loads(tmp_path, capsys):
    from ift.cli import main

    recipe = toy_recipe(tmp_path)
    raw = yaml.safe_load(recipe.read_text())
    raw["model"] = {"name_or_path": str(tmp_path / "no-such-model"), "liger": True}  # never read: refused first
    recipe.write_text(yaml.safe_dump(raw))
    code = main(["train", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "model.liger: true, but this run is on the cpu and Liger's Triton kernels need a CUDA GPU" in lines[0]
    assert "(model.liger)" in lines[0] and "set model.liger: auto (on where it can run) or false" in lines[0]
    assert not (tmp_path / "run" / "recipe.yaml").exists()


def test_auto_trains_without_liger_on_the_cpu_says_why_and_the_run_records_it(tmp_path, capsys):
    run = run_train(toy_recipe(tmp_path, max_steps=2, eval_steps=2, save_steps=2, evaluation={"metrics": ["loss"]}))
    out = capsys.readouterr().out
    assert "liger: off (this run is on the cpu and Liger's Triton kernels need a CUDA GPU)" in out
    assert load_recipe(run / "recipe.yaml").model.liger is False
    run_false = run_train(toy_recipe(tmp_path / "off", max_steps=2, eval_steps=2, save_steps=2,
                                     evaluation={"metrics": ["loss"]}), "model.liger=false")
    assert "liger:" not in capsys.readouterr().out  # asked off: nothing to explain
    assert load_recipe(run_false / "recipe.yaml").model.liger is False


def test_true_without_liger_kernel_is_refused_naming_the_extra(no_liger_kernel):
    with pytest.raises(IftError) as err:
        liger_choice(scratch(LLAMA, True), "cuda")
    assert err.value.where == "model.liger" and err.value.what == "model.liger: true, but liger-kernel is not installed"
    assert "pip install 'ift[liger]'" in err.value.fix
    off = liger_choice(scratch(LLAMA, "auto"), "cuda")
    assert off == LigerChoice(False, "liger-kernel is not installed")


@pytest.mark.parametrize("config, named", [
    ({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 4}, "model_type gpt2"),
    ({"model_type": "t5", "d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 1, "num_heads": 4},
     "model_type t5 (seq2seq)"),
])
def test_an_architecture_without_a_liger_path_is_refused_before_the_package_is_asked(config, named, no_liger_kernel):
    with pytest.raises(IftError) as err:
        liger_choice(scratch(config, True), "cuda")
    assert f"ift has no Liger path for {named}" in err.value.what and "llama" in err.value.what
    assert err.value.where == "model.liger"
    assert not liger_choice(scratch(config, "auto"), "cuda").on


def test_zero3_is_refused_and_auto_leaves_it_off():
    with pytest.raises(IftError, match="ZeRO-3"):
        liger_choice(scratch(LLAMA, True), "cuda", zero_stage=3)
    assert not liger_choice(scratch(LLAMA, "auto"), "cuda", zero_stage=3).on


def test_false_decides_without_reading_the_model(tmp_path):
    missing = ModelConfig(name_or_path=str(tmp_path / "absent"), liger=False)
    assert liger_choice(missing, "cuda") == LigerChoice(False, "model.liger: false")


def test_the_recipe_key_takes_auto_true_or_false(tmp_path):
    recipe = toy_recipe(tmp_path)
    assert load_recipe(recipe).model.liger == "auto"
    assert load_recipe(recipe, ["model.liger=true"]).model.liger is True
    with pytest.raises(IftError) as err:
        load_recipe(recipe, ["model.liger=sometimes"])
    assert "model.liger" in str(err.value)


def test_an_adapter_on_the_output_layer_turns_liger_off_or_is_refused(tiny_llama, tmp_path):
    """The fused loss reads the head's bare weight: a LoRA (or trainable tokens) on it would be left out."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    said: list[str] = []
    auto = Recipe.model_validate(yaml.safe_load(toy_recipe(tmp_path).read_text()))
    pinned = apply_liger(model, auto, LigerChoice(True, "test"), said.append)
    assert pinned.model.liger is False
    assert said[0].startswith("liger: off (the output layer is a peft.tuners.lora.layer.Linear (an adapter on it")
    forced = auto.model_copy(update={"model": auto.model.model_copy(update={"liger": True})})
    with pytest.raises(IftError, match="model.liger: true, but the output layer is a"):
        apply_liger(model, forced, LigerChoice(True, "test"), said.append)


@pytest.mark.parametrize("model_type", sorted(FUSED_HEADS))
def test_the_fused_head_reproduces_the_models_logits(model_type):
    """Liger computes softcap(scale * h @ W.T); each covered architecture's forward gives the same logits."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    if model_type == "gemma2":
        config.final_logit_softcapping = 3.0
    if model_type == "granite":
        config.logits_scaling = 4.0
    torch.manual_seed(0)
    hidden, weight = torch.randn(5, 16), torch.randn(40, 16)
    scale, softcap = FUSED_HEADS[model_type](config)
    fused = (scale * hidden) @ weight.T
    if softcap:
        fused = torch.tanh(fused / softcap) * softcap
    torch.testing.assert_close(fused, LOGIT_TRANSFORMS[model_type](config)(hidden @ weight.T))
