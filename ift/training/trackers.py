"""Experiment trackers (Accelerate's): which of the recipe's are installed, and each one's run name and tags."""

from __future__ import annotations

import importlib.util

# training.report_to name -> the package that must import (and what pip installs)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
            "comet_ml": "comet_ml", "clearml": "clearml", "aim": "aim", "dvclive": "dvclive", "swanlab": "swanlab"}


def usable_trackers(names: list[str], say) -> list[str]:
    """The recipe's trackers that are installed; each one that is not is named in a note, and skipped."""
    found, missing = installed_trackers(names)
    for name in missing:
        say(f"note: training.report_to names {name}, which is not installed (pip install {PACKAGES[name]}): "
            "not logged")
    return found


def start_trackers(accelerator, recipe, names: list[str], run_name: str) -> None:
    """Accelerate's trackers started on the main process, with the recipe's settings as the run's config."""
    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers("ift", config=flat_config(recipe), init_kwargs=tracker_init_kwargs(
            names, run_name, recipe.training.tags))


def installed_trackers(names: list[str]) -> tuple[list[str], list[str]]:
    """(the trackers to log with, the ones named but not installed)."""
    wanted = [n for n in names if n != "none"]
    missing = [n for n in wanted if importlib.util.find_spec(PACKAGES[n]) is None]
    return [n for n in wanted if n not in missing], missing


def tracker_init_kwargs(names: list[str], run_name: str, tags: list[str]) -> dict[str, dict]:
    """Accelerate's `init_trackers(init_kwargs=...)`: the run's name and tags in each tracker's own words (wandb,
    mlflow, trackio, comet_ml, clearml; the others take Accelerate's defaults under the project name "ift")."""
    kwargs: dict[str, dict] = {}
    if "wandb" in names:
        kwargs["wandb"] = {"name": run_name, "tags": list(tags)}
    if "mlflow" in names:
        kwargs["mlflow"] = {"run_name": run_name, "tags": {tag: "true" for tag in tags}}
    if "trackio" in names:  # trackio runs have no tags: they are kept in the run's config
        kwargs["trackio"] = {"name": run_name, "config": {"tags": list(tags)}}
    if "comet_ml" in names:
        from comet_ml import ExperimentConfig

        kwargs["comet_ml"] = {"experiment_config": ExperimentConfig(name=run_name, tags=list(tags))}
    if "clearml" in names:  # the project is Accelerate's ("ift"), the task this run
        kwargs["clearml"] = {"task_name": run_name, "tags": list(tags)}
    return kwargs


def flat_config(recipe) -> dict:
    """The recipe's scalar settings as `section.key` hyperparameters, for the trackers' config panels."""
    flat = {}
    for section, values in recipe.model_dump(mode="json").items():
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
    return flat
