"""The main job: `accelerate launch ift/train.py RECIPE [key.path=value ...]` (or `ift train RECIPE`).

The recipe, in torchtune's manner: `FineTune.setup()` builds everything (splits, model, tokens, loaders,
optimizer, schedule, resumed state), `train()` runs accumulation windows, `validate()` and
`save_checkpoint()` are called from it, `finish()` evaluates the test split and writes the final weights
and card, `cleanup()` closes the trackers. Read `train()` top to bottom for the whole loop.

Exactness rules the loop keeps, each guarded by a test in tests/test_train.py:
- one accumulation window = `gradient_accumulation_steps` micro-batches (the epoch's last may be shorter),
  taken from the loader before the first forward, so its loss-token count (gathered over processes) is
  known: every micro-batch's gradient is that of sum(token losses) / tokens of the whole window;
- gradients are synchronised across processes on the window's last micro-batch only (`no_sync` before),
  clipped once and applied in one optimizer step, whatever the epoch boundaries;
- step counts come from the loaders after `accelerator.prepare`, so they are per process;
- a non-finite loss or a stop signal on any process is reduced over all of them: every process stops
  together, at the same step.
Devices and distribution come only from Accelerate (CPU, one GPU, DDP, FSDP, DeepSpeed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ift.recipe import TrainingConfig

if __package__ in (None, ""):
    # run as a script by `accelerate launch ift/train.py`: ift/ itself is on sys.path, not the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ift import atomic
from ift.errors import IftError
from ift.metrics import higher_is_better, needs_predictions
from ift.recipe import Parser, Recipe, load_recipe, parse_args
from ift.run import RunDir, free_space
from ift.training.precision import precision_record
from ift.training.liger import apply_liger, choose_liger
from ift.training.neftune import add_neftune
from ift.training.trackers import PACKAGES, installed_trackers, tracker_init_kwargs
from ift.training.checkpoints import (STATE_FILE, Progress, _best, _check_fresh_run_dir, _find_checkpoint,
                                      _prune_checkpoints, _save_final, _saved_tokenizer, keep_trainable,
                                      load_checkpoint)

# transformers' scheduler names for ours: a constant rate after warmup is its constant_with_warmup
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


@dataclass
class Window:
    """One optimizer step's worth of micro-batches, reduced over every process."""

    loss_sum: float  # summed token losses
    loss_tokens: int
    seq_tokens: int  # every non-padding token: the throughput figure
    nonfinite: bool
    stop: bool
    grad_norm: Any = None  # the last step's gradient norm before clipping, a device tensor (read when logged)


class Stop(Exception):
    """A stop signal reached some process: save a checkpoint, then exit (every process together)."""


