"""Talking to a trained model: `ift chat` and `ift generate`, in the prompt format the run trained with.

- prompts: the run's prompt format (`PromptFormat`), and the prompt files `ift generate` reads.
- target: what to talk to (`resolve_target`: a run folder, a model folder, a .gguf file, a Hub id).
- chat: the interactive conversation, answers streamed as they are decoded.
- batch: answers for a file of prompts, written as JSON Lines.

Decoding is ift.evaluation.decoding's engine. May import ift.evaluation, ift.data, ift.modeling, ift.templates,
ift.recipe and the top-level helpers (ift.errors, ift.atomic).
"""
