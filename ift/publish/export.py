"""`ift export RUN_DIR --format gguf`: the run's merged model as one GGUF file for llama.cpp, and an Ollama Modelfile.

    paths = export_gguf("runs/quickstart", quant="q8_0")   # runs/quickstart/export/quickstart-q8_0.gguf + Modelfile

The weights are the adapter merged into the unquantized float32 base (also for QLoRA runs, as `ift merge` does);
`ift.publish.gguf` writes them with the vocabulary and llama.cpp's metadata, `ift.publish.modelfile` the Modelfile
that reproduces the run's prompt format. `check_export` reads the file back with transformers and compares logits.

Supported: decoder-only Llama-family models with byte-level BPE tokenizers (SmolLM, Llama 3, Mistral with a
byte-level vocabulary, Qwen2); anything else is an `IftError` naming what is missing.
The file is written to a temporary name in the target folder and renamed; a failed export leaves nothing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ift import atomic
from ift.errors import IftError
from ift.modeling.model_source import base_hub_id
from ift.run import RunDir
from ift.publish.gguf import QUANTS, check_architecture, write_gguf
from ift.publish.modelfile import modelfile_text

Report = Callable[[str], None]


@dataclass
class Exported:
    gguf: Path
    modelfile: Path
    quant: str
    architecture: str
    tensors: int
    notes: list[str] = field(default_factory=list)


# -------------------------------------------------------------------------------------------------- entry


def export_gguf(run_dir: str | os.PathLike, *, quant: str = "f16", out: str | os.PathLike | None = None,
                report: Report | None = None) -> Exported:
    """Write RUN_DIR's merged model as GGUF (`out`, default RUN_DIR/export/<run>-<quant>.gguf) and a Modelfile."""
    say = report or (lambda _m: None)
    from ift.publish.merge import load_run_recipe

    run_dir = Path(run_dir)
    if quant not in QUANTS:
        raise IftError(f"unknown quantization '{quant}'", "--quant", f"use one of: {', '.join(QUANTS)}")
    recipe = load_run_recipe(run_dir)
    final = RunDir(run_dir).final
    if not final.is_dir():
        raise IftError("the run has no final weights (final/ is missing)", str(final),
                       "let the training finish, or resume it: ift train RUN_DIR/recipe.yaml --resume")
    out = Path(out) if out is not None else RunDir(run_dir).exports / f"{run_dir.resolve().name}-{quant}.gguf"
    if out.suffix != ".gguf":
        raise IftError(f"the output file should end in .gguf: {out}", "--out", f"e.g. --out {out.with_suffix('.gguf')}")
    if out.is_dir():
        raise IftError("--out is a folder", str(out), "give a file name ending in .gguf")
    _check_config(final, recipe)  # before any weights load

    say("loading the fine-tuned model (adapter merged into the float32 base)")
    model, tokenizer, notes = merged_model(run_dir, recipe)
    from ift.inference.prompts import run_prompt_format

    fmt = run_prompt_format(recipe, "causal")
    say(f"writing {out} ({quant})")
    arch, tensors = write_gguf(model, tokenizer, out, quant=quant, chat=fmt.chat_template,
                               pre=_base_pre_tokenizer(recipe), name=run_dir.resolve().name,
                               base_hub_id=base_hub_id(recipe.model), notes=notes)
    modelfile = out.parent / "Modelfile"
    atomic.write_text(modelfile, modelfile_text(out.name, tokenizer, fmt, notes))
    say(f"wrote {modelfile}")
    return Exported(out, modelfile, quant, arch, tensors, notes)


def _check_config(final: Path, recipe) -> None:
    """An unsupported architecture is refused from its config alone."""
    from ift.modeling.config import pretrained_config
    from ift.modeling.model_source import resolve_model_path

    if (final / "config.json").is_file():
        from transformers import AutoConfig

        config, where = AutoConfig.from_pretrained(final), str(final / "config.json")
    else:
        config, where = pretrained_config(recipe.model, resolve_model_path(recipe.model)), "model (recipe.yaml)"
    check_architecture(config, where)


def merged_model(run_dir: Path, recipe) -> tuple[Any, Any, list[str]]:
    """The run's model as one set of float32 weights: the adapter merged into the unquantized base (a QLoRA
    run's adapter too: into the full-precision base, not the 4-bit one it trained on), or final/'s full model."""
    from ift.publish.merge import has_adapter
    from ift.modeling.final import load_final

    notes: list[str] = []
    final = RunDir(run_dir).final
    try:
        loaded = load_final(final, recipe.model, dtype="float32")  # no adapter arg: never 4-bit
    except (RuntimeError, ValueError) as exc:
        raise IftError(f"the adapter does not fit the base model: {str(exc).strip().splitlines()[0][:300]}",
                       str(final), "check that the recipe's model is the base the adapter was trained on") from None
    model = loaded.model
    if has_adapter(final):
        model = model.merge_and_unload(safe_merge=True)
        if recipe.adapter.method == "qlora":
            notes.append("QLoRA run: the adapter was merged into the full-precision base (training saw a 4-bit base)")
    model.eval()
    return model, loaded.tokenizer, notes


def _base_pre_tokenizer(recipe) -> str | None:
    """The pre-tokenizer name of a GGUF base model: the very one llama.cpp already runs for it."""
    if not recipe.model.gguf_file:
        return None
    import gguf

    from ift.modeling.model_source import locate_gguf

    with contextlib.suppress(Exception):
        value = gguf.GGUFReader(str(locate_gguf(recipe.model))).fields.get("tokenizer.ggml.pre")
        return value.contents() if value is not None else None
    return None


# ----------------------------------------------------------------------------------------------- checking


def read_back(path: str | os.PathLike, dtype: str = "float32"):
    """The GGUF file loaded by transformers (`gguf_file=`, de-quantized): (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ift.modeling.model_source import dequantize_kwargs

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype),
                                                 **dequantize_kwargs())
    model.eval()
    return model, tokenizer


def compare_logits(reference, tokenizer, exported, texts: Sequence[str]) -> dict:
    """Largest logit difference between two models on `texts` (the reference's tokens), absolute and relative to
    the largest reference logit, over the reference's vocabulary."""
    import torch

    worst = scale = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            a = reference(input_ids=ids).logits.float()
            b = exported(input_ids=ids).logits.float()[..., : a.shape[-1]]
            worst = max(worst, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
    return {"max_abs": worst, "max_rel": worst / scale if scale else 0.0}


def check_export(path: str | os.PathLike, reference, tokenizer,
                 texts: Sequence[str] = ("Hello, how are you?", "Headline: profits doubled.")) -> dict:
    """Read the exported file back with transformers; compare logits and tokenization with the merged model."""
    model, tok = read_back(path)
    figures = compare_logits(reference, tokenizer, model, texts)
    figures["same_tokens"] = all(tok(t)["input_ids"] == tokenizer(t)["input_ids"] for t in texts)
    return figures
