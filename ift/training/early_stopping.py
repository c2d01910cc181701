"""The best validation so far and early stopping, on `training.metric_for_best_model`."""

from __future__ import annotations

from ift.metrics import higher_is_better
from ift.recipe import TrainingConfig
from ift.training.checkpoints import Progress


def track_best(progress: Progress, metrics: dict, t: TrainingConfig) -> bool:
    """Record this evaluation in `progress`; True when it is the best so far."""
    name = t.metric_for_best_model.removeprefix("validation.")
    value = metrics.get(name)
    if value is None:
        return False
    higher = t.greater_is_better if t.greater_is_better is not None else higher_is_better(name)
    better = progress.best_metric is None or (value > progress.best_metric if higher else value < progress.best_metric)
    if better:
        progress.best_metric, progress.best_step, progress.evals_without_improvement = value, progress.step, 0
        progress.best_validation = metrics
    else:
        progress.evals_without_improvement += 1
    return better


def early_stop(progress: Progress, t: TrainingConfig) -> bool:
    return bool(t.early_stopping_patience) and progress.evals_without_improvement >= t.early_stopping_patience
