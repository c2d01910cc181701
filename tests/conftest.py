"""Shared fixtures: a tiny fast tokenizer and tiny Llama- and T5-shaped models, built offline in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CORPUS = [
    "Shares of the company rose after strong quarterly earnings.",
    "The bank reported a loss and its stock fell sharply.",
    "Revenue was flat compared with the previous year.",
    "Is the news positive, negative or neutral? positive negative neutral",
    "Summarize the conversation. The customer asked for a refund and the agent agreed.",
    "Headline: profits up. Sentiment: positive. Headline: profits down. Sentiment: negative.",
    "Question: what is the answer? Answer: yes no maybe",
    "#Person1#: Hello, how can I help you? #Person2#: I lost my card.",
] * 4


def build_tiny_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def build_tiny_llama(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def build_tiny_t5(tokenizer, seed: int = 0):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
        num_heads=4, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5ForConditionalGeneration(config)


@pytest.fixture()
def tiny_llama(tiny_tokenizer):
    return build_tiny_llama(tiny_tokenizer)


@pytest.fixture()
def tiny_t5(tiny_tokenizer):
    return build_tiny_t5(tiny_tokenizer)
