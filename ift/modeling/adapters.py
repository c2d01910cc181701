"""LoRA / QLoRA: target modules, peft configs and calls, 4-bit checks, and trainable-parameter counts."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import sys
import warnings
from typing import Iterator, Sequence

import torch
from torch import nn

from ift.data.encoding import Kind
from ift.errors import IftError
from ift.recipe import AdapterConfig, ModelConfig

MIN_BITSANDBYTES = (0, 45)

# LoRA "auto" targets: the attention and MLP projections of common architectures (leaf module names).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "q", "k", "v", "o",
                         "query_key_value", "c_attn", "Wqkv", "out_proj", "dense")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "wi", "wi_0", "wi_1", "wo",
                   "fc1", "fc2", "c_fc", "c_proj", "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3")
HEAD_NAMES = {"lm_head", "embed_out", "output", "score", "classifier"}


@contextlib.contextmanager
def peft_calls(four_bit: bool) -> Iterator[None]:
    """Around ift's calls into peft: quiet about what only peft itself does.

    - peft reads the deprecated `is_gradient_checkpointing` in PeftModel.__init__ (peft 0.21,
      peft/peft_model.py), a FutureWarning ift cannot avoid: filtered here.
    - Without 4-bit layers, bitsandbytes stays out: peft imports it whenever it is installed (peft/helpers.py
      on `import peft`, the LoRA layer dispatch in peft/tuners/lora/model.py), loading its native library
      and logging kernel warnings in runs that use none of it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        if four_bit or "bitsandbytes" in sys.modules:
            yield
            return
        sys.modules["bitsandbytes"] = None  # `import` raises ImportError, find_spec says "not installed"
        try:
            yield
        finally:
            if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
                del sys.modules["bitsandbytes"]
            _forget_bitsandbytes_checks()


def _forget_bitsandbytes_checks() -> None:
    """Clear the cached "is bitsandbytes available" answers given while it was hidden, so QLoRA later finds it."""
    for name in ("peft.import_utils", "transformers.utils.import_utils", "accelerate.utils.imports"):
        module = sys.modules.get(name)
        for attr in dir(module) if module is not None else ():
            check = getattr(module, attr)
            if ("bnb" in attr or "bitsandbytes" in attr) and hasattr(check, "cache_clear"):
                check.cache_clear()


def _trainable_tokens(net: nn.Module, ids: Sequence[int]) -> list[int] | dict[str, list[int]] | None:
    """peft's trainable_token_indices for the new tokens: the input embedding's rows, and the output head's
    too when it is a separate matrix (a tied head shares the rows, and peft keeps the tie)."""
    if not ids:
        return None
    ids = sorted(set(int(i) for i in ids))
    out_emb = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    in_emb = net.get_input_embeddings()
    if out_emb is None or out_emb.weight is in_emb.weight:
        return ids
    names = {id(m): n for n, m in net.named_modules()}
    return {names[id(in_emb)]: ids, names[id(out_emb)]: ids}


def lora_config(adapter: AdapterConfig, kind: Kind, net: nn.Module, new_tokens: Sequence[int] = ()):
    from peft import LoraConfig, TaskType

    if adapter.target_modules == "auto":
        targets: list[str] | str = lora_target_modules(net)
    elif adapter.target_modules == "all-linear":
        targets = "all-linear"
    else:
        targets = list(adapter.target_modules)
        _check_targets(net, targets)
    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, target_modules=targets,
                      bias=adapter.bias, trainable_token_indices=_trainable_tokens(net, new_tokens),
                      task_type=TaskType.CAUSAL_LM if kind == "causal" else TaskType.SEQ_2_SEQ_LM)


def _check_targets(net: nn.Module, targets: list[str]) -> None:
    names = [name for name, _ in net.named_modules()]
    linear = _linear_leaf_names(net, exclude_heads=False)
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            close = difflib.get_close_matches(target, linear, n=1)
            raise IftError(f"no module named '{target}' in this model", "adapter.target_modules",
                           (f"did you mean '{close[0]}'? " if close else "") + f"linear layers here: {', '.join(linear)}")


