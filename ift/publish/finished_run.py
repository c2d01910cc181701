"""What a finished training run writes and publishes, from the figures it holds in memory: the plots, the card
(written once: the push uploads it as it is), the model and the prepared splits on the Hub, and the
base-vs-fine-tuned table on the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ift.evaluation.compare import print_compare
from ift.publish.card import write_model_card
from ift.publish.hub import push, push_dataset
from ift.recipe import Recipe
from ift.training.plots import write_plots


def publish_finished_run(run_dir: Path, recipe: Recipe, *, metrics: dict, data_report: dict, library, prepared,
                         say: Callable[[str], None]) -> None:
    """`metrics` and `data_report` are metrics.json and data_report.json as the run wrote them."""
    write_plots(run_dir, metrics)
    write_model_card(run_dir, recipe, library=library, metrics=metrics, data_report=data_report)
    hub = recipe.hub
    if hub.push:
        url = push(run_dir, hub.repo_id, private=hub.private, merge=hub.merge, revision=hub.revision,
                   commit_message=hub.commit_message, recipe=recipe, card_written=True)
        say(f"pushed: {url}")
        if hub.push_dataset:
            url = push_dataset(prepared, recipe, hub.push_dataset, private=hub.private, report=say)
            say(f"pushed the prepared splits: {url}")
    if (metrics.get("base") or {}).get("test") and metrics.get("test"):
        print_compare(run_dir, "test", metrics)
