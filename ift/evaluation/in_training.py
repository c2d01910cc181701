"""Evaluation from inside a training run, on Accelerate's prepared model: the loss over a split, the figures a
recipe asks for (accuracy, ROUGE, evaluate modules) with the weights held whole under FSDP2, the untuned base on
the test rows, and the benchmarks on base and fine-tuned."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import ift.evaluation.evaluate as evaluation  # through the module: tests watch evaluation.evaluate
from ift.run import RunDir
from ift.errors import IftError
from ift.evaluation.benchmarks import base_and_fine_tuned
from ift.metrics import headline_text, needs_predictions
from ift.modeling.loading import load
from ift.recipe import AdapterConfig, Recipe


def mean_loss(accelerator, loss_model, dataloader) -> float:
    """Mean token loss over a prepared loader; the rows Accelerate repeats to even out the shards are dropped."""
    import torch

    loss_model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in dataloader:
            sums, counts = loss_model(**batch, per_row=True)
            rows = torch.stack([sums.double(), counts.double()], dim=1)
            total += accelerator.gather_for_metrics(rows).sum(0)
    return float(total[0] / max(float(total[1]), 1.0))


@contextlib.contextmanager
def full_weights(model, reshard_after_forward: bool = True):
    """Every FSDP2 unit of `model` unsharded for the duration, and kept so between forwards.

    Accuracy and ROUGE run the inner model on each process's own share of the rows, with a different number of
    forward passes per process (choices, early EOS): sharded units would wait on all-gathers the other processes
    never join. Holding the full weights (as DDP does anyway) makes every forward local. Outside FSDP2: no-op.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            # the root keeps its weights after forward (FSDP2's own rule: backward needs them at once)
            unit.set_reshard_after_forward(reshard_after_forward and unit is not model, recurse=False)


def check_sharded_evaluation(accelerator, recipe: Recipe) -> None:
    """Generation-based metrics need local forwards: FSDP2 (see full_weights) gives them, FSDP1/ZeRO-3 do not."""
    from accelerate.utils import DistributedType

    if not needs_predictions(recipe.evaluation.metrics):
        return
    fsdp1 = accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    zero3 = accelerator.distributed_type == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3
    if fsdp1 or zero3:
        raise IftError(f"accuracy/ROUGE evaluation cannot run on {'FSDP version 1' if fsdp1 else 'ZeRO stage 3'} "
                       "shards (each process would need the others for every forward)", "evaluation.metrics",
                       "use fsdp_version: 2 in the accelerate config, or evaluation.metrics: [loss] during training "
                       "and `ift eval RUN` afterwards")


def split_metrics(accelerator, loss_model, loader, rows, recipe: Recipe, tokenizer, kind: str, *, desc: str,
                  limit: int | None = None) -> tuple[dict, list[dict]]:
    """(figures, predictions) of the prepared model on a split: the loss over every token of its loader, then
    accuracy / ROUGE / evaluate modules on its rows (ift.evaluation.evaluate), under the training's autocast."""
    metrics: dict = {}
    predictions: list[dict] = []
    ev = recipe.evaluation
    if "loss" in ev.metrics:
        metrics["loss"] = mean_loss(accelerator, loss_model, loader)
    if needs_predictions(ev.metrics):
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        with full_weights(loss_model, bool(getattr(plugin, "reshard_after_forward", True))), accelerator.autocast():
            scores, predictions = evaluation.evaluate(
                accelerator.unwrap_model(loss_model).model, tokenizer, kind, rows, ev,
                chat_template=recipe.data.wraps_pairs, accelerator=accelerator, limit=limit, desc=desc)
        metrics.update(scores)
    return metrics, predictions


def load_base(recipe: Recipe, tokenizer, device):
    """The untuned model a full fine-tune started from, loaded again."""
    return load(recipe.model, AdapterConfig(), tokenizer=tokenizer).model.to(device)


def base_test(accelerator, model, recipe: Recipe, kind: str, rows, tokenizer) -> tuple[dict, list[dict]]:
    """The untuned model on the same rows: the adapter switched off, or the base reloaded for a full fine-tune."""
    ev = recipe.evaluation
    if hasattr(model, "disable_adapter"):
        switched_off, base = model.disable_adapter(), model
    else:
        switched_off, base = contextlib.nullcontext(), load_base(recipe, tokenizer, accelerator.device)
    with switched_off:
        scores, predictions = evaluation.evaluate(base, tokenizer, kind, rows, ev, accelerator=accelerator,
                                                  chat_template=recipe.data.wraps_pairs, desc="base test")
    accelerator.print("base test: " + headline_text(scores))
    return scores, predictions


def run_benchmarks(accelerator, model, recipe: Recipe, kind: str, tokenizer, say: Callable[[str], None]) -> dict | None:
    """evaluation.benchmarks on the final weights and the base (ift.evaluation.benchmarks), under the test's
    autocast; lm-eval runs an in-memory model in one process, so a run of several leaves it to `ift eval`."""
    if accelerator.num_processes > 1:
        say(f"note: benchmarks run in one process: `ift eval {recipe.training.output_dir} --benchmarks` runs them")
        return None
    with accelerator.autocast():
        return base_and_fine_tuned(model, tokenizer, kind, recipe.evaluation, say=say,
                                   load_base=lambda: load_base(recipe, tokenizer, accelerator.device))


@dataclass
class TestEvaluation:
    """One of a run's own test evaluations, before it is recorded."""

    model: str  # "fine-tuned" | "base"
    metrics: dict
    predictions: list[dict]
    weights: str  # what was evaluated, in words
    name: str  # its predictions file: predictions/<name>.jsonl


def record_tests(rd: RunDir, evaluations: list[TestEvaluation], *, rows: int, dtype: str,
                 quantization: str | None) -> dict:
    """Each evaluation's predictions file and evaluation record; returns the metrics.json sections they fill
    (`test`, and `base.test`), each naming its record."""
    sections: dict = {}
    for e in evaluations:
        path = None
        if e.predictions:
            path = rd.predictions(e.name)
            evaluation.write_predictions(path, e.predictions)
        record = rd.add_evaluation(model=e.model, split="test", metrics=e.metrics, rows=rows, limit=None,
                                   weights=e.weights, dtype=dtype, quantization=quantization, predictions=path,
                                   by="train")
        target = sections if e.model == "fine-tuned" else sections.setdefault("base", {})
        target["test"] = {**e.metrics, "record": record["id"]}
    return sections
