"""Training compute: FLOPs (6·N·D plus attention, frozen-base and checkpointing terms) and time."""

from __future__ import annotations

from dataclasses import dataclass

from ift.estimate.model import ModelInfo
from ift.estimate.plan import Setup


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
