"""ift/training/trackers.py: the recipe's trackers, their run name and tags; per-step figures reach each tracker.

Every tracker the dev extra installs is run in its offline or local mode, the way a user's environment selects it
(the variables in OFFLINE, set for the training process only; ift reads none of them), and the loss, learning rate
and gradient norm of every logged step, the run name and the tags are read back from the tracker's own store.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ift.training.trackers import installed_trackers, tracker_init_kwargs
from test_train import run_train, toy_recipe

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
SERIES = {"train/loss": "train_loss", "train/learning_rate": "learning_rate", "train/grad_norm": "grad_norm"}


def test_run_name_and_tags_in_each_trackers_words():
    kwargs = tracker_init_kwargs(["wandb", "mlflow", "trackio", "clearml", "tensorboard"], "pb-lora",
                                 ["finance", "lora"])
    assert kwargs["wandb"] == {"name": "pb-lora", "tags": ["finance", "lora"]}
    assert kwargs["mlflow"] == {"run_name": "pb-lora", "tags": {"finance": "true", "lora": "true"}}
    assert kwargs["trackio"] == {"name": "pb-lora", "config": {"tags": ["finance", "lora"]}}
    assert kwargs["clearml"] == {"task_name": "pb-lora", "tags": ["finance", "lora"]}
    assert "tensorboard" not in kwargs


def test_a_tracker_that_is_not_installed_is_named_and_skipped(tmp_path, capsys, monkeypatch):
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


# ------------------------------------------------------------------ offline and local stores, read back

# the user's environment for each tracker's offline or local mode (store under `tmp`)
OFFLINE = {
    # mlflow-skinny has no database store; MLflow 3 keeps its file store behind an opt-in
    "mlflow": lambda tmp: {"MLFLOW_TRACKING_URI": (tmp / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"},
    "wandb": lambda tmp: {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true"},
    "trackio": lambda tmp: {"TRACKIO_DIR": str(tmp / "trackio")},
    "comet_ml": lambda tmp: {"COMET_START_ONLINE": "false", "COMET_OFFLINE_DIRECTORY": str(tmp / "comet")},
}


def read_mlflow(tmp: Path) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(tmp / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("ift").experiment_id])
    series = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} for key in SERIES}
    tags = {k for k, v in run.data.tags.items() if v == "true"}
    return {"name": run.info.run_name, "tags": tags, "series": series}


def read_wandb(tmp: Path) -> dict:
    """The offline run's transaction log: W&B's LevelDB-style records (32 KiB blocks, 7-byte headers) of
    protobuf `Record`s; the run record holds name and tags, history records the logged values."""
    from wandb.proto import wandb_internal_pb2 as pb

    [path] = tmp.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, chunks, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(chunks)
        if kind in (0, 1, 4):
            chunks = b""
    out: dict = {"series": {key: {} for key in SERIES}}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "run":
            out["name"], out["tags"] = record.run.display_name, set(record.run.tags)
        elif record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key in SERIES:
                if key in items:
                    out["series"][key][int(items["_step"])] = items[key]
    return out


def read_trackio(tmp: Path) -> dict:
    db = sqlite3.connect(tmp / "trackio" / "ift.db")
    [(name, config)] = db.execute("SELECT run_name, config FROM configs").fetchall()
    series: dict = {key: {} for key in SERIES}
    for step, metrics in db.execute("SELECT step, metrics FROM metrics WHERE run_name = ?", (name,)):
        for key, value in json.loads(metrics).items():
            if key in series:
                series[key][step] = value
    return {"name": name, "tags": set(json.loads(config)["tags"]), "series": series}


def read_comet(tmp: Path) -> dict:
    [archive] = (tmp / "comet").glob("*.zip")
    with zipfile.ZipFile(archive) as z:
        experiment = json.loads(z.read("experiment.json"))
        messages = [json.loads(line) for line in z.read("messages.json").decode().splitlines()]
    series: dict = {key: {} for key in SERIES}
    name = None
    for m in messages:
        if m["type"] == "metric_msg" and m["payload"]["metric"]["metricName"] in series:
            metric = m["payload"]["metric"]
            series[metric["metricName"]][metric["step"]] = metric["metricValue"]
        elif m["type"] == "log_other" and m["payload"]["key"] == "Name":
            name = m["payload"]["value"]
    return {"name": name, "tags": set(experiment["tags"]), "series": series}


READERS = {"mlflow": read_mlflow, "wandb": read_wandb, "trackio": read_trackio, "comet_ml": read_comet}


@pytest.mark.slow
@pytest.mark.parametrize("tracker", sorted(OFFLINE))
def test_each_tracker_offline_gets_every_steps_figures_the_run_name_and_tags(tracker, tmp_path, monkeypatch):
    recipe = toy_recipe(tmp_path, max_steps=STEPS, eval_steps=STEPS, save_steps=STEPS, logging_steps=1,
                        report_to=[tracker], run_name="toy-run", tags=["toy", "offline"],
                        evaluation={"metrics": ["loss"]})
    for key, value in OFFLINE[tracker](tmp_path).items():
        monkeypatch.setenv(key, value)
    # a fresh process, as a user runs it: some trackers read their settings once, at import
    proc = subprocess.run([sys.executable, "-m", "ift", "train", str(recipe)], cwd=tmp_path, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    logged = READERS[tracker](tmp_path)
    history = [h for h in json.loads((tmp_path / "run" / "metrics.json").read_text())["history"] if "train_loss" in h]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    assert logged["name"] == "toy-run" and {"toy", "offline"} <= logged["tags"], logged
    for key, field in SERIES.items():
        assert logged["series"][key] == pytest.approx({h["step"]: h[field] for h in history}, rel=1e-6), key
