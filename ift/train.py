"""The main job: `accelerate launch ift/train.py RECIPE [key.path=value ...]` (or `ift train RECIPE`).

One Accelerate loop, read top to bottom in `train()`: recipe -> splits -> model -> tokens -> optimizer
-> steps (accumulate, clip, step, log, evaluate, checkpoint) -> test evaluation -> final weights -> card.
Devices and distribution come only from Accelerate (CPU, one GPU, DDP, FSDP, DeepSpeed).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ift.recipe import TrainingConfig

if __package__ in (None, ""):
    # run as a script by `accelerate launch ift/train.py`: ift/ itself is on sys.path, not the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ift.errors import IftError
from ift.recipe import Recipe, load_recipe

STATE_FILE = "trainer_state.json"


@dataclass
class Progress:
    """What a checkpoint must carry besides Accelerate's state to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    tokens_seen: int = 0
    history: list[dict] = field(default_factory=list)


class Stop(Exception):
    """Raised by the signal handler's flag check: save a checkpoint, then exit."""


def train(recipe: Recipe, *, resume: bool | str | None = None) -> Path:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from ift.data import Collator, build_splits, eval_dataloader, tokenize, train_dataloader
    from ift.loss import CompletionLoss, count_loss_tokens
    from ift.modeling import count_parameters, load
    from ift.templates import TemplateLibrary

    t = recipe.training
    run_dir = Path(t.output_dir)
    resume = t.resume if resume is None else resume
    checkpoint = _find_checkpoint(run_dir, resume)
    if checkpoint is None:
        _check_fresh_run_dir(run_dir, t.overwrite_output_dir)

    accelerator = Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        log_with=[r for r in t.report_to if r != "none" and _tracker_available(r)] or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    main = accelerator.is_main_process
    say = accelerator.print
    set_seed(t.seed)

    # 1. data: templated splits (datasets caches them), then the model and its tokenizer, then tokens
    library = TemplateLibrary(dirs=tuple(recipe.data.templates_dir))
    with accelerator.main_process_first():
        prepared = build_splits(recipe.data, library)
    recipe = recipe.model_copy(update={"data": prepared.data})  # carved splits pinned: recipe.yaml reproduces them
    train_texts = (p + " " + c for p, c in zip(prepared.splits["train"]["prompt"], prepared.splits["train"]["completion"]))
    tokenizer = _saved_tokenizer(checkpoint)
    loaded = load(recipe.model, recipe.adapter, gradient_checkpointing=t.gradient_checkpointing,
                  train_texts=train_texts, tokenizer=tokenizer)
    model, tokenizer, kind = loaded.model, loaded.tokenizer, loaded.kind
    total, trainable = count_parameters(model)
    say(f"model: {loaded.source} ({kind}), {total:,} parameters, {trainable:,} trainable "
        f"({100 * trainable / max(total, 1):.2f}%)")
    with accelerator.main_process_first():
        tokens, token_report = tokenize(prepared.splits, tokenizer, kind, recipe.data)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        recipe.save(run_dir / "recipe.yaml")
        _write_json(run_dir / "data_report.json", {"splits": prepared.report, "tokens": token_report})
        tokenizer.save_pretrained(run_dir / "tokenizer")

    collator = Collator(tokenizer, kind, packing=recipe.data.packing)
    train_dl = train_dataloader(tokens["train"], t.per_device_train_batch_size, collator, seed=t.seed,
                                group_by_length=recipe.data.group_by_length, num_workers=t.dataloader_num_workers)
    val_dl = eval_dataloader(tokens["validation"], t.per_device_eval_batch_size, collator)

    # 2. optimizer and schedule: AdamW without weight decay on biases and norms
    steps_per_epoch = math.ceil(len(train_dl) / t.gradient_accumulation_steps)
    max_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    warmup = t.warmup_steps or int(t.warmup_ratio * max_steps)
    optimizer = _adamw(_param_groups(model, t.weight_decay), t, accelerator)
    scheduler = _scheduler(optimizer, t.lr_scheduler_type, warmup, max_steps)

    loss_model = CompletionLoss(model, kind)
    loss_model, optimizer, train_dl, val_dl = accelerator.prepare(loss_model, optimizer, train_dl, val_dl)
    # The scheduler is stepped by hand once per optimizer step (Accelerate's wrapper would step it
    # once per process); it is still saved and restored with the rest of the state.
    accelerator.register_for_checkpointing(scheduler)

    progress = Progress()
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        progress = Progress(**json.loads((checkpoint / STATE_FILE).read_text()))
        say(f"resumed from {checkpoint} at step {progress.step}")
    if main:
        accelerator.init_trackers("ift", config=_flat_config(recipe)) if accelerator.log_with else None

    stop_requested = _install_signal_handlers()
    eval_every = t.eval_steps or steps_per_epoch
    save_every = t.save_steps or steps_per_epoch
    accum = t.gradient_accumulation_steps
    bar = tqdm(total=max_steps, initial=progress.step, disable=not main, desc="train", dynamic_ncols=True)
    window_loss, window_tokens, window_seqtokens, window_start = 0.0, 0, 0, time.perf_counter()

    def evaluate_now() -> dict:
        metrics = _validate(accelerator, loss_model, val_dl, kind, recipe, prepared.splits["validation"], tokenizer)
        improved = _track_best(progress, metrics, t)
        progress.history.append({"step": progress.step, "validation": _headline(metrics)})
        if main:
            _update_metrics(run_dir, progress, {"validation": metrics})
        accelerator.log({f"validation/{k}": v for k, v in _headline(metrics).items()}, step=progress.step)
        say(f"step {progress.step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in _headline(metrics).items())
            + (" (best)" if improved else ""))
        return metrics

    # 3. the loop
    try:
        while progress.step < max_steps:
            train_dl.set_epoch(progress.epoch)
            batches = accelerator.skip_first_batches(train_dl, progress.batches_in_epoch) \
                if progress.batches_in_epoch else train_dl
            loss_model.train()
            for window in _windows(batches, accum):
                # mean over every loss token of the accumulated, gathered batch: count them first
                n_local = sum(count_loss_tokens(b, kind) for b in window)
                n_total = int(accelerator.gather(torch.tensor([n_local], device=accelerator.device)).sum())
                for batch in window:
                    with accelerator.accumulate(loss_model):
                        loss_sum, _ = loss_model(**batch)
                        if not torch.isfinite(loss_sum):
                            raise IftError(f"the loss became {loss_sum.item()} at step {progress.step + 1}",
                                           str(run_dir), "lower training.learning_rate or use mixed_precision: no; "
                                           "the last good checkpoint is kept in checkpoints/")
                        # DDP averages gradients over processes and Accelerate divides by `accum`:
                        # undo both so the gradient is that of sum(loss) / n_total
                        scale = accelerator.num_processes * accum / max(n_total, 1)
                        accelerator.backward(loss_sum * scale)
                        if accelerator.sync_gradients and t.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(loss_model.parameters(), t.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    window_loss += loss_sum.item()
                    window_seqtokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch \
                        else batch["input_ids"].numel()
                    progress.batches_in_epoch += 1
                window_tokens += n_total
                progress.tokens_seen += n_total
                scheduler.step()
                progress.step += 1
                bar.update(1)

                if progress.step % t.logging_steps == 0 or progress.step == max_steps:
                    elapsed = time.perf_counter() - window_start
                    local = torch.tensor([window_loss, window_seqtokens], device=accelerator.device, dtype=torch.float64)
                    summed = accelerator.gather(local.unsqueeze(0)).sum(0)
                    train_loss = float(summed[0]) / max(window_tokens, 1)
                    tok_s = float(summed[1]) / max(elapsed, 1e-9)
                    lr = scheduler.get_last_lr()[0]
                    bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                    progress.history.append({"step": progress.step, "train_loss": train_loss,
                                             "learning_rate": lr, "tokens_per_second": tok_s})
                    accelerator.log({"train/loss": train_loss, "train/learning_rate": lr,
                                     "train/tokens_per_second": tok_s}, step=progress.step)
                    window_loss, window_tokens, window_seqtokens, window_start = 0.0, 0, 0, time.perf_counter()

                if progress.step % eval_every == 0 or progress.step == max_steps:
                    evaluate_now()
                    loss_model.train()
                stopping = _early_stop(progress, t)
                if progress.step % save_every == 0 or progress.step == max_steps or stopping:
                    _save_checkpoint(accelerator, run_dir, progress, t.save_total_limit)
                if stopping:
                    say(f"early stopping: no improvement in {t.early_stopping_patience} evaluations")
                    max_steps = progress.step
                if stop_requested() and progress.step < max_steps:
                    raise Stop()
                if progress.step >= max_steps:
                    break
            else:
                progress.epoch += 1
                progress.batches_in_epoch = 0
    except Stop:
        _save_checkpoint(accelerator, run_dir, progress, t.save_total_limit)
        bar.close()
        say(f"stopped by signal at step {progress.step}; checkpoint saved. Continue with: "
            f"ift train {run_dir / 'recipe.yaml'} --resume")
        accelerator.end_training()
        raise SystemExit(143)
    bar.close()

    # 4. the end: best weights, test evaluation, final model, card
    unwrapped = accelerator.unwrap_model(loss_model).model
    best = _checkpoint_dir(run_dir, progress.best_step) if progress.best_step is not None else None
    if best is not None and best.exists() and progress.best_step != progress.step:
        accelerator.load_state(str(best))  # test and final/ use the best validation checkpoint
        say(f"loaded the best checkpoint (step {progress.best_step}) for the test evaluation")
    results: dict = {}
    if recipe.evaluation.test and len(prepared.splits["test"]):
        results["test"] = _test(accelerator, loss_model, kind, recipe, prepared.splits["test"], tokenizer,
                                run_dir, tokens["test"], collator)
        if recipe.evaluation.compare_base:
            results["base"] = {"test": _base_test(accelerator, unwrapped, loaded, recipe, prepared.splits["test"],
                                                  tokenizer, run_dir)}
    accelerator.wait_for_everyone()
    # every process takes part in gathering a sharded (FSDP/DeepSpeed) state dict; the main one writes it
    state = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(loss_model).items()}
    if main:
        _save_final(unwrapped, state, tokenizer, run_dir)
        _update_metrics(run_dir, progress, results)
        _finish_outputs(run_dir, recipe, library)
    accelerator.end_training()
    if main and "base" in results:
        from ift.cli.eval import print_compare

        print_compare(run_dir, "test")
    say(f"done: {run_dir}")
    return run_dir


