"""Evaluation: accuracy (rank classification, exact match), ROUGE and their breakdowns, for training and `ift eval`;
and the decoding engine that evaluation, `ift chat` and `ift generate` share.

- evaluate: `evaluate` over a split's rows (sharded across processes), predictions, per-source / per-template summary.
- scoring: rank classification, the log-likelihood of every answer choice given its prompt.
- decoding: the one decoding engine, greedy generation for evaluation and sampled / streamed decoding.
- forward: the forward passes scoring and decoding share (peft unwrapping, inference mode, padding, length batches, KV cache, the shared prefill).
- classification: macro-F1, balanced accuracy, per-class figures and the confusion matrix of ranked choices.
- modules: `evaluate` modules named in evaluation.metrics, loaded once, computed on the generated answers.
- text_metrics: normalised exact match, ROUGE (rouge_score) and sentence splitting.
- tool_calls: replies read back into reasoning, answer and tool calls; call exact match and argument F1.
- benchmarks: lm-evaluation-harness tasks on the base and the fine-tuned model (evaluation.benchmarks).
- compare: the base-vs-fine-tuned table of a run.

May import ift.data, ift.modeling, ift.templates and the top-level modules (ift.errors, ift.atomic, ift.metrics, the
registry of every figure ift reports, ift.recipe, ift.run); never ift.inference.
"""
