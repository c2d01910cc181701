"""The recipe: one YAML file read into one validated, frozen `Recipe` that flows through every step.

Every mistake (syntax, unknown key, wrong type, out-of-range value, missing key, contradictory
settings) is found before any model or data loads, and all of them are reported together.
Key names follow what TRL / Axolotl / LLaMA-Factory users already know where those tools agree.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any, Iterable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ift.errors import IftError, IftErrors
from ift.metrics import FAMILIES, computed_by, evaluate_modules, module_figures, module_name

SPLITS = ("train", "validation", "test")
# Keys that hold secrets: refused in recipes, so a resolved recipe written to a run folder never leaks one.
SECRET_KEYS = {"token", "hf_token", "api_key", "password", "secret"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelConfig(_Section):
    name_or_path: str | None = None  # Hub id or local folder
    gguf_file: str | None = None  # a .gguf path, a file in name_or_path, or pkg:<package>/<file>
    tokenizer: str | None = None  # defaults to name_or_path; with init=scratch and none, one is trained
    revision: str | None = None
    # the base's Hub id, written into adapter configs and cards when name_or_path is a local folder or GGUF
    hub_id: str | None = None
    kind: Literal["auto", "causal", "seq2seq"] = "auto"
    # Weights as loaded. Trainable weights are always trained as float32 master weights (a bf16 checkpoint
    # under full fine-tuning included: AdamW on bf16 rounds small updates away); half-precision compute comes
    # from training.mixed_precision. Frozen weights (LoRA's base) keep this dtype.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    # Attention kernel. auto: transformers' default (sdpa), except eager for short sequences in CPU training
    # under bf16 autocast, where torch's CPU flash-attention backward is the slower one (ift/modeling/attention.py)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    # Liger's fused Triton kernels in training (RMSNorm, RoPE, SwiGLU; linear cross-entropy on the loss positions).
    # auto: on where liger-kernel imports, the run is on CUDA and the architecture is covered; true: refused where
    # it cannot run; the saved recipe records which ran (ift/training/liger.py)
    liger: Union[Literal["auto"], bool] = "auto"
    init: Literal["pretrained", "scratch"] = "pretrained"
    config: str | dict[str, Any] | None = None  # init=scratch: a config path/Hub id, or inline sizes
    vocab_size: int = Field(8000, ge=256, le=1_000_000)  # tokenizer trained for init=scratch
    cache_dir: str | None = None  # GGUF conversions; default ~/.cache/ift


class AdapterConfig(_Section):
    method: Literal["none", "lora", "qlora"] = "none"
    r: int = Field(16, ge=1, le=4096)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["auto", "all-linear"], list[str]] = "auto"
    bias: Literal["none", "all", "lora_only"] = "none"
    # QLoRA (bitsandbytes) settings
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class SplitNames(_Section):
    """Which split of the source feeds each of ours; null means carve it from train."""

    train: str | None = "train"
    validation: str | None = "validation"
    test: str | None = "test"


SourceFormat = Literal["auto", "template", "text", "messages", "sharegpt", "prompt_completion", "alpaca"]
CONVERSATIONAL = ("messages", "sharegpt", "prompt_completion", "alpaca")
ALPACA_TEMPLATE = "alpaca/instruction_input"  # the shipped template (templates/alpaca) that renders alpaca rows


class SourceConfig(_Section):
    path: str  # local file/folder (json, jsonl, csv, parquet, save_to_disk) or a Hub dataset id
    name: str | None = None  # how reports name it; default from the path
    # what a row is: template (promptsource templates render it), text (loss on every token), or a
    # conversation (messages, sharegpt, prompt_completion, alpaca); auto: template when templates are given,
    # else the conversational format the columns show, else text
    format: SourceFormat = "auto"
    conversation_column: str | None = None  # messages/sharegpt: the column of turns (default messages/conversations)
    # conversations: the function schemas handed to the chat template for rows without a `tools` column of their own
    tools: list[dict[str, Any]] | None = None
    config: str | None = None  # Hub config (subset)
    revision: str | None = None  # Hub branch, tag or commit (refs/convert/parquet: the Hub's Parquet export)
    data_dir: str | None = None  # a folder of the Hub repo (in the Parquet export, one per config)
    splits: SplitNames = SplitNames()
    columns: dict[str, str] = {}  # renames: old -> new
    # label names per column, as the source names the column (before renames): value i becomes the i-th name
    # (a value that already is one of the names stays; -1 or null: no label), before templates render
    labels: dict[str, list[str]] = {}
    templates: list[str] = []  # template refs; empty = raw text (loss on every token)
    template_mode: Literal["sample", "all"] = "sample"  # one random template per row (T0) or every one
    eval_template: str | None = None  # fix one template for validation/test
    text_column: str = "text"  # raw-text sources only
    weight: float | None = Field(None, gt=0)
    max_rows: int | None = Field(None, ge=1)  # cap (FLAN-style examples-proportional mixing)

    @field_validator("labels")
    @classmethod
    def _label_names(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for column, names in value.items():
            if not names or len(set(names)) != len(names):
                raise ValueError(f"labels.{column} lists each label name once, in the order of the label ids "
                                 "(e.g. [negative, neutral, positive])")
        return value


class MixtureConfig(_Section):
    strategy: Literal["weighted", "proportional"] = "proportional"
    total: int | None = Field(None, ge=1)  # rows of the training mixture (weighted)
    cap: int | None = Field(None, ge=1)  # per-source cap (proportional)


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(min_length=1)
    # a YAML file naming local copies of Hub datasets (docs/data.md): the sources it names read their copy
    # instead, e.g. offline: data.data_map=tests/shared_data.yaml. Applied when the data loads; the prepared
    # data, and a run's saved recipe, name the copies read (and no map)
    data_map: str | None = None
    templates_dir: list[str] = []
    validation_size: float = Field(0.1, ge=0)  # < 1: fraction of train; >= 1: row count
    test_size: float = Field(0.1, ge=0)
    stratify_by: str | None = None
    seed: int = 42
    mixture: MixtureConfig = MixtureConfig()
    max_length: int = Field(1024, ge=8)
    truncation: Literal["left", "right", "drop"] = "left"  # what to do with an over-long prompt
    train_on_prompt: bool = False
    # auto: conversations in the tokenizer's own chat template, template pairs as plain text;
    # tokenizer | <name> (chatml, llama3) | <path.jinja>: that template, pairs wrapped in it too; none: no template
    # (true/false, the older form, mean tokenizer/none)
    chat_template: str = "auto"
    system_prompt: str | None = None  # conversations without a system message of their own get this one
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"  # conversations: which replies carry loss
    train_on_reasoning: bool = True  # conversations: an assistant's reasoning (<think>, reasoning_content) carries loss
    special_tokens: list[str] = []  # added to the tokenizer (embeddings resized; with LoRA the new rows train)
    # true: each training batch's rows laid end to end in one row (padding-free); bfd: rows packed into bins of
    # max_length tokens by best-fit decreasing, a batch is per_device_train_batch_size bins (ift/data/collate.py).
    # Either way examples never attend to each other, and evaluation batches are padded
    packing: Union[bool, Literal["bfd"]] = False
    group_by_length: bool = False
    # training batches padded to a multiple of this many tokens; auto: 16 on the CPU but never past the run's
    # longest row (a few tensor sizes that glibc's malloc reuses, docs/benchmarks.md "CPU memory"), none
    # elsewhere; null: each batch to its longest row
    pad_to_multiple_of: int | str | None = "auto"
    leak_check: bool = True
    num_proc: int = Field(1, ge=1)

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _pad_multiple(cls, value: int | str | None) -> int | str | None:
        if value is None or value == "auto" or (isinstance(value, int) and value >= 1):
            return value
        raise ValueError("pad_to_multiple_of is auto, a number of tokens of at least 1, or null")

    @field_validator("chat_template", mode="before")
    @classmethod
    def _chat_template_bool(cls, value: Any) -> Any:
        return {True: "tokenizer", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @property
    def wraps_pairs(self) -> bool:
        """Template pairs are wrapped in the chat template (as a one-turn conversation)."""
        return self.chat_template not in ("auto", "none")

    @property
    def conversational(self) -> bool:
        """Some source is declared conversational (auto-detected ones are known once loaded: a run's saved
        recipe has every source's format pinned)."""
        return any(s.format in CONVERSATIONAL for s in self.sources)

    @property
    def chat_run(self) -> bool:
        """The model trains in its chat template (wrapped pairs or conversations): chat, generate and the card
        prompt it that way."""
        return self.wraps_pairs or self.conversational


class TrainingConfig(_Section):
    output_dir: str
    overwrite_output_dir: bool = False  # otherwise a folder holding a run is only continued (--resume)
    seed: int = 42
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)  # > 0 overrides epochs
    per_device_train_batch_size: int = Field(8, ge=1)
    per_device_eval_batch_size: int = Field(16, ge=1)
    # micro-batches per optimizer step; the loss is the mean over every loss token of the window (all processes),
    # and an epoch's last window may be shorter: equal to one batch of per_device_train_batch_size x this
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    # torch's fused AdamW updates every tensor in one kernel, in place (for 135M parameters on this CPU 0.07 s
    # against 0.25 s for torch's default per-tensor loop); adamw_torch is that default. Not fused under
    # FSDP/DeepSpeed, whose wrappers replace the parameters after the optimizer is built.
    optim: Literal["adamw_torch_fused", "adamw_torch"] = "adamw_torch_fused"
    # transformers.get_scheduler's schedules (warmup from 0, as HF Trainer); constant = constant_with_warmup
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1)  # None: at the end of each epoch
    save_steps: int | None = Field(None, ge=1)  # None: at the end of each epoch
    save_total_limit: int = Field(2, ge=1)
    metric_for_best_model: str = "loss"
    greater_is_better: bool | None = None  # None: lower is better for loss, higher otherwise
    early_stopping_patience: int | None = Field(None, ge=1)
    resume: Union[bool, str] = False  # false, true/"auto" (latest checkpoint), or a checkpoint path
    # Accelerate's trackers; one not installed is named in a note and skipped (the run still trains)
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "clearml", "aim", "dvclive",
                            "swanlab", "none"]] = ["tensorboard"]
    run_name: str | None = None  # the trackers' run name (default: the output folder's name)
    tags: list[str] = []  # the trackers' tags, where a tracker has them (wandb, mlflow, comet_ml, trackio)
    # NEFTune (Jain et al. 2023): uniform noise of alpha / sqrt(length * hidden) on the input embeddings while
    # training, none at evaluation; transformers' own hook. 5 is the paper's usual value; None: off
    neftune_noise_alpha: float | None = Field(None, gt=0)
    dataloader_num_workers: int = Field(0, ge=0)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _mixed_precision_no(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `no` (in a recipe or in training.mixed_precision=no) as false
        return "no" if value is False else value


class EvaluationConfig(_Section):
    # loss, accuracy, rouge, or any `evaluate` module for generated answers: a Hub id (sacrebleu, chrf,
    # bertscore) or a local module file / folder; its figures are recorded as <module>.<key>
    metrics: list[str] = ["loss", "accuracy"]
    accuracy_mode: Literal["auto", "rank", "generate"] = "auto"  # auto: rank where rows have choices
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)  # cap on validation rows during training
    test: bool = True  # evaluate the test split when training ends
    compare_base: bool = False  # also evaluate the untuned base model on test
    rouge_use_stemmer: bool = True
    # lm-eval task names or task YAML files (local data), run on the base and the fine-tuned model when training
    # ends (ift eval RUN --benchmarks runs them on a finished run); needs ift[benchmarks]
    benchmarks: list[str] = []
    benchmark_limit: int | None = Field(None, ge=1)  # rows per task (lm-eval's limit); None: every row
    benchmark_num_fewshot: int | None = Field(None, ge=0)  # None: each task's own setting

    @field_validator("benchmarks")
    @classmethod
    def _benchmark_entries(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not entry.strip():
                raise ValueError("an empty entry; list lm-eval task names or task YAML files")
            if entry.endswith((".yaml", ".yml")) and not Path(entry).is_file():
                raise ValueError(f"the task file {entry!r} does not exist (give an lm-eval task name or an "
                                 "existing task YAML file)")
        if len(set(value)) != len(value):
            raise ValueError("list each task once")
        return value

    @field_validator("metrics")
    @classmethod
    def _metric_entries(cls, value: list[str]) -> list[str]:
        names: dict[str, str] = {}
        for entry in value:
            if not entry.strip():
                raise ValueError("an empty entry; list loss, accuracy, rouge or evaluate modules (e.g. sacrebleu)")
            if entry in FAMILIES:
                continue
            local = entry.endswith(".py") or entry.startswith((".", "/", "~")) or Path(entry).exists()
            if local and not Path(entry).expanduser().exists():
                raise ValueError(f"the evaluate module file {entry!r} does not exist (give an existing .py file or "
                                 "its folder, or a Hub id such as sacrebleu)")
            name = module_name(entry)
            if name in FAMILIES:
                raise ValueError(f"{entry!r} is named like the built-in {name}; use {name} (ift's own), or copy the "
                                 "module to a file of another name")
            if name in names:
                raise ValueError(f"{entry!r} and {names[name]!r} would both record figures named "
                                 f"{name}.*; keep one")
            names[name] = entry
        if len(set(value)) != len(value):
            raise ValueError("list each metric once")
        return value


class HubConfig(_Section):
    push: bool = False
    repo_id: str | None = None
    private: bool = False
    merge: bool = False  # push a merged model instead of the adapter
    revision: str | None = None  # a branch of the repo (created when missing)
    commit_message: str | None = None
    # end: push once training ends; every_save: also push the weights (adapter or model + tokenizer + card) at
    # every checkpoint, so a crashed run has published its last one; checkpoint: every_save plus the full
    # resumable checkpoint under last-checkpoint/ (as HF Trainer's hub_strategy)
    strategy: Literal["end", "every_save", "checkpoint"] = "end"
    push_dataset: str | None = None  # a dataset repo id: also push the prepared splits, with a dataset card


class Recipe(_Section):
    model: ModelConfig
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig
    training: TrainingConfig
    evaluation: EvaluationConfig = EvaluationConfig()
    hub: HubConfig = HubConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        problems = _contradictions(self)
        if problems:
            raise _Contradictions(problems)
        return self

    def to_yaml(self) -> str:
        """The resolved recipe (defaults filled in). Recipes cannot hold secrets, so none are written."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> None:
        from ift import atomic

        atomic.write_text(path, self.to_yaml())


class _Contradictions(ValueError):
    def __init__(self, problems: list[tuple[str, str, str]]):
        self.problems = problems
        super().__init__("; ".join(p[1] for p in problems))


def _bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _contradictions(r: Recipe) -> list[tuple[str, str, str]]:
    """Settings that are each valid but cannot go together: (key path, what, fix), section by section."""
    return [*_model_contradictions(r.model, r.adapter), *_format_contradictions(r.data, r.model),
            *_training_contradictions(r.training, r.evaluation, r.model), *_hub_contradictions(r.hub, r.adapter),
            *_source_contradictions(r.data)]


def _model_contradictions(m: ModelConfig, a: AdapterConfig) -> list[tuple[str, str, str]]:
    out = []
    if m.init == "pretrained" and not m.name_or_path and not m.gguf_file:
        out.append(("model.name_or_path", "no model given",
                    "set model.name_or_path to a Hub id or local folder (or model.gguf_file, or model.init: scratch)"))
    if m.init == "scratch" and m.config is None:
        out.append(("model.config", "init: scratch needs a model config",
                    "set model.config to a config path/Hub id or inline sizes such as {model_type: llama, hidden_size: 64}"))
    if m.init == "scratch" and m.gguf_file:
        out.append(("model.gguf_file", "a GGUF file holds pretrained weights but model.init is scratch",
                    "remove model.gguf_file or set model.init: pretrained"))
    if a.method == "lora" and m.init == "scratch":
        out.append(("adapter.method", "LoRA trains a small adapter on top of pretrained weights; a scratch model has none",
                    "use adapter.method: none (full training) for init: scratch"))
    if a.method == "qlora" and m.init == "scratch":
        out.append(("adapter.method", "QLoRA quantizes pretrained weights; a scratch model has none worth freezing",
                    "use adapter.method: none (full training) for init: scratch"))
    if a.method == "qlora" and not _bitsandbytes_available():
        out.append(("adapter.method", "QLoRA needs 4-bit layers from bitsandbytes, which is not installed",
                    "pip install 'ift[qlora]' (bitsandbytes >= 0.45), or use adapter.method: lora"))
    return out


def _format_contradictions(d: DataConfig, m: ModelConfig) -> list[tuple[str, str, str]]:
    """Source formats, chat templates and packing against the model's kind."""
    out = []
    if m.kind == "seq2seq" and d.wraps_pairs:
        out.append(("data.chat_template", "chat templates wrap decoder-only conversations; a seq2seq model has none",
                    "set data.chat_template: none (or auto) for seq2seq models"))
    for i, s in enumerate(d.sources):
        if s.format in CONVERSATIONAL and m.kind == "seq2seq":
            out.append((f"data.sources.{i}.format", f"a {s.format} source is a conversation for a decoder-only "
                        "model; a seq2seq model has no chat template", "use a causal model, or format: template"))
        if s.format in CONVERSATIONAL and d.chat_template == "none":
            out.append((f"data.sources.{i}.format", f"a {s.format} source needs a chat template, but "
                        "data.chat_template is none", "set data.chat_template: auto (the tokenizer's), chatml, "
                        "llama3 or a .jinja path"))
        if s.templates and s.format not in ("auto", "template", "alpaca"):
            out.append((f"data.sources.{i}.templates", f"templates given on a {s.format} source",
                        "remove the templates, or set format: template"))
        if s.format == "template" and not s.templates:
            out.append((f"data.sources.{i}.templates", "format: template but no templates given",
                        "list template refs under templates, or use another format"))
        if s.conversation_column and s.format not in ("auto", "messages", "sharegpt"):
            out.append((f"data.sources.{i}.conversation_column", f"conversation_column set on a {s.format} source",
                        "it names the turns column of messages/sharegpt sources; remove it"))
    if d.packing and m.kind == "seq2seq":
        out.append(("data.packing", "packing concatenates decoder-only sequences; it does not apply to seq2seq",
                    "set data.packing: false"))
    if d.packing == "bfd" and d.group_by_length:
        out.append(("data.group_by_length", "group_by_length with packing: bfd (bins are already of similar fill)",
                    "set data.group_by_length: false, or data.packing: true"))
    return out


def _training_contradictions(t: TrainingConfig, e: EvaluationConfig, m: ModelConfig) -> list[tuple[str, str, str]]:
    out = []
    if t.warmup_steps and t.warmup_ratio:
        out.append(("training.warmup_steps", "both warmup_steps and warmup_ratio are set",
                    "keep one of training.warmup_steps / training.warmup_ratio"))
    if t.mixed_precision == "fp16" and m.dtype == "bfloat16":
        out.append(("training.mixed_precision", "fp16 autocast over bfloat16 weights",
                    "use training.mixed_precision: bf16 or model.dtype: float32"))
    metric = t.metric_for_best_model.removeprefix("validation.")
    known = {"loss", *computed_by(e.metrics)}
    if metric not in known and not module_figures(e.metrics, [metric]):
        out.append(("training.metric_for_best_model", f"'{t.metric_for_best_model}' is not among the computed metrics",
                    f"use one of {sorted(known)}"
                    + "".join(f", {module_name(m)}.<key>" for m in evaluate_modules(e.metrics))
                    + " or add it to evaluation.metrics"))
    if t.early_stopping_patience and "loss" not in e.metrics and metric == "loss":
        out.append(("training.early_stopping_patience", "early stopping on loss but loss is not evaluated",
                    "add loss to evaluation.metrics"))
    if isinstance(t.resume, str) and t.resume != "auto" and not Path(t.resume).exists():
        out.append(("training.resume", f"checkpoint '{t.resume}' does not exist",
                    "give an existing checkpoint folder, or resume: auto for the latest in output_dir"))
    return out


def _hub_contradictions(h: HubConfig, a: AdapterConfig) -> list[tuple[str, str, str]]:
    out = []
    for key, value in (("strategy", h.strategy != "end"), ("push_dataset", bool(h.push_dataset))):
        if value and not h.push:
            out.append((f"hub.{key}", f"hub.{key} is set but hub.push is false",
                        f"set hub.push: true (and hub.repo_id), or remove hub.{key}"))
    if h.push and not h.repo_id:
        out.append(("hub.repo_id", "hub.push is true but no repo id is given",
                    "set hub.repo_id: your-name/model-name"))
    if h.merge and a.method == "none":
        out.append(("hub.merge", "merge folds an adapter into the base, but adapter.method is none",
                    "remove hub.merge (a full fine-tune is pushed as is)"))
    return out


def _source_contradictions(d: DataConfig) -> list[tuple[str, str, str]]:
    """The sources together: mixture weights, names, evaluation templates, split sizes."""
    out = []
    if d.mixture.strategy == "weighted" and len(d.sources) > 1 and any(s.weight is None for s in d.sources):
        out.append(("data.sources", "mixture strategy 'weighted' needs a weight on every source",
                    "give each source a weight (e.g. 0.51 / 0.49) or use data.mixture.strategy: proportional"))
    names = [s.name or Path(s.path).stem for s in d.sources]
    for n in {n for n in names if names.count(n) > 1}:
        out.append(("data.sources", f"two sources are both named '{n}'", "give them distinct `name`s"))
    for i, s in enumerate(d.sources):
        if s.eval_template and not s.templates:
            out.append((f"data.sources.{i}.eval_template", "eval_template set on a raw-text source",
                        "remove it, or give the source templates"))
    for key, size in (("data.validation_size", d.validation_size), ("data.test_size", d.test_size)):
        if size >= 1 and size != int(size):
            out.append((key, "a size >= 1 is a row count and must be whole",
                        "use a fraction below 1 (e.g. 0.1) or a whole count (e.g. 200)"))
    if d.validation_size < 1 and d.test_size < 1 and d.validation_size + d.test_size >= 1:
        out.append(("data.validation_size", "validation_size + test_size leave no training rows",
                    "make their sum below 1"))
    return out


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise IftErrors listing every problem at once."""
    path = Path(path)
    raw = _read_yaml(path)
    errors: list[IftError] = []
    for item in overrides:
        try:
            _apply_override(raw, item)
        except IftError as err:
            errors.append(err)
    errors += _secret_errors(raw, path)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        errors += _translate(exc, path, raw)
        raise IftErrors(errors) from None
    if errors:
        raise IftErrors(errors)
    return recipe


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise IftError(f"recipe file not found: {path}", None, "check the path (recipes live in recipes/*.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise IftError(f"YAML syntax error: {problem}", where,
                       "fix the indentation or quoting there (tabs are not allowed; quote values containing ': ')") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IftError(f"cannot read recipe: {exc}", str(path), "check the file's permissions and encoding (UTF-8)") from None
    if data is None:
        raise IftError("the recipe is empty", str(path), "start from recipes/tiny.yaml")
    if not isinstance(data, dict):
        raise IftError("a recipe must be a mapping of sections (model, data, training, ...)", str(path),
                       "start from recipes/tiny.yaml")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise IftError(f"override '{item}' has no '='", "command line", "write overrides as key.path=value")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def _apply_override(raw: dict[str, Any], item: str) -> None:
    keys, value = parse_override(item)
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = _list_item(node, key, keys[: depth + 1])
            continue
        if key not in node or node[key] is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, (dict, list)):
            raise IftError(f"cannot set '{'.'.join(keys)}': '{'.'.join(keys[:depth + 1])}' is not a section",
                           "command line", "override a leaf key such as training.learning_rate=1e-4")
    last = keys[-1]
    if isinstance(node, list):
        idx = int(last) if last.isdigit() else None
        if idx is None or idx >= len(node):
            raise IftError(f"no list item '{last}' in '{'.'.join(keys[:-1])}'", "command line",
                           f"use an index from 0 to {len(node) - 1}")
        node[idx] = value
    else:
        node[last] = value


def _list_item(node: list, key: str, path: list[str]) -> Any:
    if not key.isdigit() or int(key) >= len(node):
        raise IftError(f"no list item '{key}' in '{'.'.join(path[:-1])}'", "command line",
                       f"use an index from 0 to {len(node) - 1}")
    return node[int(key)]


def _secret_errors(raw: Any, path: Path, prefix: str = "") -> list[IftError]:
    """Report (and drop) secret-looking keys anywhere in the recipe."""
    found: list[IftError] = []
    if isinstance(raw, dict):
        for key, value in list(raw.items()):
            where = f"{prefix}{key}"
            if str(key).lower() in SECRET_KEYS:
                del raw[key]  # reported here; not again as an unknown key
                found.append(IftError("secrets do not belong in recipes (they are copied into run folders)",
                                      f"{path}: {where}",
                                      "remove it; ift reads the Hub token from HF_TOKEN or `hf auth login`"))
            else:
                found += _secret_errors(value, path, where + ".")
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            found += _secret_errors(value, path, f"{prefix}{i}.")
    return found


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the key at `loc` (for 'did you mean' suggestions)."""
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = _inner_model(field.annotation)
        if model is None:
            return None
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found:
            return found
    return None


def _translate(exc: ValidationError, path: Path, raw: dict[str, Any]) -> list[IftError]:
    """pydantic errors -> one `error:` line each: what, file + key path, fix."""
    out: list[IftError] = []
    seen: set[str] = set()
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        key = ".".join(str(p) for p in loc)
        kind = err["type"]
        where = f"{path}: {key}" if key else str(path)
        if kind == "value_error" and isinstance(err.get("ctx", {}).get("error"), _Contradictions):
            for k, what, fix in err["ctx"]["error"].problems:
                out.append(IftError(what, f"{path}: {k}", fix))
            continue
        if kind == "value_error" and isinstance(err.get("ctx", {}).get("error"), ValueError):  # our own checks
            out.append(IftError(f"invalid value {err.get('input')!r}: {err['ctx']['error']}", where,
                                "change it to a value the message names"))
            seen.add(key)
            continue
        if kind == "extra_forbidden":
            owner = _model_at(loc)
            options = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), options, n=1, cutoff=0.5)
            fix = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(options)}"
            out.append(IftError(f"unknown key '{loc[-1]}'", where, fix))
        elif kind == "missing":
            out.append(IftError(f"missing required key '{loc[-1]}'", where, _missing_fix(key)))
        elif kind in ("literal_error",):
            expected = err.get("ctx", {}).get("expected", "")
            out.append(IftError(f"invalid value {err.get('input')!r}", where, f"use one of {expected}"))
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short"):
            out.append(IftError(f"value {err.get('input')!r} is out of range: {err['msg'].lower()}", where,
                                "change it to a value in range"))
        else:
            # type errors: a union yields one message per alternative; keep the first per key
            if key in seen:
                continue
            out.append(IftError(f"wrong type: {err['msg'].lower()} (got {err.get('input')!r})", where,
                                "change the value's type"))
        seen.add(key)
    return out


def _missing_fix(key: str) -> str:
    examples = {
        "model": "add a model section, e.g. model: {name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct}",
        "data": "add a data section with at least one source: data: {sources: [{path: data/finance_news}]}",
        "training": "add a training section with output_dir: training: {output_dir: runs/my-run}",
        "training.output_dir": "add training.output_dir: runs/my-run",
        "data.sources": "add data.sources: [{path: ...}]",
    }
    if key in examples:
        return examples[key]
    if key.endswith(".path"):
        return "give the source a path: a local file/folder or a Hub dataset id"
    return f"add {key}"
