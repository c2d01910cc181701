"""The model, from its config only: architecture sizes and exact parameter counts on a meta-device build."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

from ift.errors import IftError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Activations written as Python arithmetic keep several intermediates each (counted from their code):
# gelu_new = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) keeps x, 0.5·x, tanh(...) and 1 + tanh(...).
ACT_SAVED = {"gelu_new": 4, "gelu_fast": 7, "quick_gelu": 2}  # measured with saved-tensor hooks


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


def _config_dtype_name(config: Any) -> str | None:
    """The checkpoint's dtype as ift.modeling reads it, by name; None unless one of DTYPE_BYTES."""
    from ift.modeling.config import checkpoint_dtype

    dtype = checkpoint_dtype(config)
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
                     _config_dtype_name(config))


def load_model_info(model_cfg: Any, adapter_cfg: Any) -> ModelInfo:
    """The recipe's model: config only (no weights), then `model_info`."""
    from ift.modeling.adapters import lora_target_modules
    from ift.modeling.kind import model_kind

    config, source = _load_config(model_cfg)
    kind = model_kind(config, model_cfg.kind)
    return model_info(config, adapter_cfg, kind, source=source, auto_targets=lora_target_modules,
                      trust_remote_code=model_cfg.trust_remote_code)


def _load_config(model_cfg: Any) -> tuple[Any, str]:
    """The transformers config as ift.modeling builds the model: for init: scratch the inline or named
    config with the tokenizer's vocabulary, else the model's own (a local folder, config.json from the Hub,
    or the cached conversion of a GGUF file)."""
    from ift.modeling.config import pretrained_config, scratch_base_config
    from ift.modeling.model_source import resolve_model_path
    from ift.modeling.tokenizer import load_tokenizer

    if model_cfg.init == "scratch":
        config = scratch_base_config(model_cfg)
        if model_cfg.tokenizer or model_cfg.name_or_path:
            config.vocab_size = len(load_tokenizer(model_cfg))
        else:  # ift trains a BPE tokenizer of this size on the training text
            config.vocab_size = model_cfg.vocab_size
        return config, f"scratch:{config.model_type}"
    path = str(resolve_model_path(model_cfg))
    config = pretrained_config(model_cfg, path)  # Hub errors explained as ift.modeling explains them
    return config, model_cfg.gguf_file or model_cfg.name_or_path or path
