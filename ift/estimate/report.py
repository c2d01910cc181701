"""`ift estimate`: memory, compute and data figures for a recipe before any weight is downloaded.

Parameters are counted exactly on a model built on the meta device from the config alone. Memory per
device adds up what PyTorch holds during a step of our loop (ift/train.py): weights, gradients, AdamW
states, the low-precision weight copies autocast keeps, and the activations saved for backward, counted
tensor by tensor for transformers' blocks in eager PyTorch (`block_activation_bytes`; derivation and
calibration in docs/estimate.md). Compute follows 6·N·D (Kaplan et al. 2020) plus the attention term;
data comes from the real tokenized training split.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from ift import atomic
from ift.data.encoding import IGNORE
from ift.errors import IftError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
AUTOCAST_BYTES = {"bf16": 2, "fp16": 2}
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal pretraining, ~20 tokens/parameter
USABLE_FRACTION = 0.9  # of a device's memory; the rest: CUDA context, kernel workspaces, allocator fragmentation
QUANT_BLOCK = 64  # bitsandbytes 4-bit: one absmax constant per 64 weights
NESTED_BLOCK = 256  # double quantization: absmax constants quantized to 8 bits in blocks of 256
FSDP_GPU_OPTIONS = (2, 4, 8, 16, 32, 64)
CACHE_VERSION = 1

# Activations written as Python arithmetic keep several intermediates each (counted from their code):
# gelu_new = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) keeps x, 0.5·x, tanh(...) and 1 + tanh(...).
ACT_SAVED = {"gelu_new": 4, "gelu_fast": 7, "quick_gelu": 2}  # measured with saved-tensor hooks

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'24GB' -> bytes. GB/MB/TB are decimal (10^9 ...), GiB/MiB/TiB binary; a bare number means GB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in _UNITS):
        raise IftError(f"cannot read the memory size '{text}'", "--gpu-memory",
                       "write a number and a unit, e.g. 24GB, 80GiB or 16000MB")
    value = float(match.group(1)) * _UNITS.get(unit, 10**9)
    if value < 1:
        raise IftError(f"the memory size '{text}' is not positive", "--gpu-memory", "give the device's memory, e.g. 24GB")
    return int(value)


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------- the model, from its config only


@dataclass(frozen=True)
class Architecture:
    """The sizes that set activation memory and attention FLOPs."""

    kind: str  # causal | seq2seq
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int  # decoder layers (causal) or encoder layers (seq2seq)
    decoder_layers: int  # seq2seq only, else 0
    vocab: int
    gated_mlp: bool  # SwiGLU / GeGLU: gate and up projections
    act_saved: int  # i-sized tensors the MLP activation keeps: 1 for fused ones (SiLU, GELU), 4 for gelu_new
    fused_qkv: bool  # one Linear computes q, k and v
    attention: str  # fused (sdpa kernels), eager (scores kept, fp32 softmax), math (sdpa's unfused path: T5's bias)
    dropout: float  # hidden dropout in training (T5: 0.1; Llama-style decoders: none)


@dataclass(frozen=True)
class ParamCounts:
    total: int  # unique parameters (tied weights once)
    embedding: int  # input embeddings: lookups, no matmul
    head: int  # output projection weight, counted even when tied (it is still a matmul)
    head_tied: bool
    linear: int  # Linear weights outside the head: what QLoRA quantizes
    encoder_linear: int  # of which in a seq2seq encoder
    linear_numels: tuple[int, ...]  # per Linear, for the 4-bit quantization constants
    largest_tensor: int
    lora_targets: tuple[str, ...]  # names (last part) of the modules LoRA wraps
    lora_fan: int  # sum over targeted modules of (in + out): LoRA parameters = r · lora_fan
    lora_modules: int
    lora_bias: int  # biases trainable under adapter.bias
    block_input_linear: int  # weights of the Linears reading a block's input (q, k, v): skipped in backward
    block_targets: tuple[tuple[str, int], ...]  # targeted Linears per block, by input group (qkv, o, up, down)


@dataclass(frozen=True)
class ModelInfo:
    source: str
    arch: Architecture
    params: ParamCounts
    config_dtype: str | None  # the checkpoint's dtype (for model.dtype: auto)

    def lora_params(self, r: int) -> int:
        return r * self.params.lora_fan + self.params.lora_bias


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _first(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _config_dtype(config: Any) -> str | None:
    dtype = getattr(config, "dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else None
    return name if name in DTYPE_BYTES else None


def architecture(config: Any, model: Any, kind: str) -> Architecture:
    """Sizes from the config; block shape (gated MLP, fused qkv) from the meta model's first block."""
    cfg = _text_config(config)
    hidden = int(_first(cfg, "hidden_size", "d_model", "n_embd"))
    heads = int(_first(cfg, "num_attention_heads", "num_heads", "n_head"))
    head_dim = int(_first(cfg, "head_dim", "d_kv", default=hidden // heads))
    kv_heads = int(_first(cfg, "num_key_value_heads", default=heads))
    intermediate = int(_first(cfg, "intermediate_size", "d_ff", "n_inner", default=4 * hidden))
    layers = int(_first(cfg, "num_hidden_layers", "num_layers", "n_layer"))
    decoder_layers = int(_first(cfg, "num_decoder_layers", default=layers)) if kind == "seq2seq" else 0
    shapes = [(i, o) for _, _, i, o in _linears(_first_block(model))]
    ups = [o for i, o in shapes if i == hidden and o in (intermediate, 2 * intermediate)]
    gated = len(ups) >= 2 or 2 * intermediate in ups
    qkv = heads * head_dim + 2 * kv_heads * head_dim
    fused = qkv != intermediate and any(i == hidden and o == qkv for i, o in shapes)
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    attention = "eager" if impl == "eager" else "fused"
    if getattr(cfg, "relative_attention_num_buckets", None) is not None:
        attention = "math"  # T5's position bias is a float mask that requires grad: sdpa's unfused path
    dropout = float(_first(cfg, "dropout_rate", "resid_pdrop", "hidden_dropout_prob", "hidden_dropout", default=0.0))
    act = str(_first(cfg, "hidden_act", "dense_act_fn", "activation_function", default="silu"))
    return Architecture(kind, hidden, intermediate, heads, kv_heads, head_dim, layers, decoder_layers,
                        int(cfg.vocab_size), gated, ACT_SAVED.get(act, 1), fused, attention, dropout)


def _linears(module: Any) -> Iterable[tuple[str, Any, int, int]]:
    """(name, module, in_features, out_features) of every Linear-like module (nn.Linear, GPT-2's Conv1D)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for name, mod in module.named_modules():
        if isinstance(mod, torch.nn.Linear):
            yield name, mod, mod.in_features, mod.out_features
        elif isinstance(mod, Conv1D):
            yield name, mod, mod.weight.shape[0], mod.weight.shape[1]


def _first_block(model: Any) -> Any:
    """The first repeated block: element 0 of the first ModuleList (a decoder/encoder layer)."""
    import torch

    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            return mod[0]
    return model


# The tensor a Linear reads, from its name: linears of one group share their input.
_GROUP_OF = {
    "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "q": "qkv", "k": "qkv", "v": "qkv", "query": "qkv",
    "key": "qkv", "value": "qkv", "qkv_proj": "qkv", "c_attn": "qkv", "query_key_value": "qkv", "Wqkv": "qkv",
    "o_proj": "o", "out_proj": "o", "o": "o", "dense": "o",
    "gate_proj": "up", "up_proj": "up", "gate_up_proj": "up", "fc1": "up", "c_fc": "up", "wi": "up",
    "wi_0": "up", "wi_1": "up", "w1": "up", "w3": "up", "dense_h_to_4h": "up",
    "down_proj": "down", "fc2": "down", "wo": "down", "w2": "down", "dense_4h_to_h": "down",
}


def _group(name: str) -> str:
    last = name.rsplit(".", 1)[-1]
    if last == "c_proj":  # GPT-2 uses c_proj for both attention and MLP outputs
        return "down" if "mlp" in name else "o"
    return _GROUP_OF.get(last, "other")


def count_parameters(model: Any, adapter_cfg: Any, targets: list[str] | str) -> ParamCounts:
    """Exact counts on a (meta-device) model; LoRA = r·(in + out) per targeted Linear, as peft builds it."""
    import torch

    unique = {id(p): p for p in model.parameters()}
    emb, head_mod = model.get_input_embeddings(), model.get_output_embeddings()
    linears = [(n, m, i, o) for n, m, i, o in _linears(model) if m is not head_mod]
    matched = _lora_matches(model, targets, head_mod)
    fan = bias = 0
    for _, mod in matched:
        if isinstance(mod, torch.nn.Embedding):
            fan += mod.num_embeddings + mod.embedding_dim
        else:
            fan += sum(_in_out(mod))
            if adapter_cfg.bias == "lora_only" and getattr(mod, "bias", None) is not None:
                bias += mod.bias.numel()
    if adapter_cfg.bias == "all":
        bias = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    matched_ids = {id(m) for _, m in matched}
    block = Counter(_group(n) for n, m, _, _ in _linears(_first_block(model)) if id(m) in matched_ids)
    return ParamCounts(
        total=sum(p.numel() for p in unique.values()),
        embedding=emb.weight.numel() if emb is not None else 0,
        head=head_mod.weight.numel() if head_mod is not None else 0,
        head_tied=head_mod is not None and emb is not None and head_mod.weight is emb.weight,
        linear=sum(i * o for _, _, i, o in linears),
        encoder_linear=sum(i * o for n, _, i, o in linears if n.startswith(("encoder.", "model.encoder."))),
        linear_numels=tuple(i * o for _, _, i, o in linears),
        largest_tensor=max((p.numel() for p in unique.values()), default=0),
        lora_targets=tuple(sorted({n.rsplit(".", 1)[-1] for n, _ in matched})),
        lora_fan=fan, lora_modules=len(matched), lora_bias=bias,
        block_targets=tuple(sorted(block.items())),
        block_input_linear=sum(i * o for n, _, i, o in _linears(_first_block(model)) if _group(n) == "qkv"))


def _in_out(mod: Any) -> tuple[int, int]:
    import torch

    if isinstance(mod, torch.nn.Linear):
        return mod.in_features, mod.out_features
    return int(mod.weight.shape[0]), int(mod.weight.shape[1])  # Conv1D stores (in, out)


def _lora_matches(model: Any, targets: list[str] | str, head_mod: Any) -> list[tuple[str, Any]]:
    """The modules peft wraps: 'all-linear' = every Linear but the output head; names match exactly or by
    their trailing dotted parts (peft's check_target_module_exists)."""
    import torch

    linear = {name: mod for name, mod, _, _ in _linears(model)}
    if targets == "all-linear":
        return [(n, m) for n, m in linear.items() if m is not head_mod]
    wanted = [targets] if isinstance(targets, str) else list(targets)
    return [(name, mod) for name, mod in model.named_modules()
            if (name in linear or isinstance(mod, torch.nn.Embedding))
            and (name in wanted or any(name.endswith(f".{t}") for t in wanted))]


def model_info(config: Any, adapter_cfg: Any, kind: str, *, source: str = "config",
               auto_targets: Any = None, trust_remote_code: bool = False) -> ModelInfo:
    """Architecture and exact parameter counts of the model `config` describes, built on the meta device.
    `auto_targets(model) -> names` resolves adapter.target_modules: auto."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IftError(f"cannot build the model from its config: {exc}", source,
                       "check model.name_or_path / model.config (an architecture transformers supports)") from None
    targets = adapter_cfg.target_modules
    if targets == "auto":
        if auto_targets is None:
            raise IftError("target_modules: auto needs the architecture's defaults", "adapter.target_modules",
                           "list the modules, e.g. [q_proj, v_proj]")
        targets = list(auto_targets(model))
    return ModelInfo(source, architecture(config, model, kind), count_parameters(model, adapter_cfg, targets),
                     _config_dtype(config))


def load_model_info(model_cfg: Any, adapter_cfg: Any) -> ModelInfo:
    """The recipe's model: config only (no weights), then `model_info`."""
    import ift.modeling.loading as modeling
    config, source = _load_config(model_cfg)
    kind = modeling.model_kind(config, model_cfg.kind)
    return model_info(config, adapter_cfg, kind, source=source, auto_targets=modeling.lora_target_modules,
                      trust_remote_code=model_cfg.trust_remote_code)


def _load_config(model_cfg: Any) -> tuple[Any, str]:
    """The transformers config as ift.modeling.loading builds the model: for init: scratch the inline or named
    config with the tokenizer's vocabulary, else the model's own (a local folder, config.json from the Hub,
    or the cached conversion of a GGUF file)."""
    import ift.modeling.loading as modeling
    if model_cfg.init == "scratch":
        config = modeling._scratch_base_config(model_cfg)
        if model_cfg.tokenizer or model_cfg.name_or_path:
            config.vocab_size = len(modeling.load_tokenizer(model_cfg))
        else:  # ift trains a BPE tokenizer of this size on the training text
            config.vocab_size = model_cfg.vocab_size
        return config, f"scratch:{config.model_type}"
    path = str(modeling.resolve_model_path(model_cfg))
    config = modeling._pretrained_config(model_cfg, path)  # Hub errors explained as ift.modeling.loading explains them
    return config, model_cfg.gguf_file or model_cfg.name_or_path or path


# ---------------------------------------------------------------- the plan being estimated


@dataclass(frozen=True)
class Setup:
    """Everything the memory figure depends on; the fit advice changes one field at a time."""

    method: str  # none | lora | qlora
    batch_size: int
    grad_accum: int
    seq_len: int  # longest sequence of a batch (the encoder's for seq2seq)
    loss_tokens: int  # most loss-carrying tokens of one sequence (rows through the LM head); decoder length for seq2seq
    gradient_checkpointing: bool
    weight_dtype: str  # dtype of the base weights (the non-quantized ones under QLoRA)
    mixed_precision: str  # no | bf16 | fp16 (autocast)
    lora_r: int
    lora_dropout: float
    double_quant: bool = True
    compute_dtype: str = "bfloat16"  # QLoRA's 4-bit matmuls
    padded: bool = True  # batches carry a padding mask (no packing)
    gpus: int = 1  # data-parallel processes (compute time, steps)
    fsdp: int = 1  # FSDP FULL_SHARD: weights, gradients and optimizer states split over this many devices
    device: str = "cuda"  # CUDA's dropout keeps a bool mask, PyTorch's CPU dropout a float one
    fused_adamw: bool = True  # training.optim adamw_torch_fused (not under FSDP): on CUDA no step temporaries


def model_weight_dtype(model_cfg: Any, method: str, config_dtype: str | None) -> str:
    """What the base weights are held in, as ift.modeling.loading loads them: model.dtype; under 'auto' the checkpoint's
    dtype (float32 when the config names none: GGUF conversions, scratch models). Under QLoRA peft's
    prepare_model_for_kbit_training makes every weight that is not 4-bit float32."""
    if method == "qlora":
        return "float32"
    if model_cfg.dtype != "auto":
        return model_cfg.dtype
    if model_cfg.init == "scratch":
        return "float32"
    return config_dtype or "float32"


def setup_from_recipe(recipe: Any, info: ModelInfo, *, seq_len: int | None = None, loss_tokens: int | None = None,
                      gpus: int = 1, device: str = "cuda") -> Setup:
    t, a, d = recipe.training, recipe.adapter, recipe.data
    seq = min(seq_len or d.max_length, d.max_length)
    return Setup(method=a.method, batch_size=t.per_device_train_batch_size, grad_accum=t.gradient_accumulation_steps,
                 seq_len=seq, loss_tokens=min(loss_tokens or seq, seq),
                 gradient_checkpointing=t.gradient_checkpointing,
                 weight_dtype=model_weight_dtype(recipe.model, a.method, info.config_dtype),
                 mixed_precision=t.mixed_precision, lora_r=a.r, lora_dropout=a.dropout, double_quant=a.double_quant,
                 compute_dtype=a.compute_dtype,
                 padded=not d.packing, gpus=gpus, device=device, fused_adamw=t.optim == "adamw_torch_fused")


# ---------------------------------------------------------------- activations


class Sizes(NamedTuple):
    """Bytes per element: p hidden states, c autocast's matmul dtype (p without autocast), m a dropout mask
    element, lin the base Linears' outputs (bitsandbytes casts 4-bit outputs back to the input dtype),
    att attention's q/k/v (autocast casts them for sdpa)."""

    p: int
    c: int
    m: int
    lin: int
    att: int


def _dtypes(setup: Setup) -> Sizes:
    p = DTYPE_BYTES[setup.weight_dtype]
    c = min(AUTOCAST_BYTES.get(setup.mixed_precision, p), p)  # autocast never widens
    m = 1 if setup.device == "cuda" else p  # CUDA's native_dropout: bool mask; CPU: input * float mask
    lin = p if setup.method == "qlora" else c
    return Sizes(p, c, m, lin, c if c != p else lin)


def _input_bytes(consumers: int, targeted: int, width: int, setup: Setup, *, shared_elsewhere: bool) -> float:
    """Bytes per token kept for one tensor of `width` features read by `consumers` Linears.

    Trainable Linears keep their input for the weight gradient: once when shared, or one low-precision
    copy each under autocast. Frozen Linears keep nothing (the input gradient needs only the weight).
    A LoRA-wrapped one runs its adapter in fp32 (peft upcasts adapters of half-precision models): it keeps
    the dropout mask and lora_A's input (the fp32 dropout output, autocast's copy, or when dropout is 0 the
    shared input itself if it already is fp32), and lora_B keeps r values.
    `shared_elsewhere`: another op keeps this tensor anyway (the fused attention's output).
    """
    p, c, *_ = _dtypes(setup)
    autocast = c != p
    if setup.method == "none":
        if autocast:
            return consumers * c * width
        return 0.0 if shared_elsewhere else p * width
    if not targeted:
        return 0.0
    lora_in = c if autocast else 4
    out = targeted * lora_in * setup.lora_r
    if setup.lora_dropout > 0:
        out += targeted * (_lora_mask_bytes(setup) + lora_in) * width
    elif autocast or p != 4:
        out += targeted * lora_in * width
    elif not shared_elsewhere:
        out += p * width
    return out


def _lora_mask_bytes(setup: Setup) -> int:
    return 1 if setup.device == "cuda" else 4  # LoRA dropout runs on the fp32 input


def _attention_bytes(arch: Architecture, setup: Setup, kv_len: int, *, kv_here: bool) -> float:
    """Bytes per query token one attention keeps: q, k, v and the output or the scores (see below)."""
    _, _, m, _, c = _dtypes(setup)  # c: the attention's own dtype
    a, q_dim = arch.heads, arch.heads * arch.head_dim
    kv_width = q_dim if setup.padded and arch.kv_heads < a else arch.kv_heads * arch.head_dim
    total = c * q_dim + (2 * c * kv_width if kv_here else 0)
    if arch.attention == "fused":  # sdpa kernels keep their output and a logsumexp per head, never the scores
        total += c * q_dim + 4 * a + (c * kv_len if setup.padded else 0)  # the mask, made float per call
    elif arch.attention == "eager":  # softmax in fp32, then cast back for the product with v
        total += 4 * a * kv_len + (c * a * kv_len if c != 4 else 0)
    else:  # sdpa's math path (T5's position bias): softmax output, then dropout's mask and output
        total += c * a * kv_len
    if arch.attention != "fused" and arch.dropout > 0:
        total += (m + c) * a * kv_len
    return total


def block_activation_bytes(arch: Architecture, params: ParamCounts, setup: Setup, *, self_len: int,
                           cross_len: int | None = None) -> float:
    """Bytes per token one transformer block keeps for backward (eager PyTorch, transformers' code).

    Counted tensor by tensor, and checked against autograd's saved-tensor hooks (tests/test_estimate.py):
      norms (RMSNorm): fp32 input and rsqrt, 4h + 4 each; plus the normalised tensor (p·h) when its weight trains
      Linear inputs (q/k/v, o, gate/up, down): see _input_bytes
      attention: see _attention_bytes; fused sdpa keeps k and v at full width when a padding mask makes
        transformers repeat_kv, and the mask converted to float once per layer (c·s)
      MLP: gate output (kept by SiLU), activation and up output (kept by their product): 3·c·i gated; c·i plain
      dropout (T5): a mask after every sublayer (m·h) and on the MLP product (m·i)
    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count
    34·s·b·h + 5·a·s²·b bytes per 16-bit GPT-3 layer; this is the same bookkeeping for the blocks as
    PyTorch eager runs them. Under cross-attention (seq2seq decoders) k and v live on encoder tokens and
    are counted by the caller (`cross_kv_bytes`).
    """
    p, _, m, lin, _ = _dtypes(setup)
    h, i, q_dim = arch.hidden, arch.intermediate, arch.heads * arch.head_dim
    t = dict(params.block_targets)
    full = setup.method == "none"
    sublayers = 3 if cross_len else 2
    total = sublayers * (4 * h + 4 + (p * h if full else 0))
    if arch.dropout > 0:
        total += sublayers * m * h + m * i
    o_shared = arch.attention == "fused"  # the fused kernel keeps its output, which o_proj reads
    total += _input_bytes(1 if arch.fused_qkv else 3, t.get("qkv", 0), h, setup, shared_elsewhere=False)
    total += _attention_bytes(arch, setup, self_len, kv_here=True)
    total += _input_bytes(1, t.get("o", 0), q_dim, setup, shared_elsewhere=o_shared)
    if cross_len:
        total += _input_bytes(1, min(t.get("qkv", 0), 1), h, setup, shared_elsewhere=False)
        total += _attention_bytes(arch, setup, cross_len, kv_here=False)
        total += _input_bytes(1, t.get("o", 0), q_dim, setup, shared_elsewhere=o_shared)
    total += _input_bytes(2 if arch.gated_mlp else 1, t.get("up", 0), h, setup, shared_elsewhere=False)
    total += (arch.act_saved + 2 if arch.gated_mlp else arch.act_saved) * lin * i
    total += _input_bytes(1, t.get("down", 0), i, setup, shared_elsewhere=False)
    return total


def first_block_discount(arch: Architecture, params: ParamCounts, setup: Setup, self_len: int) -> float:
    """Bytes per token the first block does not keep under a frozen base: until the first adapter, nothing
    requires grad (the embedding is frozen), so the first norm and the dropout masks before it keep nothing
    (and the whole attention when no q/k/v is targeted). Checkpointing makes the block input require grad."""
    if setup.method == "none" or setup.gradient_checkpointing:
        return 0.0
    qkv = dict(params.block_targets).get("qkv", 0)
    out = 4 * arch.hidden + 4
    if qkv and setup.lora_dropout > 0:
        out += qkv * _lora_mask_bytes(setup) * arch.hidden
    if not qkv:
        out += _attention_bytes(arch, setup, self_len, kv_here=True)
    return out


def cross_kv_bytes(arch: Architecture, params: ParamCounts, setup: Setup) -> float:
    """Per encoder token and decoder layer: cross-attention k and v, and what their projections keep."""
    c = _dtypes(setup).att
    q_dim = arch.heads * arch.head_dim
    targeted = min(dict(params.block_targets).get("qkv", 0), 2)
    # the encoder output itself is kept once (counted by the caller), so a shared input costs nothing here
    return 2 * c * q_dim + _input_bytes(2, targeted, arch.hidden, setup, shared_elsewhere=True)


@dataclass(frozen=True)
class Activations:
    """Bytes for one micro-batch on one device."""

    saved: int  # kept for backward at the end of the forward pass
    peak: int  # saved + the largest transient of backward (the loss's gradients, a recomputed block)
    per_token_block: float  # bytes per token per (decoder) block, without checkpointing


def activation_bytes(arch: Architecture, params: ParamCounts, setup: Setup) -> Activations:
    """The micro-batch's activations: blocks (or their checkpointed inputs), embedding and loss head."""
    p, c, *_ = _dtypes(setup)
    b, s = setup.batch_size, setup.seq_len
    full = setup.method == "none"
    h, v = arch.hidden, arch.vocab
    if arch.kind == "seq2seq":
        dec = setup.loss_tokens
        enc_block = block_activation_bytes(arch, params, setup, self_len=s)
        dec_block = block_activation_bytes(arch, params, setup, self_len=dec, cross_len=s)
        cross = cross_kv_bytes(arch, params, setup)
        encoder_out = p * h if full and c == p else 0  # read by every decoder layer's k and v projections
        blocks = b * (s * arch.layers * enc_block + dec * arch.decoder_layers * dec_block
                      + s * arch.decoder_layers * cross + s * encoder_out
                      - s * first_block_discount(arch, params, setup, s)
                      - dec * first_block_discount(arch, params, setup, dec))
        tokens, enc_tokens, loss_rows, per_block = b * dec, b * s, b * dec, dec_block
        one_block = b * max(s * enc_block, dec * dec_block + s * cross)
        gc_inputs = p * h * b * (s * arch.layers + dec * arch.decoder_layers + s)
    else:
        per_block = block_activation_bytes(arch, params, setup, self_len=s)
        blocks = b * s * (arch.layers * per_block - first_block_discount(arch, params, setup, s))
        tokens, enc_tokens, loss_rows = b * s, 0, b * setup.loss_tokens
        one_block = b * s * per_block
        gc_inputs = p * h * b * s * arch.layers
    # around the blocks: ids kept by a trainable embedding, the final norm(s)
    norm = 4 * h + 4 + (p * h if full else 0)
    around = (8 if full else 0) * (tokens + enc_tokens) + norm * (tokens + enc_tokens)
    # the head runs on the loss rows only (ift.training.loss.CompletionLoss); cross-entropy keeps fp32 log-probabilities,
    # and backward briefly holds two more fp32 copies (the gradients of the log-probabilities and the logits)
    head_in = c * h * loss_rows if full else 0  # the head keeps its input rows (a low-precision copy under autocast)
    head_saved = head_in + 4 * v * loss_rows
    head_transient = 8 * v * loss_rows
    if arch.kind == "seq2seq":
        # the model gets labels, so transformers computes its own loss over the full logits first (its fp32
        # log-probabilities live until the forward returns); backward scatters into the full logits' shape
        head_saved += 4 * v * tokens
        head_transient += c * v * tokens
    if setup.gradient_checkpointing:
        saved = gc_inputs + around + head_saved
        peak = saved + max(head_transient, one_block)
    else:
        saved = blocks + around + head_saved
        peak = saved + head_transient
    return Activations(int(saved), int(peak), per_block)


# ---------------------------------------------------------------- memory


def quantized_bytes(numels: Iterable[int], double_quant: bool) -> int:
    """bitsandbytes NF4/FP4 storage: 4 bits per weight, one absmax per 64 weights (fp32; or uint8 plus one
    fp32 per 256 blocks, a 256-entry code and an offset with double quantization), a 16-entry code per layer."""
    total = 0
    for n in numels:
        blocks = math.ceil(n / QUANT_BLOCK)
        total += math.ceil(n / 2) + 16 * 4
        total += blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + 256 * 4 + 4 if double_quant else blocks * 4
    return total


@dataclass(frozen=True)
class Memory:
    """Bytes per device; `peak` is the larger of the forward/backward and the optimizer-step high-water marks."""

    weights: int  # base model (4-bit linears + the rest under QLoRA)
    adapter: int  # LoRA weights (fp32: peft upcasts adapters of half-precision models)
    gradients: int
    optimizer: int  # AdamW exp_avg and exp_avg_sq, in the trainable parameters' dtype
    autocast_copies: int  # low-precision copies of Linear weights autocast keeps from forward to backward
    optimizer_step: int  # temporaries of optimizer.step()
    fsdp_buffers: int  # unsharded parameters of the blocks being computed
    activations: int  # peak for the micro-batch
    activations_saved: int
    activations_checkpointed: int  # peak with gradient checkpointing on (for comparison)
    activations_full: int  # peak with it off
    train_peak: int
    step_peak: int

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.step_peak)


def memory(info: ModelInfo, setup: Setup) -> Memory:
    """What one device holds while training under `setup` (see the class and docs/estimate.md)."""
    pc, arch = info.params, info.arch
    p, c, *_ = _dtypes(setup)
    adapter_n = info.lora_params(setup.lora_r) if setup.method != "none" else 0
    if setup.method == "qlora":
        rest = pc.total - pc.linear
        weights = quantized_bytes(pc.linear_numels, setup.double_quant) + p * rest
    else:
        weights = p * pc.total
    trainable_bytes = p * pc.total if setup.method == "none" else 4 * adapter_n
    largest = p * pc.largest_tensor if setup.method == "none" else 4 * adapter_n
    adapter = 4 * adapter_n
    copies = 0
    if c != p:  # autocast casts every Linear weight (and the head) once per forward and keeps it for backward
        copies = c * (pc.head + (pc.linear if setup.method != "qlora" else 0) + adapter_n)
    gradients = trainable_bytes
    optimizer = 2 * trainable_bytes
    # On CUDA fused AdamW updates in place and foreach AdamW allocates one state-sized temporary (sqrt of
    # exp_avg_sq). On the CPU the peak measures the same fused or not (bench/validate_estimate.py): two
    # temporaries the size of the largest tensor, as torch's per-tensor loop (sqrt, then the division).
    if setup.device == "cuda":
        step = 0 if setup.fused_adamw and setup.fsdp == 1 else trainable_bytes
    else:
        step = 2 * largest
    buffers = 0
    n = setup.fsdp
    if n > 1:
        # FSDP units: one per block, and the root (embeddings, head, final norm). The root stays gathered
        # through forward and backward; two blocks are gathered at a time (prefetch), in the autocast dtype
        # (FSDP's param_dtype) or as stored (4-bit); a full fine-tune also holds one block's unsharded gradient.
        blocks = max(arch.layers + arch.decoder_layers, 1)
        root = pc.embedding + (0 if pc.head_tied else pc.head)
        block_bytes = (weights - p * root) / blocks
        cast = c / p if setup.method != "qlora" else 1.0
        buffers = int(cast * (p * root + 2 * block_bytes) + (block_bytes if setup.method == "none" else 0))
        weights, adapter, gradients, optimizer, step = (math.ceil(x / n) for x in (weights, adapter, gradients,
                                                                                     optimizer, step))
    on = activation_bytes(arch, pc, replace(setup, gradient_checkpointing=True))
    off = activation_bytes(arch, pc, replace(setup, gradient_checkpointing=False))
    act = on if setup.gradient_checkpointing else off
    if setup.method == "qlora":  # backward dequantizes one 4-bit weight at a time
        act = replace(act, peak=act.peak + DTYPE_BYTES[setup.compute_dtype] * max(pc.linear_numels, default=0))
    held = weights + adapter + optimizer + buffers
    # with accumulation the gradients of earlier micro-batches stay while the next one runs
    train_peak = held + copies + act.peak + (gradients if setup.grad_accum > 1 else 0)
    step_peak = held + gradients + step
    return Memory(weights, adapter, gradients, optimizer, copies, step, buffers, act.peak, act.saved,
                  on.peak, off.peak, train_peak, step_peak)


# ---------------------------------------------------------------- fit advice


@dataclass(frozen=True)
class Advice:
    changes: tuple[str, ...]  # what to change, in words
    overrides: tuple[str, ...]  # the same as recipe overrides where one exists
    setup: Setup
    peak: int


def fits(info: ModelInfo, setup: Setup, budget: int) -> bool:
    return memory(info, setup).peak <= USABLE_FRACTION * budget


def _batch_options(setup: Setup, largest: int) -> list[Setup]:
    """Per-device batches up to `largest` that divide the effective batch, accumulation raised to keep it."""
    effective = setup.batch_size * setup.grad_accum
    return [replace(setup, batch_size=bs, grad_accum=effective // bs)
            for bs in range(min(largest, effective), 0, -1) if effective % bs == 0]


def _smaller_batch(info: ModelInfo, setup: Setup, budget: int) -> Setup | None:
    """The largest smaller per-device batch that fits with the same effective batch."""
    return next((c for c in _batch_options(setup, setup.batch_size - 1) if fits(info, c, budget)), None)


def _options(setup: Setup) -> list[str]:
    """Changes from cheapest to dearest: batch (same optimisation, more steps), checkpointing (~+33% compute),
    LoRA (fewer trainable weights), QLoRA (4-bit base), more GPUs with FSDP (more hardware)."""
    out = ["batch"] if setup.batch_size > 1 else []
    out += [] if setup.gradient_checkpointing else ["checkpointing"]
    out += ["lora"] if setup.method == "none" else []
    out += ["qlora"] if setup.method != "qlora" else []
    return out + ["fsdp"]


def _apply(kind: str, info: ModelInfo, setup: Setup, budget: int) -> Setup | None:
    """One option applied to `setup`; for batch and FSDP the smallest change that fits (None if none does)."""
    if kind == "batch":
        return _smaller_batch(info, setup, budget)
    if kind == "checkpointing":
        return replace(setup, gradient_checkpointing=True)
    if kind == "lora":
        return replace(setup, method="lora")
    if kind == "qlora":
        return replace(setup, method="qlora", weight_dtype="float32")  # as prepare_model_for_kbit_training leaves it
    for n in FSDP_GPU_OPTIONS:
        candidate = replace(setup, fsdp=n, gpus=max(setup.gpus, n))
        if n > setup.fsdp and fits(info, candidate, budget):
            return candidate
    return None


def fit_advice(info: ModelInfo, setup: Setup, budget: int) -> Advice | None:
    """The cheapest change that makes `setup` fit: each option alone, in order; else options stacked in order
    (batch 1, checkpointing, LoRA, QLoRA, FSDP) until it fits. None when it already fits or nothing helps."""
    if fits(info, setup, budget):
        return None
    for kind in _options(setup):
        candidate = _apply(kind, info, setup, budget)
        if candidate is not None and fits(info, candidate, budget):
            return _advice(info, setup, candidate)
    stacked = setup
    for kind in _options(setup):
        if kind == "batch":
            stacked = replace(stacked, batch_size=1, grad_accum=stacked.batch_size * stacked.grad_accum)
        else:
            candidate = _apply(kind, info, stacked, budget)
            if candidate is None:
                continue
            stacked = candidate
        if fits(info, stacked, budget):
            if stacked.batch_size == 1 and setup.batch_size > 1:  # give back as much batch as still fits
                stacked = _largest_batch(info, stacked, setup, budget)
            return _advice(info, setup, stacked)
    return None


def _largest_batch(info: ModelInfo, stacked: Setup, original: Setup, budget: int) -> Setup:
    return next((c for c in _batch_options(stacked, original.batch_size) if fits(info, c, budget)), stacked)


def _advice(info: ModelInfo, old: Setup, new: Setup) -> Advice:
    changes, overrides = [], []
    if (new.batch_size, new.grad_accum) != (old.batch_size, old.grad_accum):
        changes.append(f"per-device batch {old.batch_size} -> {new.batch_size} with gradient accumulation "
                       f"{old.grad_accum} -> {new.grad_accum} (same effective batch)")
        overrides += [f"training.per_device_train_batch_size={new.batch_size}",
                      f"training.gradient_accumulation_steps={new.grad_accum}"]
    if new.gradient_checkpointing and not old.gradient_checkpointing:
        changes.append("gradient checkpointing (recomputes each block in backward: about a third more compute)")
        overrides.append("training.gradient_checkpointing=true")
    if new.method != old.method:
        changes.append({"lora": "LoRA adapters on a frozen base", "qlora": "QLoRA: LoRA on a 4-bit base"}[new.method])
        overrides.append(f"adapter.method={new.method}")
    if new.fsdp != old.fsdp:
        changes.append(f"FSDP full sharding over {new.fsdp} GPUs (accelerate config: FSDP, FULL_SHARD)")
    return Advice(tuple(changes), tuple(overrides), new, memory(info, new).peak)


# ---------------------------------------------------------------- compute


@dataclass(frozen=True)
class Compute:
    flops: float  # training FLOPs for the whole run (or per step when the data is unknown)
    rule_of_thumb: float  # 6·N·D (full) or 4·N·D (frozen base) with N = matmul parameters
    attention_flops: float
    per: str  # "run" or "step"
    seconds: float | None
    peak_tflops: float | None
    mfu: float
    gpus: int


def compute(info: ModelInfo, setup: Setup, tokens: float, loss_tokens: float, mean_len: float, *,
            decoder_tokens: float = 0.0, peak_tflops: float | None = None, mfu: float = 0.4,
            per: str = "run") -> Compute:
    """FLOPs: forward 2 per matmul weight per token (the head on loss tokens only: ift.training.loss) plus attention
    4·s·d_attn per token per layer; backward twice the forward for trainable weights, once for a frozen base
    (input gradients only), twice for attention; checkpointing adds one more forward of the blocks."""
    pc, arch = info.params, info.arch
    q_dim = arch.heads * arch.head_dim
    if arch.kind == "seq2seq":
        body = 2 * (pc.encoder_linear * tokens + (pc.linear - pc.encoder_linear) * decoder_tokens)
        attention = 4 * q_dim * (arch.layers * mean_len * tokens
                                 + arch.decoder_layers * (decoder_tokens / max(tokens, 1) * mean_len + mean_len)
                                 * decoder_tokens)
        head = 2 * pc.head * decoder_tokens
        all_tokens = tokens + decoder_tokens
    else:
        body = 2 * pc.linear * tokens
        attention = 4 * q_dim * arch.layers * mean_len * tokens
        head = 2 * pc.head * loss_tokens
        all_tokens = tokens
    adapter_n = info.lora_params(setup.lora_r) if setup.method != "none" else 0
    if setup.method == "none":
        flops = 3 * (body + head) + 3 * attention
        rule = 6 * (pc.linear + pc.head) * all_tokens
    else:
        flops = 2 * (body + head) + 3 * attention + 6 * adapter_n * all_tokens
        rule = 4 * (pc.linear + pc.head) * all_tokens
    if setup.gradient_checkpointing:  # one more forward of the blocks, adapters included
        flops += body + attention + 2 * adapter_n * all_tokens
    elif setup.method != "none":
        # nothing before the first block's q/k/v needs a gradient (frozen embedding): their backward is skipped
        flops -= 2 * pc.block_input_linear * tokens
    seconds = None
    if peak_tflops:
        seconds = flops / (setup.gpus * peak_tflops * 1e12 * mfu)
    return Compute(flops, rule, 3 * attention, per, seconds, peak_tflops, mfu, setup.gpus)


# ---------------------------------------------------------------- data: real token counts, cached


@dataclass(frozen=True)
class TokenCount:
    rows: int
    tokens: int  # input tokens of the training split (encoder side for seq2seq)
    loss_tokens: int  # tokens whose label carries loss (decoder tokens for seq2seq)
    max_tokens: int  # longest row
    max_loss_tokens: int  # most loss tokens in one row


def count_tokens(recipe: Any, kind: str, cache_dir: Path | None) -> TokenCount:
    """Token counts of the tokenized training split, exactly as training prepares it (ift.data.prepare), cached by
    the data section, the tokenizer settings and the local source files' sizes and times."""
    key = _data_key(recipe)
    cache = cache_dir / f"tokens-{key}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            return TokenCount(**json.loads(cache.read_text()))
        except (ValueError, TypeError):
            pass  # a damaged cache is recomputed
    from ift.data.conversations import setup_chat_tokenizer
    from ift.data.prepare import build_splits, tokenize
    from ift.modeling.loading import load_tokenizer
    from ift.templates.library import TemplateLibrary

    prepared = build_splits(recipe.data, TemplateLibrary(dirs=tuple(recipe.data.templates_dir)))
    train = prepared.splits["train"]
    texts = (p + " " + c for p, c in zip(train["prompt"], train["completion"]))  # for a scratch tokenizer
    tokenizer = load_tokenizer(recipe.model, train_texts=texts)
    setup_chat_tokenizer(tokenizer, recipe.data.chat_template, recipe.data.special_tokens)  # as training does
    tokens, _ = tokenize(prepared.splits, tokenizer, kind, recipe.data)
    count = _count(tokens["train"], kind)
    if cache is not None:
        atomic.write_text(cache, json.dumps(asdict(count)))
    return count


def _count(split: Any, kind: str) -> TokenCount:
    """Lengths from the Arrow columns (fast for large splits): causal labels are shifted by one, as in the loss."""
    import numpy as np
    import pyarrow.compute as pc

    table = split.with_format("arrow")[:]
    lengths = np.asarray(pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False))
    if "labels" in table.column_names:
        labels = table.column("labels")
        offsets = np.asarray(pc.list_value_length(labels).to_numpy(zero_copy_only=False))
        flat = np.asarray(pc.list_flatten(labels).to_numpy(zero_copy_only=False))
        keep = (flat != IGNORE).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(offsets)[:-1]]).astype(np.int64)
        per_row = np.add.reduceat(keep, starts) if len(flat) else np.zeros(len(offsets), np.int64)
        per_row = np.where(offsets > 0, per_row, 0)
        if kind == "causal":  # the first label never has a prediction before it
            first = np.where(offsets > 0, keep[np.minimum(starts, max(len(flat) - 1, 0))], 0)
            per_row = per_row - first
    else:
        per_row = lengths - 1 if kind == "causal" else lengths
    return TokenCount(rows=int(len(lengths)), tokens=int(lengths.sum()), loss_tokens=int(per_row.sum()),
                      max_tokens=int(lengths.max(initial=0)), max_loss_tokens=int(per_row.max(initial=0)))