# ---------------------------------------------------------------------------------------------- LoRA


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))  # bitsandbytes' Linear4bit/8bitLt subclass nn.Linear


def _linear_leaf_names(net: nn.Module, exclude_heads: bool = True) -> list[str]:
    """Leaf names of linear layers in model order, without the LM head / output embeddings."""
    get_output = getattr(net, "get_output_embeddings", None)
    try:
        head = get_output() if callable(get_output) else None
    except (NotImplementedError, AttributeError):
        head = None
    out: list[str] = []
    for name, module in net.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not name or not _is_linear(module) or leaf in out:
            continue
        if exclude_heads and (module is head or leaf in HEAD_NAMES):
            continue
        out.append(leaf)
    return out


def lora_target_modules(model: nn.Module) -> list[str]:
    """LoRA `auto` targets: the architecture's attention and MLP projections; else every linear but the head."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    present = _linear_leaf_names(model)
    known = set(ATTENTION_PROJECTIONS) | set(MLP_PROJECTIONS)
    targets = [name for name in present if name in known]
    if targets:
        return targets
    if not present:
        raise IftError("no linear layers to put LoRA adapters on", "adapter.target_modules",
                       "use adapter.method: none (full fine-tuning) for this model")
    return present


def check_4bit(model: ModelConfig) -> None:
    """A clear error before loading when 4-bit QLoRA cannot run here."""
    if model.init == "scratch":
        raise IftError("QLoRA quantizes pretrained weights; a scratch model has none worth freezing",
                       "adapter.method", "use adapter.method: none (full training) for init: scratch")
    try:
        bnb = importlib.import_module("bitsandbytes")
    except Exception as exc:  # missing, or a broken native library
        raise IftError(f"QLoRA needs bitsandbytes, which cannot be imported ({type(exc).__name__})", "adapter.method",
                       "pip install 'ift[qlora]' (bitsandbytes >= 0.45), or use adapter.method: lora") from None
    version = tuple(int(p) for p in bnb.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_BITSANDBYTES:
        raise IftError(f"bitsandbytes {bnb.__version__} is too old for 4-bit on this machine", "adapter.method",
                       "pip install -U 'bitsandbytes>=0.45', or use adapter.method: lora")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:  # the real kernels, on a tiny tensor: the version alone does not say the backend works here
        import bitsandbytes.functional as F

        probe = torch.randn(64, 64, device=device)
        packed, state = F.quantize_4bit(probe, quant_type="nf4")
        F.dequantize_4bit(packed, state)
    except Exception as exc:
        raise IftError(f"4-bit quantization does not run on this {device} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})", "adapter.method",
                       "use adapter.method: lora (full-precision base), or a machine bitsandbytes supports") from None


def keep_4bit_differentiable(net: nn.Module) -> None:
    """Stop bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, a Linear4bit run in eval mode under no_grad repacks its weight in place for
    a gemv kernel that has no backward; every later training step then sends no gradient through that
    layer, so LoRA adapters below it silently stop learning (seen with bitsandbytes 0.50). Training
    loops evaluate between steps, so the differentiable path is kept everywhere.
    """
    for module in net.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# ------------------------------------------------------------------------------------------ reporting


def _logical_numel(param: torch.Tensor) -> int:
    if param.__class__.__name__ == "Params4bit":
        state = getattr(param, "quant_state", None)
        if state is not None and getattr(state, "shape", None) is not None:
            return int(torch.Size(state.shape).numel())
        return param.numel() * 2  # two 4-bit values per stored byte
    return param.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable), counting 4-bit weights by their logical (unpacked) size."""
    # Not peft's PeftModel.get_nb_trainable_parameters (peft 0.21): it counts a 4-bit weight as its stored
    # bytes x 2, one more than the real size when that is odd (a 33x35 Linear4bit: 1156, not 1155).
    total = trainable = 0
    for param in model.parameters():
        n = _logical_numel(param)
        total += n
        trainable += n if param.requires_grad else 0
    return total, trainable
