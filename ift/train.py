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
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # run as a script by `accelerate launch ift/train.py`: ift/ itself is on sys.path, not the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from ift.arguments import Parser, parse_args, train_arguments
from ift.data.chat_templates import setup_chat_tokenizer
from ift.data.collate import (Collator, eval_dataloader, longest_batch, longest_row, train_dataloader,
                              train_padding)
from ift.data.prepare import build_splits
from ift.data.tokenization import tokenize
from ift.errors import IftError, exit_code
from ift.evaluation.compare import print_compare
from ift.evaluation.evaluate import write_predictions
from ift.evaluation.in_training import (base_test, check_sharded_evaluation, full_weights, run_benchmarks,
                                        split_metrics)
from ift.evaluation.modules import load_modules
from ift.metrics import headline, headline_text
from ift.modeling.adapters import count_parameters
from ift.modeling.attention import use_training_attention
from ift.modeling.loading import load
from ift.modeling.tokenizer import load_tokenizer
from ift.publish.card import write_model_card
from ift.publish.hub import push, push_checkpoint, push_dataset, require_token
from ift.recipe import Recipe, load_recipe
from ift.run import RunDir
from ift.templates.library import TemplateLibrary
from ift.training.allocator import largest_batch_first, return_large_blocks
from ift.training.checkpoints import (Progress, best_of, check_fresh_run_dir, find_checkpoint, keep_trainable,
                                      load_checkpoint, prune_checkpoints, save_checkpoint, save_final,
                                      saved_tokenizer)
