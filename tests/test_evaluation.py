"""ift.evaluation.evaluate and `ift eval`: rank scoring, generation, exact match, ROUGE, metrics files, CLI errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import build_tiny_llama, build_tiny_tokenizer
import ift.evaluation.compare as compare
import ift.evaluation.decoding as decoding
import ift.evaluation.evaluate as ev
import ift.evaluation.forward as forward
import ift.evaluation.scoring as scoring
import ift.evaluation.text_metrics as text_metrics
from ift.data.encoding import common_prefix, encode_pairs
from ift.errors import IftError
from ift.recipe import EvaluationConfig
from ift.run import RunDir

PROMPTS = [
    "Headline: profits up. Sentiment:",
    "The bank reported a loss and its stock fell sharply. Is the news positive, negative or neutral?",
    "Question: what is the answer? Answer:",
    "Revenue was flat.",
    "Shares rose",
    "Summarize the conversation.",
    "#Person1#: Hello, how can I help you?",
]
# different numbers of choices per row, single- and multi-token choices
CHOICES = [
    ["positive", "negative"],
    ["positive", "negative", "neutral"],
    ["yes", "no", "maybe", "yes no maybe"],
    ["flat"],
    ["up", "down", "sideways a lot"],
    ["The customer asked for a refund", "no"],
    ["Hi there friend", "x", "I lost my card"],
]


# The same prompts behind a long shared instruction: the batch's common prefix runs once.
HEAD = "Question: what is the answer? Is the news positive, negative or neutral? Answer: yes no maybe. " * 2
SHARED = [HEAD + p for p in PROMPTS]
PROMPT_SETS = {"plain": PROMPTS, "shared_prefix": SHARED}


def naive_scores(model, tokenizer, kind, prompts=PROMPTS):
    """One forward pass per (prompt, choice), full log-softmax: the reference the fast path must equal."""
    out = []
    with torch.no_grad():
        for prompt, choices in zip(prompts, CHOICES):
            row = []
            for choice in choices:
                p, c = encode_pairs(tokenizer, kind, [prompt], [choice], add_eos=False)[0]
                if kind == "causal":
                    logp = model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
                    row.append(sum(float(logp[len(p) - 1 + t, c[t]]) for t in range(len(c))))
                else:
                    dec = torch.tensor([[model.config.decoder_start_token_id] + c[:-1]])
                    logp = model(input_ids=torch.tensor([p]), decoder_input_ids=dec).logits[0].log_softmax(-1)
                    row.append(sum(float(logp[t, c[t]]) for t in range(len(c))))
            out.append(row)
    return out


# ---------------------------------------------------------------- rank scoring


@pytest.mark.parametrize("kind, prompt_set", [("causal", "plain"), ("causal", "shared_prefix"),
                                               ("seq2seq", "plain")])
def test_scores_equal_naive_loop_at_any_batch_size(kind, prompt_set, tiny_tokenizer, tiny_llama, tiny_t5):
    model = (tiny_llama if kind == "causal" else tiny_t5).eval()
    prompts = PROMPT_SETS[prompt_set]
    if prompt_set == "shared_prefix":  # the shared-prefix path really runs
        ids = decoding._encode_prompts(tiny_tokenizer, kind, prompts, False)
        assert common_prefix(ids) >= forward.MIN_SHARED_PREFIX
    reference = naive_scores(model, tiny_tokenizer, kind, prompts)
    for batch_size in (1, 2, 7):
        scores = scoring.score_choices(model, tiny_tokenizer, kind, prompts, CHOICES, batch_size=batch_size)
        assert [len(r) for r in scores] == [len(c) for c in CHOICES]
        for row, ref, choices in zip(scores, reference, CHOICES):
            for (total, mean), expected, choice in zip(row, ref, choices):
                assert total == pytest.approx(expected, abs=1e-5), (batch_size, choice)
                n = len(encode_pairs(tiny_tokenizer, kind, ["x"], [choice], add_eos=False)[0][1])
                assert mean == pytest.approx(total / n, abs=1e-9)


def _tiny_mistral(tokenizer, window: int):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(4)
    return MistralForCausalLM(MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=window,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


SLIDING_PREFILL = ("the shared-prefix prefill (forward.shared_prefill) pads between the cached prefix and each prompt's "
                   "own tokens, and a sliding window counts that padding as distance")
CASES = [(case, path, prompt_set) for case, path in [
    ("llama_sdpa", "packed"), ("llama_eager", "packed"), ("llama_packing_off", "continued"),
    ("mistral_window_8", "continued"), ("mistral_window_256", "packed"), ("t5", "seq2seq")]
    for prompt_set in ("plain", "shared_prefix")]


@pytest.mark.parametrize("case, path, prompt_set", [
    pytest.param(*c, marks=pytest.mark.xfail(strict=True, reason=SLIDING_PREFILL))
    if c[0] == "mistral_window_8" and c[2] == "shared_prefix" else c for c in CASES])
def test_every_scoring_path_equals_one_forward_pass_per_choice(case, path, prompt_set, tiny_tokenizer, tiny_t5,
                                                               monkeypatch):
    """Each choice's log-likelihood from the packed pass (all choices of a prompt in one row, each seeing only the
    prompt), from the KV-cache continuation it falls back to, and from seq2seq scoring equals a plain forward pass
    of prompt + choice: choices of 1 to 5 tokens, rows padded to different lengths, with and without a shared prefix."""
    kind = "seq2seq" if case == "t5" else "causal"
    if case.startswith("llama"):
        model = build_tiny_llama(tiny_tokenizer, seed=3)
        model.set_attn_implementation("eager" if case == "llama_eager" else "sdpa")
    elif case.startswith("mistral"):
        model = _tiny_mistral(tiny_tokenizer, int(case.rsplit("_", 1)[1]))
    else:
        model = tiny_t5
    model.eval()
    if case == "llama_packing_off":
        monkeypatch.setattr(scoring, "packable", lambda model, length: False)
    taken = []
    for name in ("_score_packed", "_score_continued", "_score_seq2seq"):
        real = getattr(scoring, name)
        monkeypatch.setattr(scoring, name, lambda *a, _real=real, _name=name, **k: taken.append(_name) or _real(*a, **k))
    prompts = PROMPT_SETS[prompt_set]
    lengths = {len(c) for _, cs in scoring._encode_choices(tiny_tokenizer, kind, prompts, CHOICES, False) for c in cs}
    assert {1, 2, 3} <= lengths and max(lengths) >= 5  # single- and multi-token choices of several lengths
    reference = naive_scores(model, tiny_tokenizer, kind, prompts)
    scores = scoring.score_choices(model, tiny_tokenizer, kind, prompts, CHOICES, batch_size=3)
    assert taken and set(taken) == {f"_score_{path}"}
    for row, ref in zip(scores, reference):
        assert [total for total, _ in row] == pytest.approx(ref, abs=1e-5)


def test_peft_wrapped_model_scores_and_training_mode_restored(tiny_tokenizer, tiny_llama):
    from peft import LoraConfig, get_peft_model

    plain = scoring.score_choices(tiny_llama, tiny_tokenizer, "causal", PROMPTS[:3], CHOICES[:3])
    plain_text = decoding.generate(tiny_llama, tiny_tokenizer, "causal", PROMPTS[:3], max_new_tokens=4)
    model = get_peft_model(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.1))
    model.train()
    wrapped = scoring.score_choices(model, tiny_tokenizer, "causal", PROMPTS[:3], CHOICES[:3], batch_size=2)
    # LoRA starts as a no-op (B = 0) and dropout is off in eval mode: the same scores
    for a, b in zip(plain, wrapped):
        assert [s for s, _ in a] == pytest.approx([s for s, _ in b], abs=1e-5)
    assert decoding.generate(model, tiny_tokenizer, "causal", PROMPTS[:3], max_new_tokens=4) == plain_text
    assert model.training and all(m.training for m in model.modules())


# A bigram language model built by hand: the log-probabilities of every choice are known exactly.
BIGRAM_WORDS = ["<pad>", "</s>", "<unk>", "q", "a", "b", "c", "d", "e", "f", "g", "h"]


def bigram_model(next_probs: dict[str, dict[str, float]]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(BIGRAM_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    v = len(vocab)
    config = LlamaConfig(vocab_size=v, hidden_size=v, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-12,
                         pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    table = torch.full((v, v), math.log(1e-9))  # table[next, prev] = log p(next | prev)
    for prev, dist in next_probs.items():
        rest = (1.0 - sum(dist.values())) / (v - len(dist))
        table[:, vocab[prev]] = math.log(rest)
        for nxt, p in dist.items():
            table[vocab[nxt], vocab[prev]] = math.log(p)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(v))  # one-hot states
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()  # the layer adds nothing: logits depend on the last token only
        layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)  # RMSNorm of a one-hot vector = sqrt(v) * one-hot
        model.lm_head.weight.copy_(table / math.sqrt(v))
    return model, tokenizer


def test_length_normalisation_changes_the_pick_on_a_constructed_case():
    # after "q": "a" has p=0.3; "b" has 0.2, then "c" and "d" follow almost surely
    model, tok = bigram_model({"q": {"a": 0.3, "b": 0.2, "e": 0.1}, "b": {"c": 0.99}, "c": {"d": 0.99}})
    (short, long), = scoring.score_choices(model, tok, "causal", ["q"], [["a", "b c d"]])
    assert short[0] == pytest.approx(math.log(0.3), abs=1e-4)
    assert long[0] == pytest.approx(math.log(0.2) + 2 * math.log(0.99), abs=1e-4)
    assert long[1] == pytest.approx(long[0] / 3, abs=1e-6)
    rows = [{"prompt": "q", "completion": "b c d", "choices": ["a", "b c d"], "source": "s", "template": "t"}]
    metrics, preds = ev.evaluate(model, tok, "causal", rows, EvaluationConfig(metrics=["accuracy"]))
    # the summed score prefers the short choice, the per-token mean the long one
    assert (metrics["accuracy"], metrics["accuracy_norm"]) == (0.0, 1.0)
    assert preds[0]["prediction"] == "a" and preds[0]["correct"] is False and preds[0]["correct_norm"] is True


def test_chat_template_choices_are_scored_without_the_turn_closing_tokens(tiny_tokenizer):
    tok = build_tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    encoded = scoring._encode_choices(tok, "causal", ["Revenue was flat."], [["positive", "no"]], chat_template=True)
    (prompt_ids, choice_ids), = encoded
    assert tok.decode(prompt_ids).endswith("<assistant>")
    assert [tok.decode(c) for c in choice_ids] == ["positive", "no"]


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("prompt_set", ["plain", "shared_prefix"])
def test_batched_generation_equals_one_by_one_and_transformers_generate(prompt_set, tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer, seed=3)
    with torch.no_grad():  # larger weights: distinct logits, so greedy ties cannot hide a padding bug
        for p in model.parameters():
            p.mul_(20.0) if p.dim() > 1 else None
    prompts = PROMPT_SETS[prompt_set]
    batched = decoding.generate(model, tiny_tokenizer, "causal", prompts, max_new_tokens=10, batch_size=7)
    single = [decoding.generate(model, tiny_tokenizer, "causal", [p], max_new_tokens=10, batch_size=1)[0]
              for p in prompts]
    assert batched == single
    assert len(set(batched)) > 1
    # the greedy loop decodes what transformers' generate decodes
    for prompt, text in zip(prompts[:3], batched):
        ids = torch.tensor([decoding._encode_prompts(tiny_tokenizer, "causal", [prompt], False)[0]])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                             eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
        assert tiny_tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True).strip() == text


def test_seq2seq_generation_batched_equals_one_by_one(tiny_tokenizer, tiny_t5):
    batched = decoding.generate(tiny_t5, tiny_tokenizer, "seq2seq", PROMPTS[:4], max_new_tokens=6, batch_size=4)
    single = [decoding.generate(tiny_t5, tiny_tokenizer, "seq2seq", [p], max_new_tokens=6)[0] for p in PROMPTS[:4]]
    assert batched == single


TRAIN_PAIRS = [
    ("Headline: profits up. Sentiment:", "positive"),
    ("Shares of the company rose after strong quarterly earnings. Sentiment:", "positive"),
    ("The bank reported a loss and its stock fell sharply. Sentiment:", "negative"),
    ("Headline: profits down. Sentiment:", "negative"),
]


@pytest.fixture(scope="module")
def trained():
    """A tiny model fine-tuned on pad == eos data (the classic 'never stops' setup), with its tokenizer."""
    tok = build_tiny_tokenizer()
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    model = build_tiny_llama(tok, seed=1)
    pairs = encode_pairs(tok, "causal", [p for p, _ in TRAIN_PAIRS], [c for _, c in TRAIN_PAIRS], add_eos=True)
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), tok.pad_token_id)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p): len(p) + len(c)] = torch.tensor(c)  # the EOS carries loss even though pad == eos
        mask[i, : len(p) + len(c)] = 1
    torch.manual_seed(0)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    assert loss.item() < 0.05
    return model, tok


def test_fine_tuned_generations_end_with_eos(trained):
    model, tok = trained
    prompts = [p for p, _ in TRAIN_PAIRS]
    ids = decoding._generate_ids(model, tok, "causal", prompts, max_new_tokens=24, batch_size=4, chat_template=False)
    for row in ids:
        assert row[-1] == tok.eos_token_id and len(row) < 24
    texts = decoding.generate(model, tok, "causal", prompts, max_new_tokens=24, batch_size=4)
    assert texts == [c for _, c in TRAIN_PAIRS]
    assert model.training  # restored


def test_rank_accuracy_on_known_answers_and_breakdowns(trained):
    model, tok = trained
    rows = [{"prompt": p, "completion": c, "choices": ["neutral", "negative", "positive"],
             "source": "news" if i % 2 else "headlines", "template": "sentiment"}
            for i, (p, c) in enumerate(TRAIN_PAIRS)]
    rows.append({"prompt": TRAIN_PAIRS[0][0], "completion": "positive", "choices": [], "source": "news",
                 "template": "free"})
    cfg = EvaluationConfig(metrics=["loss", "accuracy", "rouge"], max_new_tokens=8)
    metrics, preds = ev.evaluate(model, tok, "causal", rows, cfg, batch_size=2, desc="test")
    assert metrics["accuracy"] == 1.0 and metrics["accuracy_norm"] == 1.0 and metrics["n"] == 5
    assert metrics["rouge1"] == pytest.approx(1.0)  # the generated row only
    assert set(metrics["by_source"]) == {"news", "headlines"}
    # one-word target: ROUGE-2 has no bigram to match
    # a free-form row is scored by ROUGE only when ROUGE is asked for (no exact match in auto mode)
    assert metrics["by_template"]["free"] == {"rouge1": 1.0, "rouge2": 0.0, "rougeL": 1.0,
                                              "rougeLsum": 1.0, "n": 1}
    assert metrics["by_template"]["sentiment"]["n"] == 4 and "rouge1" not in metrics["by_template"]["sentiment"]
    assert [p["mode"] for p in preds] == ["rank"] * 4 + ["generate"]
    assert metrics["macro_f1"] == 1.0 and metrics["balanced_accuracy"] == 1.0
    assert metrics["confusion_matrix"]["labels"] == ["neutral", "negative", "positive"]
    assert [p["gold_index"] for p in preds[:4]] == [["neutral", "negative", "positive"].index(c) for _, c in TRAIN_PAIRS]
    first = preds[0]
    assert first["prediction"] == "positive" and first["correct"] is True and first["target"] == "positive"
    assert [s["choice"] for s in first["choice_scores"]] == ["neutral", "negative", "positive"]
    assert max(first["choice_scores"], key=lambda s: s["sum"])["choice"] == "positive"
    # generate mode: exact match on greedy output, for rows with choices too
    gen_cfg = EvaluationConfig(metrics=["accuracy"], accuracy_mode="generate", max_new_tokens=8)
    from datasets import Dataset  # rows as ift.data.prepare.build_splits returns them

    metrics, preds = ev.evaluate(model, tok, "causal", Dataset.from_list(rows[:4]), gen_cfg, limit=3)
    assert metrics == {**metrics, "accuracy": 1.0, "n": 3} and "accuracy_norm" not in metrics
    assert all(p["mode"] == "generate" and p["choice_scores"] is None for p in preds)


def test_evaluate_rejects_bad_rows_and_settings(tiny_tokenizer, tiny_llama):
    cfg = EvaluationConfig(metrics=["accuracy"])
    row = {"prompt": "Revenue was flat.", "completion": "flat", "choices": ["up", "down"], "source": "s",
           "template": "t"}
    with pytest.raises(IftError, match="not one of the answer choices"):
        ev.evaluate(tiny_llama, tiny_tokenizer, "causal", [row], cfg)
    with pytest.raises(IftError, match="prompt has no tokens"):
        ev.evaluate(tiny_llama, tiny_tokenizer, "causal", [{**row, "prompt": "", "completion": "up"}], cfg)
    with pytest.raises(IftError, match="split is empty"):
        ev.evaluate(tiny_llama, tiny_tokenizer, "causal", [], cfg)
    with pytest.raises(IftError, match="has a target"):
        ev.evaluate(tiny_llama, tiny_tokenizer, "causal", [{**row, "completion": ""}], cfg)
    with pytest.raises(IftError, match="cannot load the evaluate module 'ift-no-such-metric'"):
        ev.evaluate(tiny_llama, tiny_tokenizer, "causal", [row], EvaluationConfig(metrics=["ift-no-such-metric"]))
    with pytest.raises(IftError, match="cannot generate"):
        ev.evaluate(tiny_llama.model, tiny_tokenizer, "causal", [{**row, "choices": []}], cfg)


def test_several_processes_each_score_their_share_and_gather(monkeypatch, tiny_tokenizer, tiny_llama):
    import accelerate.utils

    rows = [{"prompt": p, "completion": cs[0], "choices": cs, "source": "s", "template": "t"}
            for p, cs in zip(PROMPTS, CHOICES)]
    cfg = EvaluationConfig(metrics=["accuracy"])
    metrics, full = ev.evaluate(tiny_llama, tiny_tokenizer, "causal", rows, cfg)
    for index in (0, 1):
        lo, hi = ev.shard_range(len(rows), 2, index)

        def gather(local, lo=lo, hi=hi):
            # this process scored exactly its share (scores equal up to float noise of another batch shape)
            assert [p["prompt"] for p in local] == [p["prompt"] for p in full[lo:hi]]
            for mine, ref in zip(local, full[lo:hi]):
                assert [s["sum"] for s in mine["choice_scores"]] == pytest.approx(
                    [s["sum"] for s in ref["choice_scores"]], abs=1e-5)
            return full

        monkeypatch.setattr(accelerate.utils, "gather_object", gather)
        acc = SimpleNamespace(num_processes=2, process_index=index, is_main_process=index == 0,
                              unwrap_model=lambda m: m)
        assert ev.evaluate(tiny_llama, tiny_tokenizer, "causal", rows, cfg, accelerator=acc) == (metrics, full)


def test_shard_ranges_cover_rows_in_order():
    for n in (0, 1, 5, 8):
        spans = [ev.shard_range(n, 3, i) for i in range(3)]
        assert [i for lo, hi in spans for i in range(lo, hi)] == list(range(n))


# ---------------------------------------------------------------- text metrics


@pytest.mark.parametrize("prediction, reference, expected", [
    ("Positive", "positive", True),
    ("  positive.\n", "positive", True),
    ("\"Positive!\"", "positive", True),
    ("new   york\tcity", "New York City", True),
    ("U.S.", "u.s", True),
    ("not positive", "positive", False),
    ("positive negative", "positive", False),
    ("", "", True),
    ("", "positive", False),
    ("yes", ["no", "Yes."], True),
])
def test_exact_match_normalisation(prediction, reference, expected):
    assert text_metrics.exact_match([prediction], [reference]) == float(expected)


def test_exact_match_is_a_fraction_and_checks_lengths():
    assert text_metrics.exact_match(["a", "b", "c", "d"], ["a", "x", "C", "d."]) == 0.75
    with pytest.raises(IftError):
        text_metrics.exact_match(["a"], ["a", "b"])


def _rouge_score_means(predictions, references, use_stemmer=True):
    """rouge_score on the texts put one sentence per line, as the summarization scripts feed it."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(text_metrics.ROUGE_KEYS), use_stemmer=use_stemmer)
    totals = dict.fromkeys(text_metrics.ROUGE_KEYS, 0.0)
    lines = lambda text: "\n".join(text_metrics.split_sentences(text))  # noqa: E731
    predictions = [lines(p) for p in predictions]
    references = [lines(r) if isinstance(r, str) else [lines(x) for x in r] for r in references]
    for pred, ref in zip(predictions, references):
        scores = scorer.score_multi(ref, pred) if isinstance(ref, list) else scorer.score(ref, pred)
        for k in text_metrics.ROUGE_KEYS:
            totals[k] += scores[k].fmeasure
    return {k: v / len(predictions) for k, v in totals.items()}


