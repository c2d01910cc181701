"""ift/training/trackers.py: the recipe's trackers, their run name and tags; per-step figures reach TensorBoard."""

from __future__ import annotations

from ift.training.trackers import installed_trackers, tracker_init_kwargs
from test_train import run_train, toy_recipe


def test_run_name_and_tags_in_each_trackers_words():
    kwargs = tracker_init_kwargs(["wandb", "mlflow", "trackio", "tensorboard"], "pb-lora", ["finance", "lora"])
    assert kwargs["wandb"] == {"name": "pb-lora", "tags": ["finance", "lora"]}
    assert kwargs["mlflow"] == {"run_name": "pb-lora", "tags": {"finance": "true", "lora": "true"}}
    assert kwargs["trackio"] == {"name": "pb-lora"} and "tensorboard" not in kwargs


def test_a_tracker_that_is_not_installed_is_named_and_skipped(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert installed_trackers(["tensorboard", "mlflow", "none"]) == (["tensorboard"], ["mlflow"])
    run = run_train(toy_recipe(tmp_path, max_steps=2, eval_steps=2, save_steps=2, report_to=["mlflow"],
                               evaluation={"metrics": ["loss"]}))
    assert "training.report_to names mlflow, which is not installed (pip install mlflow)" in capsys.readouterr().out
    assert (run / "final").is_dir()


def test_tensorboard_gets_loss_learning_rate_and_grad_norm_every_logged_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = run_train(toy_recipe(tmp_path, max_steps=4, eval_steps=4, save_steps=4, logging_steps=1,
                               report_to=["tensorboard"], run_name="toy-run", evaluation={"metrics": ["loss"]}))
    events = [p for p in (run / "logs").rglob("events.out.tfevents.*")]
    assert events
    tags: set = set()
    steps: dict = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags.add(tag)
            steps[tag] = [e.step for e in acc.Scalars(tag)]
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "validation/loss"} <= tags, tags
    assert steps["train/grad_norm"] == [1, 2, 3, 4]