from ift.training.distributed import configure_deepspeed, shards_parameters
from ift.training.early_stopping import early_stop, track_best
from ift.training.liger import apply_liger, choose_liger
from ift.training.loop import Stop, Window, accumulation_windows, gradient_sync, stop_handlers
from ift.training.loss import CompletionLoss, count_loss_tokens
from ift.training.master_weights import fp32_master_weights, frozen_base_in_compute_dtype
from ift.training.neftune import add_neftune
from ift.training.optimizer import adamw, param_groups, schedule
from ift.training.plots import write_plots
from ift.training.precision import precision_record, runnable_here
from ift.training.trackers import PACKAGES, flat_config, installed_trackers, tracker_init_kwargs


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
        self.tokens, self.train_dl, self.val_dl = self._setup_data_loaders()
        optimizer = adamw(param_groups(self.loaded.model, self.t.weight_decay), self.t, self.accelerator)
        self.loss_model, self.optimizer, self.train_dl, self.val_dl = self.accelerator.prepare(
            CompletionLoss(self.loaded.model, self.kind, fused_loss=self.recipe.model.liger is True), optimizer,
            self.train_dl, self.val_dl)
        self.scheduler = self._setup_schedule()
        self.progress = self._setup_progress()
        self._setup_outputs()

    def _setup_accelerator(self) -> Accelerator:
        """Accelerate, the run folder's lock, the checkpoint to resume from and the seed."""
        t = self.t
        # Accumulation is done here, window by window (see the module docstring): Accelerate is told
        # nothing about it, so it neither divides the loss nor syncs at the end of a dataloader.
        self.trackers, missing_trackers = installed_trackers(t.report_to)
        acc = Accelerator(mixed_precision=t.mixed_precision, log_with=self.trackers or None,
                          project_config=ProjectConfiguration(project_dir=str(self.run_dir),
                                                              logging_dir=str(self.rd.logs)))
        self.is_main, self.say = acc.is_main_process, acc.print
        for name in missing_trackers:
            self.say(f"note: training.report_to names {name}, which is not installed (pip install {PACKAGES[name]}): "
                     "not logged")
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
        """The chat template and special tokens are set on the tokenizer before the model loads: the embeddings
        grow to it, under LoRA the new rows train, and every later step sees the template the run trains with."""
        rows = self.prepared.splits["train"]
        texts = (p + " " + c for p, c in zip(rows["prompt"], rows["completion"]))
        tokenizer = saved_tokenizer(self.checkpoint, self.recipe.model) or load_tokenizer(self.recipe.model, texts)
        return tokenizer, setup_chat_tokenizer(tokenizer, self.recipe.data.chat_template, self.recipe.data.special_tokens)

    def _setup_model(self):
        """The model as it trains: adapters, float32 master weights, NEFTune, the frozen base's dtype, attention."""
        t, acc, say = self.t, self.accelerator, self.say
        new_tokens = self.tokenizer.convert_tokens_to_ids(list(self.chat.added_tokens)) if self.chat.added_tokens else []
        loaded = load(self.recipe.model, self.recipe.adapter, gradient_checkpointing=t.gradient_checkpointing,
                      tokenizer=self.tokenizer, new_tokens=new_tokens)
        model, self.tokenizer, self.kind = loaded.model, loaded.tokenizer, loaded.kind
        loaded_dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
        if self.recipe.model.dtype == "auto" and not (t.mixed_precision == "fp16" and loaded_dtype == "bfloat16"):
            # pinned in the saved recipe: `ift eval/chat/generate` load the run's weights as they were loaded here
            self.recipe = self.recipe.model_copy(update={"model": self.recipe.model.model_copy(
                update={"dtype": loaded_dtype})})
        for line in (fp32_master_weights(model), add_neftune(model, t.neftune_noise_alpha) if t.neftune_noise_alpha else None):
            if line:
                say(line)
        frozen_base_in_compute_dtype(model, t.mixed_precision, shards_parameters(acc), say)
        line = use_training_attention(model, self.recipe, acc.device.type, self.kind)
        if line:
            say(line)
        self.recipe = apply_liger(model, self.recipe, self.liger, say)
        total, trainable = count_parameters(model)
        say(f"model: {loaded.source} ({self.kind}), {total:,} parameters, {trainable:,} trainable "
            f"({100 * trainable / max(total, 1):.2f}%)")
        return loaded

    def _setup_data_loaders(self):
        """Tokens of every split, the training loader (padded or packed) and the validation loader."""
        t, data, acc = self.t, self.recipe.data, self.accelerator
        with acc.main_process_first():
            tokens, self.token_report = tokenize(self.prepared.splits, self.tokenizer, self.kind, data)
        # evaluation batches are never packed: Accelerate drops the rows it repeats to even out the shards by
        # row, and a packed batch is one row of several examples
        self.collator = Collator(self.tokenizer, self.kind)
        multiple, limit = train_padding(data.pad_to_multiple_of, acc.device.type, longest_row(tokens["train"]))
        train_collator = Collator(self.tokenizer, self.kind, packing=data.packing, pad_to_multiple_of=multiple,
                                  pad_limit=None if data.packing else limit)
        train_dl = train_dataloader(tokens["train"], t.per_device_train_batch_size, train_collator, seed=t.seed,
                                    group_by_length=data.group_by_length, num_workers=t.dataloader_num_workers,
                                    bin_capacity=data.max_length if data.packing == "bfd" else None)
        if acc.device.type == "cpu" and not data.packing:  # the peak first; later batches reuse its memory
            largest_batch_first(CompletionLoss(self.loaded.model, self.kind),
                                longest_batch(tokens["train"], t.per_device_train_batch_size, train_collator),
                                acc.autocast())
        return tokens, train_dl, eval_dataloader(tokens["validation"], t.per_device_eval_batch_size, self.collator)

    def _setup_schedule(self):
        """Steps from the per-process loader length; the schedule is stepped by hand once per optimizer step
        (Accelerate's wrapper would step it once per process), still saved and restored with the rest."""
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
        if self.checkpoint is None:
            return Progress()
        progress = load_checkpoint(self.accelerator, self.checkpoint, self.loss_model)
        self.say(f"resumed from {self.checkpoint} at step {progress.step}")
        return progress

    def _setup_outputs(self) -> None:
        """The run folder's recipe, data report and tokenizer (only now: a resume that fails leaves the folder as
        it was), the checks that would fail late, the trackers, the stop signal and the progress bar."""
        acc = self.accelerator
        self.data_report = {"splits": self.prepared.report, "tokens": self.token_report, "chat": self.chat.as_dict()}
        if self.is_main:
            self.recipe.save(self.rd.recipe)
            self.rd.write_json(self.rd.data_report, self.data_report)
            self.tokenizer.save_pretrained(self.rd.tokenizer)
        check_sharded_evaluation(acc, self.recipe)
        load_modules(self.recipe.evaluation.metrics)  # an evaluate module that cannot load stops the run here
        if self.is_main and acc.log_with:
            acc.init_trackers("ift", config=flat_config(self.recipe), init_kwargs=tracker_init_kwargs(
                self.trackers, self.t.run_name or self.run_dir.name, self.t.tags))
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
        """Forward and backward over every micro-batch of the window, then one clip and one optimizer step.

        Counts stay on the device until the window's end: one host sync per window, not one per micro-batch (a
        GPU would otherwise wait for the host before each forward)."""
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
        return split_metrics(self.accelerator, self.loss_model, loader, rows, self.recipe, self.tokenizer,
                             self.kind, desc=desc, limit=limit)

    def save_checkpoint(self) -> None:
        checkpoint = save_checkpoint(self.accelerator, self.rd, self.progress)
        if self.is_main:
            prune_checkpoints(self.rd, self.t.save_total_limit, self.progress.best_step)
        if self.recipe.hub.push and self.recipe.hub.strategy != "end":
            self.push_checkpoint(checkpoint)
        self.accelerator.wait_for_everyone()

    def push_checkpoint(self, checkpoint: Path) -> None:
        """hub.strategy every_save / checkpoint: the weights as they are now, loadable, on the Hub.

        Only the main process uploads; a failure is shared with every process, so all stop together (a run asked
        to publish its checkpoints that cannot stops loudly, the checkpoint itself kept)."""
        acc, hub = self.accelerator, self.recipe.hub
        state = self.full_state_dict()
        failure: list = [None]
        if self.is_main:
            weights = self.rd.hub_staging / checkpoint.name  # removed after the push: no second copy kept
            try:
                acc.unwrap_model(self.loss_model).model.save_pretrained(weights, state_dict=state)
                self.tokenizer.save_pretrained(weights)
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

    def full_state_dict(self) -> dict:
        """The inner model's state dict, gathered from every process under FSDP/DeepSpeed (all must call it)."""
        return {k.removeprefix("model."): v for k, v in self.accelerator.get_state_dict(self.loss_model).items()}

    # ------------------------------------------------------------ the end

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
        records: list[dict] = []
        if recipe.evaluation.test and len(test_rows):
            test_dl = acc.prepare(eval_dataloader(self.tokens["test"], self.t.per_device_eval_batch_size,
                                                  self.collator))
            test, predictions = self.evaluate(test_dl, test_rows, "test")
            records.append(dict(model="fine-tuned", metrics=test, weights=weights, predictions=predictions,
                                name="test"))
            self.say(f"test: {headline_text(test)}")
            if recipe.evaluation.compare_base:
                with full_weights(self.loss_model), acc.autocast():
                    base, predictions = base_test(acc, unwrapped, recipe, self.kind, test_rows, self.tokenizer)
                records.append(dict(model="base", metrics=base, predictions=predictions,
                                    weights=self.loaded.source, name="base-test"))
        acc.wait_for_everyone()
        state = self.full_state_dict()
        if self.is_main:
            save_final(unwrapped, state, self.tokenizer, rd, resized=bool(self.chat.added_tokens))
            for r in records:
                record = self.record_test(r, len(test_rows))
                target = sections if r["model"] == "fine-tuned" else sections.setdefault("base", {})
                target["test"] = {**r["metrics"], "record": record["id"]}
            if recipe.evaluation.benchmarks:
                sections["benchmarks"] = run_benchmarks(acc, unwrapped, recipe, self.kind, self.tokenizer, self.say)
            metrics = rd.record_training(history=progress.history, best=best_of(progress), **sections)
            self.publish(metrics)
            if any(r["model"] == "base" for r in records):
                print_compare(self.run_dir, "test")
        self.say(f"done: {self.run_dir}")

    def record_test(self, r: dict, rows: int) -> dict:
        """Predictions file + evaluation record for one of the run's own test evaluations."""
        path = None
        if r["predictions"]:
            path = self.rd.predictions(r["name"])
            write_predictions(path, r["predictions"])
        model = self.accelerator.unwrap_model(self.loss_model).model
        quant = self.recipe.adapter.quant_type if self.recipe.adapter.method == "qlora" else None
        return self.rd.add_evaluation(model=r["model"], split="test", metrics=r["metrics"], rows=rows, limit=None,
                                      weights=r["weights"], dtype=precision_record(model, self.t.mixed_precision),
                                      quantization=quant, predictions=path, by="train")

    def publish(self, metrics: dict) -> None:
        """Plots and the card from the run's figures in memory; then the Hub, as the recipe says."""
        recipe, hub = self.recipe, self.recipe.hub
        write_plots(self.run_dir, metrics)
        write_model_card(self.run_dir, recipe, library=self.library, metrics=metrics, data_report=self.data_report)
        if hub.push:
            url = push(self.run_dir, hub.repo_id, private=hub.private, merge=hub.merge, revision=hub.revision,
                       commit_message=hub.commit_message, recipe=recipe, card_written=True)
            self.say(f"pushed: {url}")
            if hub.push_dataset:
                url = push_dataset(self.prepared, recipe, hub.push_dataset, private=hub.private, report=self.say)
                self.say(f"pushed the prepared splits: {url}")

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