def test_rouge_parity_small_case():
    preds = ["The cats were sitting on the mat.", "profits rose sharply", "", "a b c\nd e"]
    refs = ["the cat sat on the mat", "Profits fell.", "nothing", "a b\nc d e"]
    for stem in (True, False):
        expected = _rouge_score_means(preds, refs, stem)
        assert text_metrics.rouge(preds, refs, use_stemmer=stem) == pytest.approx(expected, abs=1e-12)
    assert text_metrics.rouge(["hello there"], ["hello there"]) == dict.fromkeys(text_metrics.ROUGE_KEYS, 1.0)
    multi = [["the cat sat", "a dog ran"], ["profits rose"]]
    assert text_metrics.rouge(preds[:2], multi) == pytest.approx(_rouge_score_means(preds[:2], multi), abs=1e-12)


@pytest.mark.parametrize("text", ["今天天气很好", "Цены на нефть выросли",
                                  "ارتفعت الأسعار", "कीमतें बढ़ीं",
                                  "株価が上がった"])
def test_rouge_scores_every_script(text):
    """An identical prediction scores 1 in any script (rouge_score's own tokenizer finds no token in these)."""
    assert text_metrics.rouge([text], [text]) == dict.fromkeys(text_metrics.ROUGE_KEYS, 1.0)