# ---------------------------------------------------------------- steps of the loop


def _windows(batches, size: int):
    """Group micro-batches into accumulation windows (the last one may be shorter)."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # biases and normalisation weights are 1-D: decaying them only hurts
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw(groups: list[dict], t: TrainingConfig, accelerator: Accelerator):
    """AdamW, fused when asked and possible: torch's fused kernel needs float parameters on a device that has
    it, and FSDP/DeepSpeed swap the parameters for sharded ones after the optimizer is built."""
    import torch
    from accelerate.utils import DistributedType

    kwargs = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    wrapped = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                               DistributedType.MEGATRON_LM)
    if t.optim == "adamw_torch_fused" and not wrapped:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError:  # e.g. parameters on a device without the fused kernel
            pass
    return torch.optim.AdamW(groups, **kwargs)


def _scheduler(optimizer, kind: str, warmup: int, total: int):
    import torch

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _validate(accelerator, loss_model, val_dl, kind, recipe: Recipe, rows, tokenizer) -> dict:
    """Validation loss over every validation token, plus accuracy / ROUGE from ift.evaluation."""
    from ift.evaluation import evaluate

    metrics: dict = {}
    ev = recipe.evaluation
    if "loss" in ev.metrics:
        metrics["loss"] = _mean_loss(accelerator, loss_model, val_dl, kind)
    if "accuracy" in ev.metrics or "rouge" in ev.metrics:
        model = accelerator.unwrap_model(loss_model).model
        scores, _ = evaluate(model, tokenizer, kind, rows, ev, chat_template=recipe.data.chat_template,
                             accelerator=accelerator, limit=ev.max_eval_samples, desc="validation")
        metrics.update(scores)
    return metrics


def _mean_loss(accelerator, loss_model, dataloader, kind) -> float:
    import torch

    loss_model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in dataloader:
            loss_sum, n = loss_model(**batch)
            total += torch.tensor([loss_sum.item(), float(n)], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / max(total[1], 1))


def _test(accelerator, loss_model, kind, recipe: Recipe, rows, tokenizer, run_dir: Path, test_tokens, collator) -> dict:
    from ift.data import eval_dataloader
    from ift.evaluation import evaluate, write_predictions

    metrics: dict = {}
    ev = recipe.evaluation
    if "loss" in ev.metrics:
        dl = accelerator.prepare(eval_dataloader(test_tokens, recipe.training.per_device_eval_batch_size, collator))
        metrics["loss"] = _mean_loss(accelerator, loss_model, dl, kind)
    model = accelerator.unwrap_model(loss_model).model
    scores, predictions = evaluate(model, tokenizer, kind, rows, ev, chat_template=recipe.data.chat_template,
                                   accelerator=accelerator, desc="test")
    metrics.update(scores)
    if accelerator.is_main_process:
        write_predictions(run_dir / "predictions" / "test.jsonl", predictions)
    accelerator.print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in _headline(metrics).items()))
    return metrics


def _base_test(accelerator, model, loaded, recipe: Recipe, rows, tokenizer, run_dir: Path) -> dict:
    """The untuned model on the same rows: the adapter switched off, or the base reloaded for a full fine-tune."""
    from ift.evaluation import evaluate, write_predictions
    from ift.modeling import load
    from ift.recipe import AdapterConfig

    ev = recipe.evaluation
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            scores, predictions = evaluate(model, tokenizer, loaded.kind, rows, ev, accelerator=accelerator,
                                           chat_template=recipe.data.chat_template, desc="base test")
    else:
        base = load(recipe.model, AdapterConfig(), tokenizer=tokenizer).model.to(accelerator.device)
        scores, predictions = evaluate(base, tokenizer, loaded.kind, rows, ev, accelerator=accelerator,
                                       chat_template=recipe.data.chat_template, desc="base test")
    if accelerator.is_main_process:
        write_predictions(run_dir / "predictions" / "base-test.jsonl", predictions)
    accelerator.print("base test: " + ", ".join(f"{k} {v:.4f}" for k, v in _headline(scores).items()))
    return scores


def _headline(metrics: dict) -> dict:
    """The scalar metrics (breakdowns by source/template stay in metrics.json only)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "n"}


