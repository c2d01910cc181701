"""Checkpoints and the final weights: what a run saves, how it finds and verifies what to resume from.

Accelerate's state (model, optimizer, scheduler, RNGs, dataloader position) plus `Progress`, the loop's own
counters, make a checkpoint from which the run continues exactly; ift/run.py's RunDir owns the folder layout.

A checkpoint holds the *trainable* weights only (`keep_trainable`): the frozen base of a LoRA or QLoRA run is
loaded again from where the run loaded it, so a 7B QLoRA checkpoint is its adapter's size, not 14 GB, and holds
none of bitsandbytes' quantization state (which a strict load would refuse). Loading checks that the file
holds every trainable weight and nothing the model lacks (`load_checkpoint`): another model's checkpoint is
refused by name, not half-loaded.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ift import atomic
from ift.errors import IftError
from ift.recipe import ModelConfig
from ift.run import RunDir, free_space

STATE_FILE = "trainer_state.json"


@dataclass
class Progress:
    """What a checkpoint must carry besides Accelerate's state to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed (on each process)
    best_metric: float | None = None
    best_step: int | None = None
    best_validation: dict | None = None  # every validation figure at best_step: what final/ scores
    evals_without_improvement: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # fp16 windows whose update the GradScaler skipped (inf/NaN gradients)
    history: list[dict] = field(default_factory=list)



def best_of(progress: Progress) -> dict | None:
    return None if progress.best_step is None else {"step": progress.best_step, "value": progress.best_metric}


def save_checkpoint(acc, rd: RunDir, progress: Progress) -> Path:
    """Accelerate state + our progress, written to a temporary folder and renamed: never half a checkpoint.
    Every process calls it (each writes its RNG state); the main one renames."""
    final = rd.checkpoint(progress.step)
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp))
        # every process writes its own RNG state into tmp: all of them must be done before it is renamed
        acc.wait_for_everyone()
        if acc.is_main_process:
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
    return final


def prune_checkpoints(rd: RunDir, keep: int, best_step: int | None) -> None:
    """Keep the last `keep` checkpoints and the best one."""
    steps = rd.checkpoint_steps()
    for step in steps[:-keep]:
        if step != best_step:
            shutil.rmtree(rd.checkpoint(step), ignore_errors=True)


def find_checkpoint(rd: RunDir, resume: bool | str, say) -> Path | None:
    """The checkpoint to continue from: the given one (verified), or the newest that verifies."""
    if resume in (False, None, "false"):
        return None
    if isinstance(resume, str) and resume not in ("auto", "true"):
        path = Path(resume)
        if not (path / STATE_FILE).exists():
            raise IftError(f"'{resume}' is not a complete ift checkpoint", "training.resume",
                           f"give a folder from {rd.checkpoints} or use resume: auto")
        problem = rd.verify(path)
        if problem and not (path / "manifest.json").exists():
            say(f"warning: checkpoint {path} has no manifest (an older ift wrote it): not verified")
        elif problem:
            raise IftError(f"checkpoint {path} is damaged: {problem}", "training.resume",
                           f"resume from an older checkpoint in {rd.checkpoints}, or use resume: auto")
        return path
    found = rd.newest_valid_checkpoint(say=say)
    if found is not None:
        return found
    if rd.checkpoint_steps():
        raise IftError(f"no checkpoint in {rd.checkpoints} is complete", "--resume",
                       "each one failed verification (named above); start again without --resume "
                       "and with training.overwrite_output_dir: true")
    if resume == "auto":
        return None  # nothing to resume yet: start fresh
    raise IftError(f"no checkpoint to resume in {rd.checkpoints}", "--resume",
                   "start without --resume, or point training.output_dir at the interrupted run")