def test_rouge_keeps_words_with_umlauts_and_counts_chinese_by_character():
    # "Müller kam" vs "Müller ging": one word of two in common (rouge_score: "m ller" gives 2 of 3)
    assert text_metrics.rouge(["Müller kam"], ["Müller ging"])["rouge1"] == pytest.approx(0.5)
    # five characters of six in common: P = R = 5/6 over characters
    assert text_metrics.rouge(["今天天气不好"], ["今天天气很好"])["rouge1"] == pytest.approx(5 / 6)


def test_rouge_tokens_equal_rouge_scores_on_english(shared_data):
    """On English text the tokenizer is rouge_score's own: DialogSum's references and summaries, token by token."""
    from rouge_score import tokenizers

    rows = [json.loads(line) for line in (shared_data / "dialogsum" / "test.jsonl").read_text().splitlines()]
    texts = [r[k] for r in rows for k in ("summary1", "summary2", "summary3", "dialogue") if k in r]
    texts += ["Cafés don't open 24/7; e.g. U.S. stores_closed at 5:30pm."]
    for stem in (True, False):
        ours, theirs = text_metrics.ScriptTokenizer(stem), tokenizers.DefaultTokenizer(stem)
        for text in texts:
            ascii_text = text.encode("ascii", "ignore").decode()
            assert ours.tokenize(ascii_text) == theirs.tokenize(ascii_text), ascii_text