class FineTune:
    """The training recipe. `run()` is setup -> train -> finish -> cleanup."""

    def __init__(self, recipe: Recipe, *, resume: bool | str | None = None):
        self.recipe = recipe
        self.t = recipe.training
        self.run_dir = Path(self.t.output_dir)
        self.resume = self.t.resume if resume is None else resume
        self.rd = RunDir(self.run_dir)
        self.lock = self.rd.lock()
        self.accelerator = None

    def run(self) -> Path:
        try:
            self.setup()
            try:
                self.train()
            except Stop:
                self.save_checkpoint()
                self.bar.close()
                self.say(f"stopped by signal at step {self.progress.step}; checkpoint saved. Continue with: "
                         f"ift train {self.rd.recipe} --resume")
                raise SystemExit(143)
            self.finish()
        finally:
            self.cleanup()
        return self.run_dir

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed
        from tqdm.auto import tqdm

        from ift.data.collate import (Collator, eval_dataloader, longest_batch, longest_row, train_dataloader,
                                      train_padding)
        from ift.data.prepare import build_splits
        from ift.data.tokenization import tokenize
        from ift.training.loss import CompletionLoss
        from ift.data.chat_templates import setup_chat_tokenizer
        from ift.modeling.adapters import count_parameters
        from ift.modeling.loading import load
        from ift.modeling.tokenizer import load_tokenizer
        from ift.templates.library import TemplateLibrary

        self.recipe = _runnable_precision(self.recipe)
        t = self.t = self.recipe.training
        run_dir = self.run_dir
        # Accumulation is done here, window by window (see the module docstring): Accelerate is told
        # nothing about it, so it neither divides the loss nor syncs at the end of a dataloader.
        trackers, missing_trackers = installed_trackers(t.report_to)
        self.accelerator = acc = Accelerator(
            mixed_precision=t.mixed_precision,
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        )
        self.main = acc.is_main_process
        self.say = acc.print
        for name in missing_trackers:
            self.say(f"note: training.report_to names {name}, which is not installed (pip install {PACKAGES[name]}): "
                     "not logged")
        plugin = getattr(acc.state, "deepspeed_plugin", None)
        if plugin is not None:  # the engine must clip and accumulate as the recipe says (ift/training/zero.py)
            from ift.training.zero import deepspeed_updates

            plugin.deepspeed_config.update(deepspeed_updates(plugin.deepspeed_config, plugin.zero_stage,
                                                             t.max_grad_norm))
        self.liger = choose_liger(self.recipe.model, acc)  # model.liger: true that cannot run stops here
        if acc.device.type == "cpu":  # freed activations go back to the OS (ift/training/allocator.py)
            from ift.training.allocator import return_large_blocks

            return_large_blocks()
        if self.main:  # one process owns the folder; a second run into it stops here
            self.lock.acquire(say=self.say)
            if self.recipe.hub.push:  # a missing token stops the run now, not at its first push
                from ift.publish.hub import require_token

                require_token(self.recipe.hub.repo_id)
        self.checkpoint = _find_checkpoint(self.rd, self.resume, self.say)
        if self.checkpoint is None:
            _check_fresh_run_dir(run_dir, t.overwrite_output_dir)
        set_seed(t.seed)

        # 1. data: templated splits (datasets caches them), then the model and its tokenizer, then tokens
        self.library = TemplateLibrary(dirs=tuple(self.recipe.data.templates_dir))
        with acc.main_process_first():
            self.prepared = build_splits(self.recipe.data, self.library)
        # carved splits pinned: the saved recipe.yaml reproduces them
        self.recipe = self.recipe.model_copy(update={"data": self.prepared.data})
        train_rows = self.prepared.splits["train"]
        train_texts = (p + " " + c for p, c in zip(train_rows["prompt"], train_rows["completion"]))
        # the chat template and special tokens are set on the tokenizer before the model loads: the embeddings
        # grow to it, under LoRA the new rows train, and every later step sees the template the run trains with
        tokenizer = _saved_tokenizer(self.checkpoint, self.recipe.model) or load_tokenizer(self.recipe.model, train_texts)
        data = self.recipe.data
        self.chat = setup_chat_tokenizer(tokenizer, data.chat_template, data.special_tokens)
        new_tokens = tokenizer.convert_tokens_to_ids(list(self.chat.added_tokens)) if self.chat.added_tokens else []
        self.loaded = load(self.recipe.model, self.recipe.adapter, gradient_checkpointing=t.gradient_checkpointing,
                           tokenizer=tokenizer, new_tokens=new_tokens)
        model, self.tokenizer, self.kind = self.loaded.model, self.loaded.tokenizer, self.loaded.kind
        loaded_dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
        if self.recipe.model.dtype == "auto" and not (t.mixed_precision == "fp16" and loaded_dtype == "bfloat16"):
            # pinned in the saved recipe: `ift eval/chat/generate` load the run's weights as they were loaded here
            self.recipe = self.recipe.model_copy(update={"model": self.recipe.model.model_copy(
                update={"dtype": loaded_dtype})})
        _fp32_master_weights(model, self.say)
        if t.neftune_noise_alpha:
            add_neftune(model, t.neftune_noise_alpha)
        _frozen_base_in_compute_dtype(model, t, acc, self.say)
        _attention_for_training(model, self.recipe, self.kind, acc.device.type, self.say)
        self.recipe = apply_liger(model, self.recipe, self.liger, self.say)
        total, trainable = count_parameters(model)
        self.say(f"model: {self.loaded.source} ({self.kind}), {total:,} parameters, {trainable:,} trainable "
                 f"({100 * trainable / max(total, 1):.2f}%)")
        with acc.main_process_first():
            self.tokens, token_report = tokenize(self.prepared.splits, self.tokenizer, self.kind, self.recipe.data)

        # evaluation batches are never packed: Accelerate drops the rows it repeats to even out the shards by
        # row, and a packed batch is one row of several examples
        self.collator = Collator(self.tokenizer, self.kind)
        multiple, limit = train_padding(data.pad_to_multiple_of, acc.device.type, longest_row(self.tokens["train"]))
        train_collator = Collator(self.tokenizer, self.kind, packing=data.packing, pad_to_multiple_of=multiple,
                                  pad_limit=None if data.packing else limit)
        train_dl = train_dataloader(self.tokens["train"], t.per_device_train_batch_size, train_collator, seed=t.seed,
                                    group_by_length=data.group_by_length, num_workers=t.dataloader_num_workers,
                                    bin_capacity=data.max_length if data.packing == "bfd" else None)
        val_dl = eval_dataloader(self.tokens["validation"], t.per_device_eval_batch_size, self.collator)
        loss_model = CompletionLoss(model, self.kind, fused_loss=self.recipe.model.liger is True)
        if acc.device.type == "cpu" and not data.packing:  # the peak first; later batches reuse its memory
            from ift.training.allocator import largest_batch_first

            largest_batch_first(loss_model, longest_batch(self.tokens["train"], t.per_device_train_batch_size,
                                                          train_collator), acc.autocast())

        # 2. optimizer, loss module, distribution; then the schedule, from the per-process loader length
        optimizer = _adamw(_param_groups(model, t.weight_decay), t, acc)
        self.loss_model, self.optimizer, self.train_dl, self.val_dl = acc.prepare(
            loss_model, optimizer, train_dl, val_dl)
        self.steps_per_epoch = max(1, math.ceil(len(self.train_dl) / t.gradient_accumulation_steps))
        self.max_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * self.steps_per_epoch)
        warmup = t.warmup_steps or int(t.warmup_ratio * self.max_steps)
        from transformers import get_scheduler

        # stepped by hand once per optimizer step (Accelerate's wrapper would step it once per process);
        # still saved and restored with the rest of the state
        self.scheduler = get_scheduler(SCHEDULERS[t.lr_scheduler_type], self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.max_steps)
        acc.register_for_checkpointing(self.scheduler)
        acc.register_save_state_pre_hook(keep_trainable)

        self.progress = Progress()
        if self.checkpoint is not None:
            self.progress = load_checkpoint(acc, self.checkpoint, self.loss_model)
            self.say(f"resumed from {self.checkpoint} at step {self.progress.step}")
        if self.main:  # only now: a resume that fails leaves the run folder as it was
            self.recipe.save(self.rd.recipe)
            self.rd.write_json(self.rd.data_report, {"splits": self.prepared.report, "tokens": token_report,
                                                     "chat": self.chat.as_dict()})
            self.tokenizer.save_pretrained(self.rd.tokenizer)
        _check_sharded_evaluation(acc, self.recipe)
        from ift.evaluation.modules import load_modules

        load_modules(self.recipe.evaluation.metrics)  # an evaluate module that cannot load stops the run here
        if self.main and acc.log_with:
            acc.init_trackers("ift", config=_flat_config(self.recipe), init_kwargs=tracker_init_kwargs(
                trackers, t.run_name or run_dir.name, t.tags))
        self.stop_requested = _install_signal_handlers()
        self.eval_every = t.eval_steps or self.steps_per_epoch
        self.save_every = t.save_steps or self.steps_per_epoch
        self.bar = tqdm(total=self.max_steps, initial=self.progress.step, disable=not self.main, desc="train",
                        dynamic_ncols=True)
        self.device = acc.device
        self._torch = torch

    # ------------------------------------------------------------ the loop

    def train(self) -> None:
        t, progress = self.t, self.progress
        logged = Window(0.0, 0, 0, False, False)
        logged_since = time.perf_counter()
        while progress.step < self.max_steps:
            self.train_dl.set_epoch(progress.epoch)
            batches = self.accelerator.skip_first_batches(self.train_dl, progress.batches_in_epoch) \
                if progress.batches_in_epoch else self.train_dl
            self.loss_model.train()
            for window in _windows(batches, t.gradient_accumulation_steps):
                done = self.train_window(window)
                progress.batches_in_epoch += len(window)
                progress.tokens_seen += done.loss_tokens
                progress.step += 1
                self.bar.update(1)
                logged = Window(logged.loss_sum + done.loss_sum, logged.loss_tokens + done.loss_tokens,
                                logged.seq_tokens + done.seq_tokens, False, False, done.grad_norm)

                last = progress.step == self.max_steps
                if progress.step % t.logging_steps == 0 or last:
                    self.log(logged, time.perf_counter() - logged_since)
                    logged, logged_since = Window(0.0, 0, 0, False, False), time.perf_counter()
                improved = False
                if progress.step % self.eval_every == 0 or last:
                    improved = self.validate()
                    self.loss_model.train()
                stopping = _early_stop(progress, t)
                # the best evaluation always has a checkpoint: final/ and the test figures come from it
                if progress.step % self.save_every == 0 or last or stopping or improved:
                    self.save_checkpoint()
                if stopping:
                    self.say(f"early stopping: no improvement in {t.early_stopping_patience} evaluations")
                    self.max_steps = progress.step
                if done.stop and progress.step < self.max_steps:
                    raise Stop()
                if progress.step >= self.max_steps:
                    break
            else:
                progress.epoch += 1
                progress.batches_in_epoch = 0
        self.bar.close()

    def train_window(self, window: list[dict]) -> Window:
        """Forward and backward over every micro-batch of the window, then one clip and one optimizer step.

        Counts stay on the device until the window's end: one host sync per window, not one per micro-batch (a
        GPU would otherwise wait for the host before each forward)."""
        torch, acc = self._torch, self.accelerator
        from ift.training.loss import count_loss_tokens

        # the mean is over every loss token of the window on every process: count them first
        n_local = torch.stack([count_loss_tokens(b, self.kind) for b in window]).sum()
        n_total = acc.reduce(n_local, reduction="sum")
        # DDP/FSDP average gradients over processes: undo it, so the gradient is that of sum(loss) / n_total
        scale = acc.num_processes / n_total.double().clamp(min=1)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        seq_tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(window):
            with self._sync_on(last=i == len(window) - 1):
                loss, _ = self.loss_model(**batch)
                acc.backward(loss * scale)
            loss_sum += loss.detach().double()
            seq_tokens += batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        # one decision for every process: a NaN or a signal on one rank stops them all at this step
        stop = torch.tensor(float(self.stop_requested()), dtype=torch.float64, device=self.device)
        flags = acc.reduce(torch.stack([loss_sum, seq_tokens, (~torch.isfinite(loss_sum)).double(), stop,
                                        n_local.double()]), reduction="sum")
        total_loss, total_seq, nonfinite, stops, loss_tokens = flags.tolist()  # the window's one host sync
        if nonfinite > 0:
            raise IftError(f"the loss became {total_loss} at step {self.progress.step + 1}", str(self.run_dir),
                           "lower training.learning_rate or use mixed_precision: no; "
                           "the last good checkpoint is kept in checkpoints/")
        # the norm before clipping (reported even when not clipping: a diverging run shows it first)
        grad_norm = acc.clip_grad_norm_(self.loss_model.parameters(),
                                        self.t.max_grad_norm if self.t.max_grad_norm > 0 else math.inf)
        self.optimizer.step()
        # fp16: the GradScaler skips an update whose gradients overflowed; the schedule follows applied updates
        # only (the window still counts: data, evaluations and checkpoints are keyed on windows consumed)
        skipped = bool(getattr(self.optimizer, "step_was_skipped", False))
        if skipped:
            self.progress.skipped_steps += 1
        else:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return Window(total_loss, int(loss_tokens), int(total_seq), False, stops > 0, grad_norm)

    def _sync_on(self, last: bool):
        """No gradient all-reduce until the window's last micro-batch."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed's engine accumulates itself and steps at the boundary Accelerate tells it of; Accelerate
            # has no public setter for that flag outside `accumulate()`, whose dataloader coupling we avoid
            acc.gradient_state._set_sync_gradients(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else acc.no_sync(self.loss_model)

    def log(self, w: Window, seconds: float) -> None:
        train_loss = w.loss_sum / max(w.loss_tokens, 1)
        tok_s = w.seq_tokens / max(seconds, 1e-9)
        lr = self.scheduler.get_last_lr()[0]
        self.bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        entry = {"step": self.progress.step, "train_loss": train_loss, "learning_rate": lr, "tokens_per_second": tok_s}
        if w.grad_norm is not None:
            entry["grad_norm"] = float(w.grad_norm)
        self.progress.history.append(entry)
        self.accelerator.log({f"train/{k.removeprefix('train_')}": v for k, v in entry.items() if k != "step"},
                             step=self.progress.step)

    # ------------------------------------------------------------ validation and checkpoints

    def validate(self) -> bool:
        """Validation figures at this step; True when they are the best so far."""
        metrics = self._metrics(self.val_dl, self.prepared.splits["validation"], "validation",
                                limit=self.recipe.evaluation.max_eval_samples)
        progress = self.progress
        improved = _track_best(progress, metrics, self.t)
        if improved:
            progress.best_validation = metrics
        progress.history.append({"step": progress.step, "validation": _headline(metrics)})
        if self.main:
            self.rd.record_training(history=progress.history, best=_best(progress))
        self.accelerator.log({f"validation/{k}": v for k, v in _headline(metrics).items()}, step=progress.step)
        self.say(f"step {progress.step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in _headline(metrics).items())
                 + (" (best)" if improved else ""))
        return improved

    def _metrics(self, loader, rows, desc: str, limit: int | None = None) -> dict:
        """Loss over every token of the split, then accuracy / ROUGE (ift.evaluation.evaluate)."""
        metrics: dict = {}
        ev = self.recipe.evaluation
        if "loss" in ev.metrics:
            metrics["loss"] = mean_loss(self.accelerator, self.loss_model, loader)
        if needs_predictions(ev.metrics):  # accuracy, ROUGE, evaluate modules
            from ift.evaluation.evaluate import evaluate

            plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
            # under the training's autocast, as the loss above and as the evaluation record says
            with full_weights(self.loss_model, bool(getattr(plugin, "reshard_after_forward", True))), \
                    self.accelerator.autocast():
                scores, predictions = evaluate(self.accelerator.unwrap_model(self.loss_model).model, self.tokenizer,
                                               self.kind, rows, ev, chat_template=self.recipe.data.wraps_pairs,
                                               accelerator=self.accelerator, limit=limit, desc=desc)
            metrics.update(scores)
            self._predictions = predictions
        return metrics

    def save_checkpoint(self) -> None:
        """Accelerate state + our progress, written to a temporary folder and renamed: never half a checkpoint."""
        acc, progress, rd = self.accelerator, self.progress, self.rd
        final = rd.checkpoint(progress.step)
        tmp = final.with_name(final.name + ".tmp")
        if self.main and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            # every process writes its own RNG state into tmp: all of them must be done before it is renamed
            acc.wait_for_everyone()
            if self.main:
                atomic.write_text(tmp / STATE_FILE, json.dumps(asdict(progress)))
                atomic.apply_umask(tmp)  # safetensors writes 0600 files
                rd.write_manifest(tmp)  # last: a checkpoint without one is incomplete
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise IftError(f"could not write checkpoint {final}: {err.strerror or err} ({free_space(tmp)})",
                           str(tmp), "free disk space or fix the folder's permissions, then continue with "
                           "--resume (the previous checkpoint is intact)") from None
        if self.main:
            _prune_checkpoints(rd, self.t.save_total_limit, progress.best_step)
        if self.recipe.hub.push and self.recipe.hub.strategy != "end":
            self._push_checkpoint(final)
        acc.wait_for_everyone()

    def _push_checkpoint(self, checkpoint: Path) -> None:
        """hub.strategy every_save / checkpoint: the weights as they are now, loadable, on the Hub.

        Only the main process uploads; a failure is shared with every process, so all stop together (a run asked
        to publish its checkpoints that cannot stops loudly, the checkpoint itself kept)."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        state = {k.removeprefix("model."): v for k, v in acc.get_state_dict(self.loss_model).items()}
        failure: list = [None]
        if self.main:
            from ift.publish.hub import push_checkpoint

            weights = self.rd.path / "hub-staging" / checkpoint.name  # removed after the push: no second copy kept
            try:
                acc.unwrap_model(self.loss_model).model.save_pretrained(weights, state_dict=state)
                self.tokenizer.save_pretrained(weights)
                hub = self.recipe.hub
                push_checkpoint(self.run_dir, weights, step=self.progress.step, repo_id=hub.repo_id,
                                private=hub.private, revision=hub.revision,
                                state=checkpoint if hub.strategy == "checkpoint" else None, report=self.say)
            except IftError as err:
                failure[0] = (err.what, err.where, err.fix)
            finally:
                shutil.rmtree(weights.parent, ignore_errors=True)
        if acc.num_processes > 1:
            broadcast_object_list(failure)
        if failure[0] is not None:
            raise IftError(*failure[0])

    # ------------------------------------------------------------ the end

    def finish(self) -> None:
        """Best weights, test evaluation (an evaluation record), final model, card."""
        acc, progress, recipe, rd = self.accelerator, self.progress, self.recipe, self.rd
        unwrapped = acc.unwrap_model(self.loss_model).model
        weights = f"final/ (step {progress.step})"
        if progress.best_step is not None and progress.best_step != progress.step:
            # test and final/ use the best validation checkpoint (one is always kept, see train())
            load_checkpoint(acc, rd.checkpoint(progress.best_step), self.loss_model)
            weights = f"final/ (best validation checkpoint, step {progress.best_step})"
            self.say(f"loaded the best checkpoint (step {progress.best_step}) for the test evaluation")
        sections: dict = {}
        if progress.best_validation is not None:
            sections["validation"] = {**progress.best_validation, "step": progress.best_step}
        test_rows = self.prepared.splits["test"]
        records: list[dict] = []
        if recipe.evaluation.test and len(test_rows):
            from ift.data.collate import eval_dataloader

            test_dl = acc.prepare(eval_dataloader(self.tokens["test"], self.t.per_device_eval_batch_size,
                                                  self.collator))
            self._predictions = []
            test = self._metrics(test_dl, test_rows, "test")
            records.append(dict(model="fine-tuned", split="test", metrics=test, weights=weights,
                                predictions=self._predictions, name="test"))
            self.say("test: " + ", ".join(f"{k} {v:.4f}" for k, v in _headline(test).items()))
            if recipe.evaluation.compare_base:
                with full_weights(self.loss_model), acc.autocast():
                    base, predictions = _base_test(acc, unwrapped, self.loaded, recipe, test_rows, self.tokenizer)
                records.append(dict(model="base", split="test", metrics=base, predictions=predictions,
                                    weights=self.loaded.source, name="base-test"))
        acc.wait_for_everyone()
        # every process takes part in gathering a sharded (FSDP/DeepSpeed) state dict; the main one writes it
        state = {k.removeprefix("model."): v for k, v in acc.get_state_dict(self.loss_model).items()}
        if self.main:
            _save_final(unwrapped, state, self.tokenizer, rd, resized=bool(self.chat.added_tokens))
            for r in records:
                record = self._record(r, len(test_rows))
                target = sections if r["model"] == "fine-tuned" else sections.setdefault("base", {})
                target["test"] = {**r["metrics"], "record": record["id"]}
            if recipe.evaluation.benchmarks:
                sections["benchmarks"] = _benchmarks(acc, unwrapped, self.loaded, recipe, self.tokenizer, self.say)
            rd.record_training(history=progress.history, best=_best(progress), **sections)
            _finish_outputs(self.run_dir, recipe, self.library)
            if recipe.hub.push and recipe.hub.push_dataset:
                from ift.publish.hub import push_dataset

                url = push_dataset(self.prepared, recipe, recipe.hub.push_dataset, private=recipe.hub.private,
                                   report=self.say)
                self.say(f"pushed the prepared splits: {url}")
            if any(r["model"] == "base" for r in records):
                from ift.evaluation.compare import print_compare

                print_compare(self.run_dir, "test")
        self.say(f"done: {self.run_dir}")

    def _record(self, r: dict, rows: int) -> dict:
        """Predictions file + evaluation record for one of the run's own evaluations."""
        from ift.evaluation.evaluate import write_predictions

        path = None
        if r["predictions"]:
            path = self.rd.predictions(r["name"])
            write_predictions(path, r["predictions"])
        model = self.accelerator.unwrap_model(self.loss_model).model
        quant = self.recipe.adapter.quant_type if self.recipe.adapter.method == "qlora" else None
        return self.rd.add_evaluation(model=r["model"], split=r["split"], metrics=r["metrics"], rows=rows,
                                      limit=None, weights=r["weights"], dtype=precision_record(model, self.t.mixed_precision),
                                      quantization=quant, predictions=path, by="train")

    def cleanup(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()
        self.lock.release()


def train(recipe: Recipe, *, resume: bool | str | None = None) -> Path:
    """Run the training recipe; returns the run directory."""
    return FineTune(recipe, resume=resume).run()


# ---------------------------------------------------------------- pieces of the loop


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


def _fp32_master_weights(model, say) -> None:
    """Trainable weights in float32: AdamW on bf16/fp16 weights rounds small updates away.

    A half-precision checkpoint loaded with dtype auto is trained on a float32 copy of its trainable weights
    (compute stays in half precision under mixed_precision); frozen weights (LoRA's base) keep their dtype.
    """
    import torch

    half = [p for p in model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
    if not half:
        return
    dtype = half[0].dtype
    for p in half:
        p.data = p.data.float()
    say(f"training {sum(p.numel() for p in half):,} {str(dtype).removeprefix('torch.')} weights as float32 "
        "master weights (set training.mixed_precision for half-precision compute)")


def _frozen_base_in_compute_dtype(model, t: TrainingConfig, accelerator, say) -> None:
    """Under bf16/fp16 autocast, LoRA's frozen float32 Linear weights held in the autocast dtype: the same
    forward and backward (autocast rounds them identically, at every step), without the per-step casts and with
    half the base's memory (ift/modeling/compute.py). Not under FSDP or DeepSpeed, which shard flat parameters of
    one dtype."""
    import torch
    from accelerate.utils import DistributedType

    from ift.modeling.compute import frozen_linears_in

    if t.mixed_precision not in ("bf16", "fp16") or not hasattr(model, "peft_config"):
        return
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    dtype = torch.bfloat16 if t.mixed_precision == "bf16" else torch.float16
    saved = frozen_linears_in(model, dtype)
    if saved:
        say(f"frozen base weights held in {t.mixed_precision} for autocast: {saved / 2**20:,.0f} MiB less, "
            "no per-step casts")


def _attention_for_training(model, recipe: Recipe, kind: str, device_type: str, say) -> None:
    """The attention kernel ift/modeling/attention.py picks for this run (eager for short CPU bf16 runs)."""
    from ift.modeling.attention import training_attention
    from ift.modeling.loading import set_attention

    chosen = training_attention(recipe, device_type, kind)
    if chosen is not None and set_attention(model, chosen) and recipe.model.attn_implementation == "auto":
        say(f"attention: {chosen} (faster than sdpa for sequences of at most {recipe.data.max_length} tokens in "
            "bf16 on the CPU; model.attn_implementation: sdpa keeps sdpa)")


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


def _check_sharded_evaluation(accelerator, recipe: Recipe) -> None:
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


def _base_test(accelerator, model, loaded, recipe: Recipe, rows, tokenizer) -> tuple[dict, list[dict]]:
    """The untuned model on the same rows: the adapter switched off, or the base reloaded for a full fine-tune."""
    from ift.evaluation.evaluate import evaluate
    from ift.modeling.loading import load
    from ift.recipe import AdapterConfig

    ev = recipe.evaluation
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            scores, predictions = evaluate(model, tokenizer, loaded.kind, rows, ev, accelerator=accelerator,
                                           chat_template=recipe.data.wraps_pairs, desc="base test")
    else:
        base = load(recipe.model, AdapterConfig(), tokenizer=tokenizer).model.to(accelerator.device)
        scores, predictions = evaluate(base, tokenizer, loaded.kind, rows, ev, accelerator=accelerator,
                                       chat_template=recipe.data.wraps_pairs, desc="base test")
    accelerator.print("base test: " + ", ".join(f"{k} {v:.4f}" for k, v in _headline(scores).items()))
    return scores, predictions


def _benchmarks(accelerator, model, loaded, recipe: Recipe, tokenizer, say) -> dict | None:
    """evaluation.benchmarks on the final weights and the base (ift.evaluation.benchmarks), under the test's
    autocast; lm-eval runs an in-memory model in one process, so a run of several leaves it to `ift eval`."""
    from ift.evaluation.benchmarks import base_and_fine_tuned
    from ift.modeling.loading import load
    from ift.recipe import AdapterConfig

    if accelerator.num_processes > 1:
        say(f"note: benchmarks run in one process: `ift eval {recipe.training.output_dir} --benchmarks` runs them")
        return None
    with accelerator.autocast():
        return base_and_fine_tuned(
            model, tokenizer, loaded.kind, recipe.evaluation, say=say,
            load_base=lambda: load(recipe.model, AdapterConfig(), tokenizer=tokenizer).model.to(accelerator.device))


def _headline(metrics: dict) -> dict:
    """The scalar metrics (breakdowns by source/template stay in metrics.json only)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("n", "step")}


def _track_best(progress: Progress, metrics: dict, t) -> bool:
    name = t.metric_for_best_model.removeprefix("validation.")
    value = metrics.get(name)
    if value is None:
        return False
    higher = t.greater_is_better if t.greater_is_better is not None else higher_is_better(name)
    better = progress.best_metric is None or (value > progress.best_metric if higher else value < progress.best_metric)
    if better:
        progress.best_metric, progress.best_step, progress.evals_without_improvement = value, progress.step, 0
    else:
        progress.evals_without_improvement += 1
    return better


def _early_stop(progress: Progress, t) -> bool:
    return bool(t.early_stopping_patience) and progress.evals_without_improvement >= t.early_stopping_patience


# ---------------------------------------------------------------- checkpoints and outputs


def _runnable_precision(recipe: Recipe) -> Recipe:
    """The recipe as this machine runs it: its saved copy and the records say what ran."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from ift.training.precision import runnable_precision

    # The state as the Accelerator built next will see it: `accelerate launch` marks CPU runs with
    # ACCELERATE_USE_CPU, and a PartialState made without it is, since accelerate 1.16, one process per rank on
    # a CPU-only machine (every rank its own main process: two processes fought over the run folder's lock).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    recipe, why = runnable_precision(recipe, state.device.type)
    if why and state.is_main_process:
        print(f"note: {why}: training in fp32 (training.mixed_precision: no)", flush=True)
    return recipe


def _finish_outputs(run_dir: Path, recipe: Recipe, library) -> None:
    from ift.publish.card import write_model_card
    from ift.training.plots import write_plots

    write_plots(run_dir)
    write_model_card(run_dir, recipe, library=library)
    if recipe.hub.push:
        from ift.publish.hub import push

        url = push(run_dir, recipe.hub.repo_id, private=recipe.hub.private, merge=recipe.hub.merge,
                   revision=recipe.hub.revision, commit_message=recipe.hub.commit_message)
        print(f"pushed: {url}")


def _flat_config(recipe: Recipe) -> dict:
    flat = {}
    for section, values in recipe.model_dump(mode="json").items():
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
    return flat


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
    parser = Parser(prog="ift/train.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parse_args(parser, argv)  # overrides may follow flags, as with the `ift` command
    try:
        return run(args)
    except IftError as err:
        for line in err.lines():
            print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