def keep_trainable(models, weights: list[dict], output_dir) -> None:
    """Accelerate save_state pre-hook: each model's state dict cut to its trainable parameters and buffers.

    named_parameters() names a tied weight once (SmolLM2's head is its embedding), so a tie is saved once too:
    safetensors cannot hold one storage twice, and loading re-ties it. FSDP and DeepSpeed save through their
    own code (`weights` holds nothing for them)."""
    for model, state in zip(models, weights):
        keep = {name for name, p in model.named_parameters() if p.requires_grad}
        keep |= {name for name, _ in model.named_buffers()}
        for name in list(state):
            if name not in keep:
                del state[name]


def check_checkpoint_weights(model, folder: Path) -> None:
    """The checkpoint's weights file holds every trainable weight of `model` and no name `model` lacks."""
    from safetensors import safe_open

    file = folder / "model.safetensors"
    if not file.exists():  # FSDP / DeepSpeed layouts, or a .bin file: their own loaders check
        return
    with safe_open(str(file), framework="pt") as f:
        saved = set(f.keys())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - saved)
    unknown = sorted(saved - set(model.state_dict()))
    if missing or unknown:
        what = (f"{len(missing)} trainable weights missing (e.g. {missing[0]})" if missing else
                f"{len(unknown)} weights this model does not have (e.g. {unknown[0]})")
        raise IftError(f"checkpoint {folder} does not match this model: {what}", str(folder),
                       "it was written by another model or recipe: move it away to resume from the previous "
                       "one, or start again without --resume")


def load_checkpoint(acc, folder: Path, model=None) -> Progress:
    """Accelerate's state + our progress; a checkpoint that does not load is named, never a traceback.

    `model` is the prepared model: its trainable weights come from the checkpoint, its frozen ones stay as
    loaded (see `keep_trainable`)."""
    from accelerate.utils import DistributedType

    plain = acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                         DistributedType.MEGATRON_LM)
    if plain and model is not None:
        check_checkpoint_weights(model, folder)
    try:
        # strict=False: the frozen weights are not in the file (checked above: nothing else is missing)
        acc.load_state(str(folder), **({"strict": False} if plain else {}))
        return Progress(**json.loads((folder / STATE_FILE).read_text()))
    except Exception as err:  # safetensors, pickle, shape mismatches: all mean this checkpoint is unusable
        detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise IftError(f"checkpoint {folder} does not load: {type(err).__name__}: {detail[:400]}",
                       str(folder), "it was written by another model or recipe, or damaged: move it away to "
                       "resume from the previous one") from None


def check_fresh_run_dir(run_dir: Path, overwrite: bool) -> None:
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if overwrite:
        return
    # only a finished run or a complete checkpoint count: a save killed before its rename leaves step-N.tmp
    rd = RunDir(run_dir)
    if rd.final.exists() or rd.checkpoint_steps():
        raise IftError(f"{run_dir} already holds a run", "training.output_dir",
                       "continue it with --resume, choose another output_dir, or set training.overwrite_output_dir: true")


def saved_tokenizer(checkpoint: Path | None, model: ModelConfig):
    """On resume a trained (init: scratch) tokenizer must be the one the run started with. Any other is loaded
    again and set up again (deterministic), so the tokens the chat setup adds are known as new, as they were."""
    if checkpoint is None or model.tokenizer or model.name_or_path:
        return None
    folder = RunDir.of_checkpoint(checkpoint).tokenizer
    if not folder.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def save_final(model, state: dict, tokenizer, rd: RunDir, resized: bool = False) -> None:
    """Adapter or full model + tokenizer, safetensors, renamed into place when complete.

    resized: the tokenizer gained tokens, so the base's embeddings were grown; an adapter then carries the
    grown embedding matrices too (a reloaded base would draw its new rows afresh)."""
    final = rd.final
    tmp = final.with_name("final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    extra = {"save_embedding_layers": True} if resized and hasattr(model, "peft_config") else {}
    model.save_pretrained(tmp, state_dict=state, **extra)
    tokenizer.save_pretrained(tmp)
    atomic.apply_umask(tmp)  # safetensors writes 0600 files
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
