"""ift/training/neftune.py: transformers' NEFTune noise on the input embeddings, in training only."""

from __future__ import annotations

import json
import math

import torch

from conftest import build_tiny_llama
from ift.training.neftune import add_neftune
from test_train import final_weights, run_train, toy_recipe


def test_noise_while_training_within_its_bound_and_none_at_evaluation(tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer)
    ids = torch.randint(4, len(tiny_tokenizer), (2, 10))
    embedding = model.get_input_embeddings()
    clean = embedding(ids).detach()
    handle = add_neftune(model, 5.0)
    model.eval()
    assert torch.equal(embedding(ids), clean)
    model.train()
    noisy = embedding(ids).detach()
    bound = 5.0 / math.sqrt(10 * clean.shape[-1])  # alpha / sqrt(length * hidden)
    assert not torch.equal(noisy, clean) and (noisy - clean).abs().max() <= bound + 1e-6
    handle.remove()
    assert torch.equal(embedding(ids), clean)


def test_a_neftune_run_trains_differently_and_evaluates_without_noise(tmp_path):
    common = dict(max_steps=4, eval_steps=4, save_steps=4, evaluation={"metrics": ["loss"]})
    plain = run_train(toy_recipe(tmp_path / "plain", **common))
    noisy = run_train(toy_recipe(tmp_path / "noisy", neftune_noise_alpha=5.0, **common))
    a, b = final_weights(plain), final_weights(noisy)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # the test loss is a function of the weights: evaluating twice gives one figure (no noise in eval mode)
    from ift.recipe import load_recipe
    from ift.train import FineTune
    from test_train import reset_accelerate_state

    reset_accelerate_state()
    metrics = json.loads((noisy / "metrics.json").read_text())
    assert math.isfinite(metrics["test"]["loss"])
    run = FineTune(load_recipe(noisy / "recipe.yaml", ["training.overwrite_output_dir=true",
                                                      f"training.output_dir={tmp_path / 'again'}"]))
    try:
        run.setup()
        from ift.evaluation.in_training import mean_loss

        first = mean_loss(run.accelerator, run.loss_model, run.val_dl)
        second = mean_loss(run.accelerator, run.loss_model, run.val_dl)
    finally:
        run.cleanup()
    assert first == second
