"""`ift merge`: fold the LoRA adapter of RUN_DIR/final into its base and save a standalone model.

The base is always loaded in full precision (float32), also for QLoRA runs: merging into a 4-bit
base would round the merged weights to 4 bits and lose what the adapter learned. The result is
written to a temporary folder next to the target and renamed, so a crash leaves no half model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ift.errors import IftError
from ift.recipe import Recipe

Report = Callable[[str], None]


def has_adapter(weights_dir: Path) -> bool:
    """A peft adapter folder (adapter_config.json), as opposed to a full model."""
    return (Path(weights_dir) / "adapter_config.json").is_file()


def load_run_recipe(run_dir: Path) -> Recipe:
    """The resolved recipe a run folder was trained with (RUN_DIR/recipe.yaml)."""
    from ift.recipe import load_recipe

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IftError("run folder not found", str(run_dir), "give the training.output_dir of a finished run")
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        raise IftError("not a run folder: recipe.yaml is missing", str(run_dir),
                       "give the training.output_dir of a run (ift train writes recipe.yaml there)")
    return load_recipe(path)


def merge(run_dir: Path, out: Path | None = None, *, report: Report | None = None) -> Path:
    """Merge RUN_DIR/final (a LoRA adapter) into its full-precision base; save to `out` (default RUN_DIR/merged).

    The folder holds model.safetensors, config, tokenizer and a model card describing the merged model.
    """
    say = report or (lambda _msg: None)
    run_dir = Path(run_dir)
    final = run_dir / "final"
    recipe = load_run_recipe(run_dir)
    _check_final(final)
    out = Path(out) if out is not None else run_dir / "merged"
    _check_out(out, final)

    say(f"loading the base model in float32: {recipe.model.name_or_path or recipe.model.gguf_file}")
    model, tokenizer = _load_adapted(final, recipe)
    say("merging the adapter into the base weights")
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaNs instead of writing them

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        say(f"saving to {out}")
        merged.save_pretrained(tmp)  # transformers 5 writes safetensors only
        tokenizer.save_pretrained(tmp)
        from ift.card import write_model_card

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


def _load_adapted(final: Path, recipe: Recipe):
    """The float32 base with the adapter applied (a PeftModel), and the run's tokenizer.

    ift.modeling.load_final loads the base exactly as evaluation does (same tokenizer, pad token and
    embedding size), always in float32 and without quantization, whatever the recipe trained with.
    """
    from ift.modeling import load_final

    try:
        loaded = load_final(final, recipe.model, merged_dtype="float32")
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
