"""The main job: `accelerate launch ift/train.py RECIPE [key.path=value ...]` (or `ift train RECIPE`).

The recipe, in torchtune's manner: `FineTune.setup()` builds everything (accelerator, splits, tokenizer and
model, tokens and loaders, optimizer and schedule, resumed state), `train()` runs accumulation windows,
`validate()` and `save_checkpoint()` are called from it, `finish()` evaluates the test split and writes the
final weights and card, `cleanup()` closes the trackers. Read `train()` top to bottom for the whole loop; the
pieces it calls live in their stages (ift/training/, ift/evaluation/in_training.py).

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
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # run as a script by `accelerate launch ift/train.py`: ift/ itself is on sys.path, not the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from ift.arguments import Parser, parse_args, train_arguments
from ift.data.chat_templates import setup_chat_tokenizer
from ift.data.collate import eval_dataloader, longest_batch, training_loaders
from ift.data.prepare import build_splits
from ift.data.tokenization import tokenize
from ift.errors import IftError, exit_code
from ift.evaluation.in_training import (TestEvaluation, base_test, check_sharded_evaluation, full_weights,
                                        record_tests, run_benchmarks, split_metrics)
from ift.evaluation.modules import load_modules
from ift.metrics import headline, headline_text
from ift.modeling.adapters import count_parameters
from ift.modeling.loading import load
from ift.modeling.tokenizer import load_tokenizer
from ift.publish.finished_run import publish_finished_run
from ift.publish.hub import push_from_training, require_token
from ift.recipe import Recipe, load_recipe
from ift.run import RunDir
from ift.templates.library import TemplateLibrary
from ift.training.allocator import largest_batch_first, return_large_blocks
from ift.training.checkpoints import (Progress, best_of, check_fresh_run_dir, find_checkpoint, keep_trainable,
                                      load_checkpoint, prune_checkpoints, save_checkpoint, save_final,
                                      saved_tokenizer)
from ift.training.distributed import configure_deepspeed
from ift.training.early_stopping import early_stop, track_best
from ift.training.liger import choose_liger
from ift.training.loop import Stop, Window, accumulation_windows, gradient_sync, stop_handlers
from ift.training.loss import CompletionLoss, count_loss_tokens
from ift.training.model_setup import ready_to_train
from ift.training.optimizer import adamw, param_groups, schedule
from ift.training.precision import precision_record, runnable_here
from ift.training.trackers import start_trackers, usable_trackers


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
        self.recipe = runnable_here(self.recipe, say=lambda line: print(line, flush=True))
        self.t = self.recipe.training
        self.accelerator = self._setup_accelerator()
        self.prepared = self._setup_data()
        self.tokenizer, self.chat = self._setup_tokenizer()
        self.loaded = self._setup_model()
        loss_model = CompletionLoss(self.loaded.model, self.kind, fused_loss=self.recipe.model.liger is True)
        self.tokens, self.train_dl, self.val_dl = self._setup_data_loaders(loss_model)
        optimizer = adamw(param_groups(self.loaded.model, self.t.weight_decay), self.t, self.accelerator)
        self.loss_model, self.optimizer, self.train_dl, self.val_dl = self.accelerator.prepare(
            loss_model, optimizer, self.train_dl, self.val_dl)
        self.scheduler = self._setup_schedule()
        self.progress = self._setup_progress()
        self._setup_outputs()

    def _setup_accelerator(self) -> Accelerator:
        """Accelerate, the run folder's lock, the checkpoint to resume from and the seed."""
        t = self.t
        # Accumulation is done here, window by window (see the module docstring): Accelerate is told
        # nothing about it, so it neither divides the loss nor syncs at the end of a dataloader.
        self.trackers = usable_trackers(t.report_to, say=PartialState().print)  # the main process says it
        acc = Accelerator(mixed_precision=t.mixed_precision, log_with=self.trackers or None,
                          project_config=ProjectConfiguration(project_dir=str(self.run_dir),
                                                              logging_dir=str(self.rd.logs)))
        self.is_main, self.say = acc.is_main_process, acc.print
        configure_deepspeed(acc, t.max_grad_norm)
        self.liger = choose_liger(self.recipe.model, acc)  # model.liger: true that cannot run stops here
        if acc.device.type == "cpu":  # freed activations go back to the OS (ift/training/allocator.py)
            return_large_blocks()
        if self.is_main:  # one process owns the folder; a second run into it stops here
            self.lock.acquire(say=self.say)
            if self.recipe.hub.push:  # a missing token stops the run now, not at its first push
                require_token(self.recipe.hub.repo_id)
        self.checkpoint = find_checkpoint(self.rd, self.resume, self.say)
        if self.checkpoint is None:
            check_fresh_run_dir(self.run_dir, t.overwrite_output_dir)
        set_seed(t.seed)
        return acc

    def _setup_data(self):
        """Templated splits (datasets caches them); carved splits pinned, so the saved recipe reproduces them."""
        self.library = TemplateLibrary(dirs=tuple(self.recipe.data.templates_dir))
        with self.accelerator.main_process_first():
            prepared = build_splits(self.recipe.data, self.library)
        self.recipe = self.recipe.model_copy(update={"data": prepared.data})
        return prepared

    def _setup_tokenizer(self):
        """Chat template and special tokens set before the model loads: the embeddings grow to the tokenizer."""
        rows = self.prepared.splits["train"]
        texts = (p + " " + c for p, c in zip(rows["prompt"], rows["completion"]))
        tokenizer = saved_tokenizer(self.checkpoint, self.recipe.model) or load_tokenizer(self.recipe.model, texts)
        return tokenizer, setup_chat_tokenizer(tokenizer, self.recipe.data.chat_template, self.recipe.data.special_tokens)

    def _setup_model(self):
        """The model with its adapter, made ready to train (ift/training/model_setup.py)."""
        t, acc, say = self.t, self.accelerator, self.say
        new_tokens = self.tokenizer.convert_tokens_to_ids(list(self.chat.added_tokens)) if self.chat.added_tokens else []
        loaded = load(self.recipe.model, self.recipe.adapter, gradient_checkpointing=t.gradient_checkpointing,
                      tokenizer=self.tokenizer, new_tokens=new_tokens)
        model, self.tokenizer, self.kind = loaded.model, loaded.tokenizer, loaded.kind
        self.recipe = ready_to_train(model, self.recipe, self.kind, acc, self.liger, say)
        total, trainable = count_parameters(model)
        say(f"model: {loaded.source} ({self.kind}), {total:,} parameters, {trainable:,} trainable "
            f"({100 * trainable / max(total, 1):.2f}%)")
        return loaded

    def _setup_data_loaders(self, loss_model: CompletionLoss):
        """Tokens of every split; the training and validation loaders."""
        t, acc = self.t, self.accelerator
        with acc.main_process_first():
            tokens, self.token_report = tokenize(self.prepared.splits, self.tokenizer, self.kind, self.recipe.data)
        loaders = training_loaders(tokens, self.tokenizer, self.kind, self.recipe.data, t, acc.device.type)
        self.collator = loaders.eval_collator
        if acc.device.type == "cpu" and not self.recipe.data.packing:  # the peak first; later batches reuse it
            largest_batch_first(loss_model,
                                longest_batch(tokens["train"], t.per_device_train_batch_size, loaders.train_collator),
                                acc.autocast())
        return tokens, loaders.train, loaders.validation

    def _setup_schedule(self):
        """Steps from the per-process loader length; stepped by hand once per optimizer step (not per process)."""
        t = self.t
        self.steps_per_epoch = max(1, math.ceil(len(self.train_dl) / t.gradient_accumulation_steps))
        self.max_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * self.steps_per_epoch)
        self.eval_every = t.eval_steps or self.steps_per_epoch
        self.save_every = t.save_steps or self.steps_per_epoch
        scheduler = schedule(self.optimizer, t, self.max_steps)
        self.accelerator.register_for_checkpointing(scheduler)
        self.accelerator.register_save_state_pre_hook(keep_trainable)
        return scheduler

    def _setup_progress(self) -> Progress:
        progress = load_checkpoint(self.accelerator, self.checkpoint, self.loss_model) if self.checkpoint else Progress()
        if self.checkpoint:
            self.say(f"resumed from {self.checkpoint} at step {progress.step}")
        return progress

    def _setup_outputs(self) -> None:
        """Run folder files (only now: a failed resume leaves it as it was), late checks, trackers, stop, bar."""
        acc = self.accelerator
        self.data_report = {"splits": self.prepared.report, "tokens": self.token_report, "chat": self.chat.as_dict()}
        if self.is_main:
            self.recipe.save(self.rd.recipe)
            self.rd.write_json(self.rd.data_report, self.data_report)
            self.tokenizer.save_pretrained(self.rd.tokenizer)
        check_sharded_evaluation(acc, self.recipe)
        load_modules(self.recipe.evaluation.metrics)  # an evaluate module that cannot load stops the run here
        start_trackers(acc, self.recipe, self.trackers, self.t.run_name or self.run_dir.name)
        self.stop_requested = stop_handlers()
        self.bar = tqdm(total=self.max_steps, initial=self.progress.step, disable=not self.is_main, desc="train",
                        dynamic_ncols=True)

    # ------------------------------------------------------------ the loop

    def train(self) -> None:
        t, progress = self.t, self.progress
        logged, logged_since = Window(), time.perf_counter()
        while progress.step < self.max_steps:
            self.train_dl.set_epoch(progress.epoch)
            batches = self.accelerator.skip_first_batches(self.train_dl, progress.batches_in_epoch) \
                if progress.batches_in_epoch else self.train_dl
            self.loss_model.train()
            for window in accumulation_windows(batches, t.gradient_accumulation_steps):
                done = self.train_window(window)
                progress.batches_in_epoch += len(window)
                progress.tokens_seen += done.loss_tokens
                progress.step += 1
                self.bar.update(1)
                logged += done

                last = progress.step == self.max_steps
                if progress.step % t.logging_steps == 0 or last:
                    self.log(logged, time.perf_counter() - logged_since)
                    logged, logged_since = Window(), time.perf_counter()
                improved = False
                if progress.step % self.eval_every == 0 or last:
                    improved = self.validate()
                    self.loss_model.train()
                stopping = early_stop(progress, t)
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
        """Forward and backward over every micro-batch, then one clip and one optimizer step. Counts stay on the
        device until the window's end: one host sync per window (a GPU would otherwise wait before each forward)."""
        acc, device = self.accelerator, self.accelerator.device
        # the mean is over every loss token of the window on every process: count them first
        n_local = torch.stack([count_loss_tokens(b, self.kind) for b in window]).sum()
        n_total = acc.reduce(n_local, reduction="sum")
        # DDP/FSDP average gradients over processes: undo it, so the gradient is that of sum(loss) / n_total
        scale = acc.num_processes / n_total.double().clamp(min=1)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seq_tokens = torch.zeros((), dtype=torch.float64, device=device)
        for i, batch in enumerate(window):
            with gradient_sync(acc, self.loss_model, last=i == len(window) - 1):
                loss, _ = self.loss_model(**batch)
                acc.backward(loss * scale)
            loss_sum += loss.detach().double()
            seq_tokens += batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        # one decision for every process: a NaN or a signal on one rank stops them all at this step
        stop = torch.tensor(float(self.stop_requested()), dtype=torch.float64, device=device)
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
        if getattr(self.optimizer, "step_was_skipped", False):
            self.progress.skipped_steps += 1
        else:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return Window(total_loss, int(loss_tokens), int(total_seq), stops > 0, grad_norm)

    def log(self, w: Window, seconds: float) -> None:
        entry = w.log_entry(self.progress.step, seconds, self.scheduler.get_last_lr()[0])
        self.bar.set_postfix(loss=f"{entry['train_loss']:.4f}", lr=f"{entry['learning_rate']:.2e}",
                             tok_s=f"{entry['tokens_per_second']:,.0f}")
        self.progress.history.append(entry)
        self.accelerator.log({f"train/{k.removeprefix('train_')}": v for k, v in entry.items() if k != "step"},
                             step=self.progress.step)

    def validate(self) -> bool:
        """Validation figures at this step; True when they are the best so far."""
        metrics, _ = self.evaluate(self.val_dl, self.prepared.splits["validation"], "validation",
                                   limit=self.recipe.evaluation.max_eval_samples)
        progress = self.progress
        improved = track_best(progress, metrics, self.t)
        progress.history.append({"step": progress.step, "validation": headline(metrics)})
        if self.is_main:
            self.rd.record_training(history=progress.history, best=best_of(progress))
        self.accelerator.log({f"validation/{k}": v for k, v in headline(metrics).items()}, step=progress.step)
        self.say(f"step {progress.step}: validation {headline_text(metrics)}" + (" (best)" if improved else ""))
        return improved

    def evaluate(self, loader, rows, desc: str, limit: int | None = None) -> tuple[dict, list[dict]]:
        return split_metrics(self.accelerator, self.loss_model, loader, rows, self.recipe, self.tokenizer, self.kind,
                             desc=desc, limit=limit)

    def save_checkpoint(self) -> None:
        checkpoint = save_checkpoint(self.accelerator, self.rd, self.progress)
        if self.is_main:
            prune_checkpoints(self.rd, self.t.save_total_limit, self.progress.best_step)
        if self.recipe.hub.push and self.recipe.hub.strategy != "end":
            push_from_training(self.accelerator, self.accelerator.unwrap_model(self.loss_model).model,
                               self.full_state_dict(), self.tokenizer, self.rd, checkpoint, step=self.progress.step,
                               recipe=self.recipe, say=self.say)
        self.accelerator.wait_for_everyone()

    def full_state_dict(self) -> dict:
        """The inner model's state dict, gathered from every process under FSDP/DeepSpeed (all must call it)."""
        return {k.removeprefix("model."): v for k, v in self.accelerator.get_state_dict(self.loss_model).items()}

    def finish(self) -> None:
        """Best weights, test evaluation (an evaluation record), final model, plots, card, pushes."""
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
        tests: list[TestEvaluation] = []
        if recipe.evaluation.test and len(test_rows):
            test_dl = acc.prepare(eval_dataloader(self.tokens["test"], self.t.per_device_eval_batch_size,
                                                  self.collator))
            tests.append(TestEvaluation("fine-tuned", *self.evaluate(test_dl, test_rows, "test"), weights, "test"))
            self.say(f"test: {headline_text(tests[0].metrics)}")
            if recipe.evaluation.compare_base:
                with full_weights(self.loss_model), acc.autocast():
                    base = base_test(acc, unwrapped, recipe, self.kind, test_rows, self.tokenizer)
                tests.append(TestEvaluation("base", *base, self.loaded.source, "base-test"))
        acc.wait_for_everyone()
        state = self.full_state_dict()
        if self.is_main:
            save_final(unwrapped, state, self.tokenizer, rd, resized=bool(self.chat.added_tokens))
            sections.update(record_tests(
                rd, tests, rows=len(test_rows), dtype=precision_record(unwrapped, self.t.mixed_precision),
                quantization=recipe.adapter.quant_type if recipe.adapter.method == "qlora" else None))
            if recipe.evaluation.benchmarks:
                sections["benchmarks"] = run_benchmarks(acc, unwrapped, recipe, self.kind, self.tokenizer, self.say)
            metrics = rd.record_training(history=progress.history, best=best_of(progress), **sections)
            publish_finished_run(self.run_dir, recipe, metrics=metrics, data_report=self.data_report,
                                 library=self.library, prepared=self.prepared, say=self.say)
        self.say(f"done: {self.run_dir}")

    def cleanup(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()
        self.lock.release()


def train(recipe: Recipe, *, resume: bool | str | None = None) -> Path:
    """Run the training recipe; returns the run directory."""
    return FineTune(recipe, resume=resume).run()


# ---------------------------------------------------------------- entry point


def run(args: argparse.Namespace) -> int:
    train(load_recipe(args.recipe, args.overrides), resume=args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="ift/train.py", description=__doc__.splitlines()[0])
    train_arguments(parser)
    args = parse_args(parser, argv)  # overrides may follow flags, as with the `ift` command
    return exit_code(run, args)


if __name__ == "__main__":
    raise SystemExit(main())