def _track_best(progress: Progress, metrics: dict, t) -> bool:
    name = t.metric_for_best_model.removeprefix("validation.")
    value = metrics.get(name)
    if value is None:
        return False
    higher = t.greater_is_better if t.greater_is_better is not None else name != "loss"
    better = progress.best_metric is None or (value > progress.best_metric if higher else value < progress.best_metric)
    if better:
        progress.best_metric, progress.best_step, progress.evals_without_improvement = value, progress.step, 0
    else:
        progress.evals_without_improvement += 1
    return better


def _early_stop(progress: Progress, t) -> bool:
    return bool(t.early_stopping_patience) and progress.evals_without_improvement >= t.early_stopping_patience


# ---------------------------------------------------------------- checkpoints and outputs


def _checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step}"


def _save_checkpoint(accelerator, run_dir: Path, progress: Progress, keep: int) -> None:
    """Accelerate state + our progress, written to a temporary folder and renamed: never half a checkpoint."""
    final = _checkpoint_dir(run_dir, progress.step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(progress)))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _prune_checkpoints(run_dir, keep, progress.best_step)
    accelerator.wait_for_everyone()


def _prune_checkpoints(run_dir: Path, keep: int, best_step: int | None) -> None:
    """Keep the last `keep` checkpoints and the best one."""
    steps = sorted(_checkpoint_steps(run_dir))
    for step in steps[:-keep]:
        if step != best_step:
            shutil.rmtree(_checkpoint_dir(run_dir, step), ignore_errors=True)