def test_rouge_lsum_scores_one_sentence_per_line():
    """rougeLsum is rouge_score's on newline-separated sentences (as the summarization scripts
    compute it), not rougeL again."""
    from rouge_score import rouge_scorer

    pred_sents = ["The cat sat on the mat.", "Mr. Smith came home at 5 p.m. on Monday!", "Did he eat?"]
    ref_sents = ["Mr. Smith came home on Monday.", "The cat sat on a mat.", "He ate?"]
    pred, ref = " ".join(pred_sents), " ".join(ref_sents)
    scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    expected = scorer.score("\n".join(ref_sents), "\n".join(pred_sents))
    got = text_metrics.rouge([pred], [ref])
    assert got["rougeLsum"] == pytest.approx(expected["rougeLsum"].fmeasure, abs=1e-12)
    assert got["rougeL"] == pytest.approx(expected["rougeL"].fmeasure, abs=1e-12)
    assert got["rougeLsum"] > got["rougeL"] + 0.1  # the sentences' order no longer counts
    assert scorer.score(ref, pred)["rougeLsum"].fmeasure == pytest.approx(got["rougeL"])  # what it was before
    assert text_metrics.split_sentences(pred) == pred_sents and text_metrics.split_sentences(ref) == ref_sents
    assert text_metrics.split_sentences("One.\nTwo (e.g. this). \u201cThree.\u201d Four") == [
        "One.", "Two (e.g. this).", "\u201cThree.\u201d", "Four"]


