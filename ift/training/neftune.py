"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): uniform noise on the
input embeddings while training, none at evaluation (the hook reads the module's training flag).

transformers' own hook does the arithmetic (alpha / sqrt(length * hidden)), so a run equals a Trainer run with
`neftune_noise_alpha` set; ift attaches it to the input embedding of the model inside any peft wrapper.
"""

from __future__ import annotations

from torch import nn

from ift.training.loss import hf_model


def add_neftune(model: nn.Module, alpha: float):
    """Noise on `model`'s input embeddings in training mode; returns the hook's handle (`.remove()` undoes it)."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    embedding = hf_model(model).get_input_embeddings()
    embedding.neftune_noise_alpha = alpha
    return embedding.register_forward_hook(neftune_post_forward_hook)
