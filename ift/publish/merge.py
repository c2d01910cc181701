"""`ift merge`: fold the LoRA adapter of RUN_DIR/final into its base and save a standalone model.

The base is loaded unquantized in its own dtype (a bf16 base gives a bf16 model, not a float32 one twice
its size; `dtype` chooses another), also for QLoRA runs: merging into a 4-bit base would round the
merged weights to 4 bits and lose what the adapter learned. peft computes the adapter's delta in float32
and adds it in the base's dtype, so a bf16 merge matches the adapter model to bf16 rounding. The result
is written to a temporary folder next to the target and renamed, so a crash leaves no half model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ift.errors import IftError
from ift.recipe import Recipe
from ift.run import RunDir

Report = Callable[[str], None]
# --dtype names -> torch dtype names; auto = the base checkpoint's own dtype
DTYPES = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}


def has_adapter(weights_dir: Path) -> bool:
    """A peft adapter folder (adapter_config.json), as opposed to a full model."""
    return (Path(weights_dir) / "adapter_config.json").is_file()


def load_run_recipe(run_dir: Path) -> Recipe:
    """The resolved recipe a run folder was trained with (RUN_DIR/recipe.yaml)."""
    from ift.recipe import load_recipe

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IftError("run folder not found", str(run_dir), "give the training.output_dir of a finished run")
    path = RunDir(run_dir).recipe
    if not path.is_file():
        raise IftError("not a run folder: recipe.yaml is missing", str(run_dir),
                       "give the training.output_dir of a run (ift train writes recipe.yaml there)")
    return load_recipe(path)


def merge(run_dir: Path, out: Path | None = None, *, dtype: str = "auto", report: Report | None = None) -> Path:
    """Merge RUN_DIR/final (a LoRA adapter) into its unquantized base; save to `out` (default RUN_DIR/merged).

    dtype: auto (the base checkpoint's own dtype), bf16, fp16 or fp32 (or the torch names).
    The folder holds model.safetensors, config, tokenizer and a model card describing the merged model.
    """
    say = report or (lambda _msg: None)
    run_dir = Path(run_dir)
    final = RunDir(run_dir).final
    if dtype not in DTYPES:
        raise IftError(f"unknown dtype '{dtype}'", "--dtype", f"use one of: {', '.join(DTYPES)}")
    recipe = load_run_recipe(run_dir)
    _check_final(final)
    out = Path(out) if out is not None else RunDir(run_dir).merged
    _check_out(out, final)

    dtype_name = _base_dtype(recipe) if DTYPES[dtype] == "auto" else DTYPES[dtype]
    say(f"loading the base model in {dtype_name}: {recipe.model.name_or_path or recipe.model.gguf_file}")
    model, tokenizer = _load_adapted(final, recipe, dtype_name)
    say("merging the adapter into the base weights")
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaNs instead of writing them

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        say(f"saving to {out}")
        merged.save_pretrained(tmp)  # transformers 5 writes safetensors only
        tokenizer.save_pretrained(tmp)
        from ift.publish.card import write_model_card

        write_model_card(run_dir, recipe, merged=True, path=tmp / "README.md")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_final(final: Path) -> None:
    if not final.is_dir():
        raise IftError("the run has no final weights (final/ is missing)", str(final),
                       "let the training finish, or resume it: ift train RUN_DIR/recipe.yaml --resume")
    if not has_adapter(final):
        raise IftError("final/ holds a full model, not an adapter: there is nothing to merge", str(final),
                       "use the model in final/ as it is (ift push RUN_DIR --repo-id ... without --merge)")


def _check_out(out: Path, final: Path) -> None:
    """Refuse to replace a folder that is not an earlier merge (a user's --out might be anything)."""
    if out.resolve() == final.resolve() or final.resolve() in out.resolve().parents:
        raise IftError("the merged model cannot be written into final/", str(out), "choose another --out")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise IftError("the output folder exists and does not hold a model", str(out),
                       "choose a new or empty --out folder (an earlier merge there is replaced)")


def _base_dtype(recipe: Recipe) -> str:
    """The dtype the base checkpoint is stored in (config.json), float32 when it does not say.

    Not modeling's "auto", which loads float16 as float32 on a CPU for speed: here nothing runs, and the
    merged model should keep the base's size. A GGUF base is its float32 de-quantized cache.
    """
    import torch

    from ift.modeling.config import checkpoint_dtype, pretrained_config
    from ift.modeling.model_source import resolve_model_path

    found = checkpoint_dtype(pretrained_config(recipe.model, resolve_model_path(recipe.model)))
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(found, "float32")


def _load_adapted(final: Path, recipe: Recipe, dtype_name: str):
    """The base in `dtype_name` with the adapter applied (a PeftModel), and the run's tokenizer.

    ift.modeling.final.load_final loads the base exactly as evaluation does (same tokenizer, pad token and
    embedding size), without quantization, whatever the recipe trained with.
    """
    from ift.modeling.final import load_final

    try:
        loaded = load_final(final, recipe.model, dtype=dtype_name)
    except (RuntimeError, ValueError) as exc:  # peft: shapes or modules that do not match the base
        raise IftError(f"the adapter does not fit the base model: {str(exc).strip().splitlines()[0][:300]}",
                       str(final), "check that model.name_or_path in recipe.yaml is the base the adapter was "
                       "trained on") from None
    base_config = loaded.model.get_base_model().config
    if getattr(base_config, "quantization_config", None) is not None:
        raise IftError("the base model is a quantized checkpoint: merging into it would lose precision",
                       loaded.source, "point model.name_or_path at the unquantized base model")
    loaded.model.eval()
    return loaded.model, loaded.tokenizer


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put `tmp` at `out`; an earlier merge there is replaced only once the new one is complete."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