# Figures computed with ift's former ROUGE path: evaluate's rouge module (the copy ift vendored under
# ift/evaluation/metrics/rouge/, via evaluate.load) — its output, hard-coded so parity stays checked now that
# rouge_score's RougeScorer is called directly.
_PREDS = ["The cats were running quickly.", "A loss was reported"]
_REFS = ["the cat ran quickly", "The bank reported a loss."]
EVALUATE_ROUGE = [
    (_PREDS, _REFS, True,
     {"rouge1": [0.6666666666666665, 0.6666666666666665], "rouge2": [0.28571428571428575, 0.28571428571428575],
      "rougeL": [0.6666666666666665, 0.4444444444444445], "rougeLsum": [0.6666666666666665, 0.4444444444444445]}),
    (_PREDS, _REFS, False,
     {"rouge1": [0.4444444444444445, 0.6666666666666665], "rouge2": [0.0, 0.28571428571428575],
      "rougeL": [0.4444444444444445, 0.4444444444444445], "rougeLsum": [0.4444444444444445, 0.4444444444444445]}),
    (_PREDS, [["the cat ran quickly", "cats run"], ["The bank reported a loss.", "a loss"]], True,
     {"rouge1": [0.6666666666666665, 0.6666666666666666], "rouge2": [0.28571428571428575, 0.5],
      "rougeL": [0.6666666666666665, 0.6666666666666666], "rougeLsum": [0.6666666666666665, 0.6666666666666666]}),
    (["Profits fell. The bank said so.\nShares dropped."], ["The bank said profits fell. Shares dropped sharply."],
     True,
     {"rouge1": [0.875], "rouge2": [0.5714285714285714], "rougeL": [0.625], "rougeLsum": [0.875]}),
    (["", "hello"], ["something", ""], True,
     {"rouge1": [0.0, 0.0], "rouge2": [0.0, 0.0], "rougeL": [0.0, 0.0], "rougeLsum": [0.0, 0.0]}),
]
EVALUATE_ROUGE_MEANS = [
    {"rouge1": 0.6666666666666665, "rouge2": 0.28571428571428575, "rougeL": 0.5555555555555555,
     "rougeLsum": 0.5555555555555555},
    {"rouge1": 0.5555555555555555, "rouge2": 0.14285714285714288, "rougeL": 0.4444444444444445,
     "rougeLsum": 0.4444444444444445},
    {"rouge1": 0.6666666666666665, "rouge2": 0.3928571428571429, "rougeL": 0.6666666666666665,
     "rougeLsum": 0.6666666666666665},
    {"rouge1": 0.875, "rouge2": 0.5714285714285714, "rougeL": 0.625, "rougeLsum": 0.875},
    {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0},
]