def _checkpoint_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return [int(p.name.split("-", 1)[1]) for p in folder.iterdir()
            if p.is_dir() and p.name.startswith("step-") and p.name.split("-", 1)[1].isdigit()
            and (p / STATE_FILE).exists()]


def _find_checkpoint(run_dir: Path, resume: bool | str) -> Path | None:
    if resume in (False, None, "false"):
        return None
    if isinstance(resume, str) and resume not in ("auto", "true"):
        path = Path(resume)
        if not (path / STATE_FILE).exists():
            raise IftError(f"'{resume}' is not a complete ift checkpoint", "training.resume",
                           f"give a folder from {run_dir / 'checkpoints'} or use resume: auto")
        return path
    steps = _checkpoint_steps(run_dir)
    if not steps:
        if resume == "auto":
            return None  # nothing to resume yet: start fresh
        raise IftError(f"no checkpoint to resume in {run_dir / 'checkpoints'}", "--resume",
                       "start without --resume, or point training.output_dir at the interrupted run")
    return _checkpoint_dir(run_dir, max(steps))


def _check_fresh_run_dir(run_dir: Path, overwrite: bool) -> None:
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if overwrite:
        return
    if (run_dir / "final").exists() or (run_dir / "checkpoints").exists():
        raise IftError(f"{run_dir} already holds a run", "training.output_dir",
                       "continue it with --resume, choose another output_dir, or set training.overwrite_output_dir: true")


