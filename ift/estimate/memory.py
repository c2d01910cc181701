"""Memory per device: activations kept for backward, weights, gradients, optimizer states, 4-bit storage."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Iterable, NamedTuple

from ift.errors import IftError
from ift.estimate.model import DTYPE_BYTES, Architecture, ModelInfo, ParamCounts
from ift.estimate.plan import Setup

AUTOCAST_BYTES = {"bf16": 2, "fp16": 2}
USABLE_FRACTION = 0.9  # of a device's memory; the rest: CUDA context, kernel workspaces, allocator fragmentation
QUANT_BLOCK = 64  # bitsandbytes 4-bit: one absmax constant per 64 weights
NESTED_BLOCK = 256  # double quantization: absmax constants quantized to 8 bits in blocks of 256

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
    shared input itself if it already is fp32), and lora_B keeps r values. On the CPU the adapters of one
    input share one mask and one fp32 dropout output (autocast still casts it once per lora_A).
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
        masks = _lora_masks(targeted, setup)
        copies = targeted if autocast else masks  # autocast casts the dropped copy for each lora_A
        out += (masks * _lora_mask_bytes(setup) + copies * lora_in) * width
    elif autocast or p != 4:
        out += targeted * lora_in * width
    elif not shared_elsewhere:
        out += p * width
    return out


def _lora_mask_bytes(setup: Setup) -> int:
    return 1  # a boolean mask: torch's dropout on CUDA, ift's LoraDropout on the CPU (ift/modeling/compute.py)


def _lora_masks(targeted: int, setup: Setup) -> int:
    """Dropout masks for one input read by `targeted` adapters: on the CPU they share one dropped copy
    (ift/modeling/compute.py) when that input is float32 like the adapters; a half-precision input is cast for
    each adapter (peft), and on CUDA each draws its own."""
    shared = setup.device == "cpu" and _dtypes(setup).p == 4
    return min(targeted, 1) if shared else targeted


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
        out += _lora_masks(qkv, setup) * _lora_mask_bytes(setup) * arch.hidden
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
    elif setup.method == "lora" and c < p and setup.fsdp == 1:
        # LoRA under autocast: the frozen Linears (and an untied head) are held in the autocast dtype
        # (ift/modeling/compute.py frozen_linears_in); embeddings, norms and a tied head stay as loaded
        low = pc.linear + (0 if pc.head_tied else pc.head)
        weights = p * (pc.total - low) + c * low
    else:
        weights = p * pc.total
    trainable_bytes = p * pc.total if setup.method == "none" else 4 * adapter_n
    largest = p * pc.largest_tensor if setup.method == "none" else 4 * adapter_n
    adapter = 4 * adapter_n
    copies = 0
    if c != p:  # autocast casts every Linear weight (and the head) once per forward and keeps it for backward
        copies = c * (pc.head + (pc.linear if setup.method != "qlora" else 0) + adapter_n)
        if setup.method == "lora" and c < p and setup.fsdp == 1:  # already in c: only a tied head is cast
            copies = c * ((pc.head if pc.head_tied else 0) + adapter_n)
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