@pytest.mark.parametrize("case", range(len(EVALUATE_ROUGE)))
def test_rouge_equals_the_former_evaluate_module(case):
    """Single and multiple references, stemming on and off, rougeLsum over newline sentences, empty texts: the
    same figures, to the last bit, as the evaluate module ift used to load."""
    preds, refs, stem, per_pair = EVALUATE_ROUGE[case]
    assert text_metrics.rouge_per_pair(preds, refs, stem) == per_pair
    assert text_metrics.rouge(preds, refs, use_stemmer=stem) == EVALUATE_ROUGE_MEANS[case]


def test_rouge_parity_on_dialogsum(shared_data):
    path = shared_data / "dialogsum" / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) >= 100
    preds = [r["summary1"] for r in rows]
    single = [r["summary2"] for r in rows]
    multi = [[r["summary2"], r["summary3"]] for r in rows]
    assert text_metrics.rouge(preds, single) == pytest.approx(_rouge_score_means(preds, single), abs=1e-12)
    assert text_metrics.rouge(preds, multi) == pytest.approx(_rouge_score_means(preds, multi), abs=1e-12)


# ---------------------------------------------------------------- files


def test_write_predictions_jsonl(tmp_path):
    path = tmp_path / "predictions" / "test.jsonl"
    preds = [{"prompt": "p", "target": "t", "prediction": "é", "correct": True}, {"prompt": "q", "correct": None}]
    ev.write_predictions(path, preds)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == preds
    assert sorted(p.name for p in path.parent.iterdir()) == ["test.jsonl"]


def test_compare_table():
    rows = compare.compare_table({"accuracy": 0.5}, {"accuracy": 0.8, "rouge1": 0.4, "loss": 1.0})
    assert rows[0] == {"metric": "accuracy", "base": 0.5, "fine-tuned": 0.8, "delta": pytest.approx(0.3)}
    assert rows[1] == {"metric": "rouge1", "base": None, "fine-tuned": 0.4, "delta": None}
    assert len(rows) == 2


def test_compare_table_adds_each_classs_f1_and_macro_f1():
    base = {"accuracy": 0.6, "macro_f1": 0.25, "per_class": {"neutral": {"f1": 0.75}, "negative": {"f1": 0.0}}}
    tuned = {"accuracy": 0.7, "macro_f1": 0.6, "per_class": {"negative": {"f1": 0.5}, "neutral": {"f1": 0.7},
                                                             "positive": {"f1": 0.6}}}
    rows = {r["metric"]: r for r in compare.compare_table(base, tuned)}
    assert list(rows) == ["accuracy", "macro_f1", "per_class.negative.f1", "per_class.neutral.f1",
                          "per_class.positive.f1"]
    assert rows["macro_f1"]["delta"] == pytest.approx(0.35)
    assert rows["per_class.negative.f1"] == {"metric": "per_class.negative.f1", "base": 0.0, "fine-tuned": 0.5,
                                             "delta": 0.5}
    assert rows["per_class.positive.f1"]["base"] is None and rows["per_class.positive.f1"]["delta"] is None