def _saved_tokenizer(checkpoint: Path | None):
    """On resume a trained (init: scratch) tokenizer must be the one the run started with."""
    if checkpoint is None:
        return None
    folder = checkpoint.parent.parent / "tokenizer"
    if not folder.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _save_final(model, state: dict, tokenizer, run_dir: Path) -> None:
    """Adapter or full model + tokenizer, safetensors, renamed into place when complete."""
    final, tmp = run_dir / "final", run_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _update_metrics(run_dir: Path, progress: Progress, sections: dict) -> None:
    path = run_dir / "metrics.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(sections)
    data["history"] = progress.history
    if progress.best_step is not None:
        data["best"] = {"step": progress.best_step, "value": progress.best_metric}
    _write_json(path, data)


def _finish_outputs(run_dir: Path, recipe: Recipe, library) -> None:
    from ift.card import write_model_card
    from ift.plots import write_plots

    write_plots(run_dir)
    write_model_card(run_dir, recipe, library=library)
    if recipe.hub.push:
        from ift.hub import push

        url = push(run_dir, recipe.hub.repo_id, private=recipe.hub.private, merge=recipe.hub.merge,
                   revision=recipe.hub.revision, commit_message=recipe.hub.commit_message)
        print(f"pushed: {url}")


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _flat_config(recipe: Recipe) -> dict:
    flat = {}
    for section, values in recipe.model_dump(mode="json").items():
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
    return flat


def _tracker_available(name: str) -> bool:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name, name)
    return importlib.util.find_spec(module) is not None


def _install_signal_handlers():
    """SIGTERM / Ctrl-C: finish the current step, save a checkpoint, exit."""
    requested = {"flag": False}

    def handler(signum, frame):
        if requested["flag"]:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        requested["flag"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. inside a notebook helper)
            pass
    return lambda: requested["flag"]


# ---------------------------------------------------------------- entry point


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue from the latest checkpoint in output_dir (or from the given checkpoint)")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    train(recipe, resume=args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    from ift.cli import parse  # the `ift` command's parsing: overrides may follow flags

    parser = argparse.ArgumentParser(prog="ift/train.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parse(parser, argv)
    try:
        return run(args)
    except IftError as err:
        for line in err.lines():
            print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
