"""Training pieces that the loop in ift/train.py composes.

- loss.py: completion-only cross-entropy (the head applied to loss positions only), summed / counted tokens.
- checkpoints.py: the loop's Progress, saving/finding/verifying/loading checkpoints, the final weights.
- allocator.py: glibc's mmap threshold fixed on CPU runs, so freed activations return to the OS.
- plots.py: loss and metric curves of a run (metrics.jsonl -> PNG).
- liger.py: model.liger: Liger's fused kernels on the model and its fused linear cross-entropy in the loss.
- trackers.py: Accelerate's trackers the recipe names, with the run's name and tags in each one's terms.

May import recipe, run, data (ignore index, collation) and the metrics registry; never ift.train, ift.publish or ift.cli.
"""
