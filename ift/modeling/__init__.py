"""Models and tokenizers: causal or seq2seq, pretrained (Hub, folder, GGUF) or from scratch, with LoRA / QLoRA.

`loading.load(recipe.model, recipe.adapter, ...)` returns a `Loaded` bundle (model, tokenizer, kind, source);
`final.load_final` loads a run's final weights back. Mistakes are `IftError`s naming the recipe key.

- kind: causal or seq2seq from a config, and the Auto class for each kind
- load_errors: Hugging Face Hub and transformers loading failures translated into one IftError
- model_source: where base weights load from (resolve_model_path), the base's Hub id; GGUF files located, converted once and cached
- tokenizer: the recipe's tokenizer with a pad token, or a BPE trained for init: scratch
- config: pretrained and scratch configs, and the dtype weights load in
- adapters: LoRA targets and configs, peft calls, 4-bit checks, parameter counts
- compute: LoRA's CPU dropout (LoraDropout) and frozen Linears held in the autocast dtype
- attention: the attention kernel a training run uses (auto: eager for short CPU bf16 runs), for train and estimate
- loading: `Loaded`, `load` (model + tokenizer as the recipe says, adapters attached) and its one-line description
- final: a run's final/ folder (full model or adapter on its base), for evaluation and export

May import: ift.atomic, ift.errors, ift.recipe, ift.data (encoding's Kind).
"""
