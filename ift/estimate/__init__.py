"""`ift estimate`: memory, compute and data figures for a recipe before any weight is downloaded.

Parameters are counted exactly on a model built on the meta device from the config alone. Memory per
device adds up what PyTorch holds during a step of our loop (ift/train.py): weights, gradients, AdamW
states, the low-precision weight copies autocast keeps, and the activations saved for backward, counted
tensor by tensor for transformers' blocks in eager PyTorch (`block_activation_bytes`; derivation and
calibration in docs/estimate.md). Compute follows 6·N·D (Kaplan et al. 2020) plus the attention term;
data comes from the real tokenized training split.

- model: architecture sizes and exact parameter counts from the config (ModelInfo)
- plan: the training setup being estimated (Setup), read from the recipe
- memory: activations and memory per device, 4-bit storage, memory sizes parsed and printed
- advice: the cheapest change that makes a setup fit the device's memory
- compute: training FLOPs and time
- tokens: token counts of the tokenized training split, cached
- report: the whole estimate (Estimate, estimate), its JSON form and the Chinchilla scale

May import: ift.atomic, ift.errors, ift.modeling, ift.data, ift.templates.
"""