def _data_key(recipe: Any) -> str:
    parts = [str(CACHE_VERSION), recipe.data.model_dump_json(),
             json.dumps(recipe.model.model_dump(mode="json"), sort_keys=True)]
    for source in recipe.data.sources:
        path = Path(source.path)
        if path.exists():
            files = sorted(path.rglob("*")) if path.is_dir() else [path]
            parts += [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
    for folder in recipe.data.templates_dir:
        for f in sorted(Path(folder).rglob("*.yaml")) if Path(folder).is_dir() else []:
            parts.append(f"{f}:{f.stat().st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the whole estimate


@dataclass(frozen=True)
class Estimate:
    info: ModelInfo
    setup: Setup
    memory: Memory
    methods: dict[str, dict[str, int]]  # method -> {"no_checkpointing": peak, "checkpointing": peak}
    budget: int | None
    fits: bool | None
    advice: Advice | None
    data: TokenCount | None
    data_error: str | None
    steps_per_epoch: int | None
    total_steps: int | None
    train_tokens: float | None  # over the whole run
    compute: Compute


def estimate(recipe: Any, *, gpu_memory: int | None = None, gpus: int = 1, peak_tflops: float | None = None,
             mfu: float = 0.4, with_data: bool = True, cache_dir: Path | None = None,
             device: str = "cuda") -> Estimate:
    """Everything `ift estimate` prints, from the recipe alone."""
    info = load_model_info(recipe.model, recipe.adapter)
    data, error = None, None
    if with_data:
        try:
            data = count_tokens(recipe, info.arch.kind, cache_dir)
        except IftError as err:
            error = err.line()
    setup = setup_from_recipe(recipe, info, seq_len=data.max_tokens if data else None,
                              loss_tokens=data.max_loss_tokens if data else None, gpus=gpus, device=device)
    mem = memory(info, setup)
    methods = {}
    base_dtype = model_weight_dtype(recipe.model, "lora", info.config_dtype)
    for method in ("none", "lora", "qlora"):
        alt = replace(setup, method=method, weight_dtype="float32" if method == "qlora" else base_dtype)
        methods[method] = {"no_checkpointing": memory(info, replace(alt, gradient_checkpointing=False)).peak,
                           "checkpointing": memory(info, replace(alt, gradient_checkpointing=True)).peak}
    ok = fits(info, setup, gpu_memory) if gpu_memory else None
    advice = fit_advice(info, setup, gpu_memory) if gpu_memory and not ok else None
    t = recipe.training
    if data is not None and data.rows:
        batches = math.ceil(data.rows / (setup.batch_size * gpus))
        steps = math.ceil(batches / setup.grad_accum)
        total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps)
        fraction = total / steps  # epochs actually run
        mean = data.tokens / data.rows
        comp = compute(info, setup, data.tokens * fraction, data.loss_tokens * fraction, mean,
                       decoder_tokens=data.loss_tokens * fraction, peak_tflops=peak_tflops, mfu=mfu)
        train_tokens = (data.tokens + (data.loss_tokens if info.arch.kind == "seq2seq" else 0)) * fraction
        return Estimate(info, setup, mem, methods, gpu_memory, ok, advice, data, error, steps, total,
                        train_tokens, comp)
    # no data: one optimizer step at full length
    per_step = setup.batch_size * setup.grad_accum * gpus
    comp = compute(info, setup, per_step * setup.seq_len, per_step * setup.loss_tokens, setup.seq_len,
                   decoder_tokens=per_step * setup.loss_tokens, peak_tflops=peak_tflops, mfu=mfu, per="step")
    return Estimate(info, setup, mem, methods, gpu_memory, ok, advice, None, error, None, None, None, comp)


def to_dict(est: Estimate) -> dict[str, Any]:
    """The JSON form of an estimate (bytes, FLOPs and seconds as numbers)."""
    info, mem, pc = est.info, est.memory, est.info.params
    trainable = pc.total if est.setup.method == "none" else info.lora_params(est.setup.lora_r)
    out: dict[str, Any] = {
        "model": {"source": info.source, **asdict(info.arch)},
        "parameters": {"total": pc.total, "trainable": trainable, "method": est.setup.method,
                       "embedding": pc.embedding, "linear": pc.linear, "head": pc.head, "head_tied": pc.head_tied,
                       "lora": {"r": est.setup.lora_r, "targets": list(pc.lora_targets), "modules": pc.lora_modules,
                                "parameters": info.lora_params(est.setup.lora_r)}},
        "setup": asdict(est.setup),
        "memory": {**{k: v for k, v in asdict(mem).items()}, "peak": mem.peak,
                   "by_method": est.methods, "gpu_memory": est.budget,
                   "usable": int(USABLE_FRACTION * est.budget) if est.budget else None, "fits": est.fits,
                   "advice": None if est.advice is None else {
                       "changes": list(est.advice.changes), "overrides": list(est.advice.overrides),
                       "peak": est.advice.peak, "setup": asdict(est.advice.setup)}},
        "data": None if est.data is None else {**asdict(est.data), "steps_per_epoch": est.steps_per_epoch,
                                               "total_steps": est.total_steps, "train_tokens": est.train_tokens},
        "data_error": est.data_error,
        "compute": asdict(est.compute),
        "scale": scale(est),
    }
    return out


def scale(est: Estimate) -> dict[str, Any] | None:
    """Training tokens per parameter against Chinchilla's compute-optimal ~20 (for pretraining decisions)."""
    if not est.train_tokens:
        return None
    n = est.info.params.total
    return {"tokens_per_parameter": est.train_tokens / n, "chinchilla_tokens_per_parameter": CHINCHILLA_TOKENS_PER_PARAM,
            "chinchilla_optimal_tokens": CHINCHILLA_TOKENS_PER_PARAM * n}