def test_compare_takes_ift_eval_records_where_the_run_computed_only_its_loss(tmp_path):
    """A run trained with evaluation.metrics: [loss] has no scores of its own; `ift eval` records hold them."""
    rd = RunDir(tmp_path)
    rd.record_training(history=[], test={"loss": 0.3, "record": "train-fine-tuned-test-1"})
    for model, value in (("base", 0.1), ("fine-tuned", 0.9)):
        rd.add_evaluation(model=model, split="test", metrics={"tool_call_exact_match": value, "n": 80}, rows=80,
                          limit=None, weights="w", dtype="float32", quantization=None, predictions=None, by="ift-eval")
    base, tuned = compare.compare_sections(tmp_path, "test")
    assert (base["tool_call_exact_match"], tuned["tool_call_exact_match"]) == (0.1, 0.9)
    rd.record_training(history=[], test={"loss": 0.3, "accuracy": 0.5, "record": "train-fine-tuned-test-1"})
    assert compare.compare_sections(tmp_path, "test")[1] == {"loss": 0.3, "accuracy": 0.5,
                                                             "record": "train-fine-tuned-test-1"}


# ---------------------------------------------------------------- CLI


RECIPE = """\
model: {{name_or_path: tiny-test-model}}
data: {{sources: [{{path: {data}}}]}}
training: {{output_dir: {out}}}
evaluation: {{metrics: [accuracy, rouge], batch_size: 4, max_new_tokens: 6}}
"""


@pytest.fixture()
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(RECIPE.format(data=tmp_path / "data.jsonl", out=run))
    return run


def _cli(capsys, *argv):
    from ift.cli import main

    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def fake_loading(monkeypatch, tiny_tokenizer):
    """ift eval with a tiny model and in-memory rows instead of the recipe's model and data."""
    import ift.cli.eval as cli_eval

    state = {"rows": [
        {"prompt": "Headline: profits up. Sentiment:", "completion": "positive",
         "choices": ["positive", "negative"], "source": "news", "template": "t1"},
        {"prompt": "Summarize the conversation.", "completion": "The customer asked for a refund",
         "choices": [], "source": "dialog", "template": "t2"},
    ], "model": build_tiny_llama(tiny_tokenizer), "loaded_tuned": []}

    def load_model(recipe, run_dir, tuned):
        state["loaded_tuned"].append(tuned)
        return SimpleNamespace(model=state["model"], tokenizer=tiny_tokenizer, kind="causal", source="tiny")

    monkeypatch.setattr(cli_eval, "load_rows", lambda recipe, split: state["rows"])
    monkeypatch.setattr(cli_eval, "load_model", load_model)
    return state


def test_cli_writes_evaluation_records_predictions_and_compares(capsys, run_dir, fake_loading):
    code, out, err = _cli(capsys, run_dir, "--base", "--limit", "2")
    assert code == 0, err
    (run_dir / "final").mkdir()
    code, out, err = _cli(capsys, run_dir, "--split", "test")
    assert code == 0, err
    assert fake_loading["loaded_tuned"] == [False, True]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"evaluations"}  # the training run's own sections are not ift eval's to write
    records = metrics["evaluations"]
    assert [(r["model"], r["split"], r["rows"], r["limit"], r["by"]) for r in records] == \
        [("base", "test", 2, None, "ift-eval"), ("fine-tuned", "test", 2, None, "ift-eval")]
    for record in records:
        assert {"accuracy", "accuracy_norm", "rouge1", "rougeLsum", "n", "by_source", "by_template", "macro_f1",
                "balanced_accuracy", "per_class", "confusion_matrix"} <= set(record["metrics"])
        assert record["metrics"]["confusion_matrix"]["labels"] == ["positive", "negative"]
        assert record["dtype"] == "float32" and record["when"]
        lines = (run_dir / record["predictions"]).read_text().splitlines()
        assert [json.loads(x)["target"] for x in lines] == ["positive", "The customer asked for a refund"]
    code, out, err = _cli(capsys, "--compare", run_dir)
    assert code == 0, err
    assert "fine-tuned" in out and "rouge1" in out and "accuracy" in out
    assert "per_class.positive.f1" in out and "confusion matrix" in out


def test_cli_eval_never_rewrites_the_training_figures(capsys, run_dir, fake_loading):
    """A --limit evaluation is a record of its own, not mixed into the run's test section (which the card
    publishes)."""
    (run_dir / "final").mkdir()
    RunDir(run_dir).record_training(history=[], test={"loss": 0.3, "accuracy": 0.9, "record": "train-1"})
    code, out, err = _cli(capsys, run_dir, "--limit", "1")
    assert code == 0, err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"] == {"loss": 0.3, "accuracy": 0.9, "record": "train-1"}
    (record,) = metrics["evaluations"]
    assert (record["model"], record["rows"], record["limit"]) == ("fine-tuned", 1, 1)
    assert not (run_dir / "predictions" / "test.jsonl").exists()  # the training run's predictions stay its own


