"""What `ift chat` / `ift generate` talk to: a run's fine-tuned model (its base, any model) and its prompt format.

    target = resolve_target("runs/quickstart")               # a run folder (or a model folder, .gguf, Hub id)
    ids = target.format.encode(target.tokenizer, [{"role": "user", "content": "Hi"}])
    [out] = decode(target.model, target.tokenizer, target.kind, [ids], Decoding(max_new_tokens=64))

Decoding is `ift.evaluation.decoding`'s engine, the one evaluation runs, so greedy answers here equal evaluation's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ift.errors import IftError
from ift.locations import looks_local
from ift.inference.prompts import PromptFormat, run_prompt_format
from ift.run import RunDir

if TYPE_CHECKING:
    from ift.modeling.loading import Loaded
    from ift.recipe import Recipe

TARGET_HELP = "a run folder (recipe.yaml + final/), a model folder, a .gguf file or a Hub model id"


@dataclass
class Target:
    """A loaded model with the prompt format to talk to it in."""

    loaded: Loaded
    format: PromptFormat
    label: str  # "fine-tuned run X", "base model of run X", "model X"
    recipe: Recipe | None = None
    run_dir: Path | None = None

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def kind(self) -> str:
        return self.loaded.kind

    def use_tools(self, tools: list[dict] | None) -> None:
        """Hand `tools` (function schemas, ``ift.inference.tools.read_tools``) to the chat template of every prompt."""
        if not tools:
            return
        if not self.format.chat_template:
            raise IftError("tools need a chat template, and this prompt format has none", "--tools",
                           "use a run trained in a chat template (or a model whose tokenizer has one), without --raw")
        template = getattr(self.tokenizer, "chat_template", None) or ""
        if "tools" not in (template if isinstance(template, str) else str(template)):
            raise IftError("the chat template does not render tools", "--tools",
                           "use a model whose chat template takes tools (e.g. Qwen2.5, Qwen3, Llama-3.1)")
        self.format = dataclasses.replace(self.format, tools=list(tools))

    def check_system(self, system: str | None) -> None:
        """A system prompt needs a chat template to go in."""
        if system and not self.format.chat_template:
            raise IftError("this prompt format has no place for a system prompt", "--system",
                           "the model is used without a chat template here (the run trained without one, or "
                           "--raw): drop --system")


def apply_run_chat_template(loaded: Any, recipe: Recipe) -> None:
    """Give a run's base model the chat template the run trained with (a named template or .jinja file replaces the
    tokenizer's own, as training's setup did), so --base answers in the run's prompt format too."""
    from ift.data.chat_templates import setup_chat_tokenizer

    spec = recipe.data.chat_template
    if spec in ("auto", "tokenizer", "none") or loaded.kind != "causal":
        return
    setup = setup_chat_tokenizer(loaded.tokenizer, spec, recipe.data.special_tokens)
    if setup.added_tokens:  # the base never saw these tokens: rows to hold them, as training started from
        loaded.model.resize_token_embeddings(len(loaded.tokenizer))


def resolve_target(target: str | os.PathLike, *, base: bool = False, template: str | None = None,
                   raw: bool = False, where: str = "RUN_DIR|MODEL") -> Target:
    """Load what `ift chat` / `ift generate` talk to: a run's fine-tuned model (adapters applied, not merged),
    its base (`base=True`), or any model (folder, .gguf file, Hub id), with the prompt format to use."""
    from ift.modeling.final import load_final
    from ift.modeling.loading import load
    from ift.recipe import AdapterConfig, ModelConfig, load_recipe

    text = str(target)
    if not text.strip():
        raise IftError("no model given", where, f"give {TARGET_HELP}")
    path = Path(text).expanduser()
    run_dir = _run_folder(path)
    if run_dir is not None:
        recipe = load_recipe(RunDir(run_dir).recipe)
        if path.resolve() != run_dir.resolve() and (path / "config.json").is_file() and not base:
            # a model folder inside a run (RUN_DIR/merged): the run's format, that folder's weights
            loaded = load(ModelConfig(name_or_path=str(path)), AdapterConfig())
            label = f"model {path}"
        elif base:
            loaded = load(recipe.model, AdapterConfig())
            apply_run_chat_template(loaded, recipe)
            label = f"base model of run {run_dir}"
        else:
            final = RunDir(run_dir).final
            if not final.is_dir():
                raise IftError("the run has no final model", str(final),
                               "let training finish (it writes final/), or talk to the base model with --base")
            # a QLoRA adapter runs on the 4-bit base it was trained on, as `ift eval` scores it
            loaded = load_final(final, recipe.model, adapter=recipe.adapter)
            label = f"fine-tuned run {run_dir}"
        fmt = run_prompt_format(recipe, loaded.kind, template=template, raw=raw,
                                origin=f"{run_dir / 'recipe.yaml'} (data.chat_template: {recipe.data.chat_template}"
                                       + (", conversational sources)" if recipe.data.conversational else ")"))
        _to_accelerator(loaded.model)
        return Target(loaded, fmt, label, recipe, run_dir)
    if base:
        raise IftError("--base needs a run folder (its recipe names the base model)", where,
                       "give a run folder, or the base model itself without --base")
    if path.is_file() and path.suffix == ".gguf":
        cfg = ModelConfig(gguf_file=str(path))
    elif path.is_file():
        raise IftError(f"'{text}' is a file, not a model", where, f"give {TARGET_HELP}")
    elif looks_local(text):
        if not path.exists():
            raise IftError(f"no run folder or model at {text}", where, f"give {TARGET_HELP}")
        if not (path / "config.json").is_file():
            raise IftError(f"{text} is neither a run folder (recipe.yaml) nor a model folder (config.json)", where,
                           f"give {TARGET_HELP}")
        cfg = ModelConfig(name_or_path=str(path))
    else:
        cfg = ModelConfig(name_or_path=text)  # a Hub id: modeling explains unreachable / unknown ids
    loaded = load(cfg, AdapterConfig())
    has_template = bool(getattr(loaded.tokenizer, "chat_template", None))
    if template not in (None, "none"):
        raise IftError("--template needs a run folder (its recipe names the template library)", where,
                       "give a run folder, or type the whole prompt")
    fmt = PromptFormat(kind=loaded.kind, chat_template=has_template and loaded.kind == "causal" and not raw,
                       origin="the model's tokenizer")
    _to_accelerator(loaded.model)
    return Target(loaded, fmt, f"model {text}")


def _run_folder(path: Path) -> Path | None:
    """The run folder `path` is, or whose final/ or merged/ it is; None for anything else."""
    if path.is_dir() and RunDir(path).recipe.is_file():
        return path
    if path.name in ("final", "merged") and path.is_dir() and RunDir(path.parent).recipe.is_file():
        return path.parent
    return None


def _to_accelerator(model) -> None:
    """Use a GPU when there is one; 4-bit models are placed by their loader."""
    import torch

    if torch.cuda.is_available() and not getattr(model, "is_loaded_in_4bit", False) \
            and next(model.parameters()).device.type == "cpu":
        model.to("cuda")

