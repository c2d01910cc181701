"""Publishing: what leaves the run folder for the Hub, llama.cpp and Ollama.

- card.py: the model card, every figure read from the run's own files (metrics, data report, recipe).
- dataset_card.py: the card of a prepared dataset pushed with `ift push --data`.
- hub.py: upload of a run (adapter or merged), of checkpoints during training and of prepared datasets.
- merge.py: the adapter folded into its base (`ift merge`), with its card.
- gguf.py: GGUF writing (tensors, vocabulary, pre-tokenizer, stop tokens) for llama.cpp.
- modelfile.py: the Ollama Modelfile (the chat template in Go template form).
- export.py: `ift export`: merged model -> GGUF + Modelfile, read back and compared with transformers.

May import every earlier stage (templates, data, modeling, evaluation, inference, training); never ift.train or ift.cli.
"""