@pytest.mark.parametrize("case, message", [
    ("missing", "no such run directory"),
    ("no_recipe", "not a run directory"),
    ("no_final", "no final model"),
    ("bad_override", "invalid value"),
    ("compare_no_base", "no base results"),
    ("empty_split", "split is empty"),
    ("no_targets", "has a target"),
    ("cannot_generate", "cannot generate"),
])
def test_cli_errors_exit_2(case, message, capsys, tmp_path, run_dir, fake_loading):
    args = [run_dir, "--base"]
    if case == "missing":
        args = [tmp_path / "nope"]
    elif case == "no_recipe":
        args = [tmp_path]
    elif case == "no_final":
        args = [run_dir]
    elif case == "bad_override":
        args = [run_dir, "evaluation.accuracy_mode=sometimes", "--base"]
    elif case == "compare_no_base":
        RunDir(run_dir).record_training(history=[], test={"accuracy": 0.5})
        args = ["--compare", run_dir]
    elif case == "empty_split":
        fake_loading["rows"] = []
    elif case == "no_targets":
        fake_loading["rows"] = [{**r, "completion": ""} for r in fake_loading["rows"]]
    elif case == "cannot_generate":
        fake_loading["model"] = fake_loading["model"].model  # LlamaModel: no language-modelling head
    code, out, err = _cli(capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- current transformers API


def test_kv_cache_decoding_calls_nothing_deprecated(tiny_tokenizer, tiny_t5, trained):
    """Rank scoring and greedy decoding hand the KV cache over as transformers now names it (`cache`, not the
    `past_key_values` removed in 5.40): a FutureWarning / DeprecationWarning, or a deprecation logged by
    transformers, fails the test. Covers the shared-prefix cache copy, choice continuation, rows leaving a
    generating batch at EOS, a peft-wrapped model and seq2seq generate."""
    import logging
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers.utils import logging as hf_logging

    model, tok = trained
    with warnings.catch_warnings():  # peft's own use of a deprecated property, not what is tested here
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        wrapped = get_peft_model(build_tiny_llama(tiny_tokenizer, seed=2), LoraConfig(r=2, target_modules=["q_proj"]))
    logged: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = logged.append
    hf_logging.warning_once.cache_clear()  # a message logged once earlier in this process would not come again
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            for net, t in ((model, tok), (wrapped, tiny_tokenizer)):
                for prompts in (PROMPTS, SHARED):
                    scoring.score_choices(net, t, "causal", prompts, CHOICES, batch_size=3)
                    decoding.generate(net, t, "causal", prompts, max_new_tokens=8, batch_size=3)
            scoring.score_choices(tiny_t5, tiny_tokenizer, "seq2seq", PROMPTS, CHOICES, batch_size=3)
            decoding.generate(tiny_t5, tiny_tokenizer, "seq2seq", PROMPTS, max_new_tokens=4, batch_size=3)
    finally:
        hf_logger.removeHandler(handler)
    assert not [r.getMessage() for r in logged if "deprecat" in r.getMessage().lower()]
    # the trained model's rows end at EOS at different steps: the batch shrank mid-generation
    lengths = {len(r) for r in decoding._generate_ids(model, tok, "causal", PROMPTS, max_new_tokens=8, batch_size=7,
                                                chat_template=False)}
    assert len(lengths) > 1


def test_ift_eval_of_a_bf16_run_loads_bf16_under_the_runs_autocast_and_equals_its_test(tmp_path, capsys):
    """A LoRA run on a bf16 checkpoint (model.dtype auto): the saved recipe pins bfloat16, `ift eval` loads the
    base in bf16 (not float32, twice the memory) under the run's autocast, records it, and scores as the run did."""
    import yaml

    from ift.modeling.final import load_final
    from ift.recipe import load_recipe
    from test_train import reset_accelerate_state, run_train, toy_recipe

    base = tmp_path / "bf16-base"
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer).to(torch.bfloat16).save_pretrained(base)
    tokenizer.save_pretrained(base)
    path = toy_recipe(tmp_path, adapter="lora", max_steps=4, eval_steps=100, save_steps=100, mixed_precision="bf16")
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {"name_or_path": str(base), "dtype": "auto"}
    path.write_text(yaml.safe_dump(raw))
    reset_accelerate_state()  # an earlier test's state would refuse the run's bf16 autocast
    try:
        run = run_train(path)
    finally:
        reset_accelerate_state()
    recipe = load_recipe(run / "recipe.yaml")
    assert recipe.model.dtype == "bfloat16"
    loaded = load_final(run / "final", recipe.model, adapter=recipe.adapter)
    assert loaded.model.get_input_embeddings().weight.dtype == torch.bfloat16

    code, out, err = _cli(capsys, run)
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    record = metrics["evaluations"][-1]
    trained = recipe.training.mixed_precision  # "no" on a CPU without native bf16, and then so here
    assert record["dtype"] == ("bfloat16 weights, bf16 autocast" if trained == "bf16" else "bfloat16")
    assert record["metrics"]["accuracy"] == metrics["test"]["accuracy"]
