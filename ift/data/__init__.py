"""The data stage: the recipe's data section -> train/validation/test splits of prompt/completion pairs (or
conversations) -> token ids and loss labels -> batches. `prepare.build_splits` runs the stages below in order.

- prepare: PreparedData, build_splits (load, carve, render, leak-check, mix) and check_sources (`ift validate`)
- cache: identity of prepared data: code version, fingerprints, stable hashes, source names, cache files
- reading: reading data files, and a file that cannot be read diagnosed as one line naming it
- sources: loading local and Hub sources into their own splits; label names; their values and formats checked
- data_map: local copies standing in for Hub datasets (`data.data_map`), applied before anything loads
- splits: keeping a source's own splits, carving missing ones from train; the leak check
- rendering: templates, conversations or raw text -> prepared rows
- mixture: the training mixture across sources
- tokenization: prepared rows -> token ids and loss labels; the token report
- reports: split summaries, label and conversation stats, `ift data stats` and previews
- formats: the conversational formats (messages, ShareGPT, prompt/completion, Alpaca) -> one message list
- chat_templates: the recipe's chat template set on a tokenizer, its special and end-of-turn tokens
- conversations: a conversation -> token ids with loss on assistant turns (masks from character spans)
- encoding: how a prompt/completion pair becomes token ids (shared with evaluation)
- collate: padding, padding-free packing, seeded (length-grouped) samplers and dataloaders

Besides the top-level ift.errors, ift.atomic and ift.recipe, this folder may import ift.templates only.
"""
