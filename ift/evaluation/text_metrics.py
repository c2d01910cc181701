"""Text metrics on predictions and references: normalised exact match, ROUGE (rouge_score), sentence splitting."""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Any, Sequence

from ift.errors import IftError
from ift.metrics import ROUGE

ROUGE_KEYS = ROUGE


def normalize_answer(text: str) -> str:
    """Case-folded, surrounding whitespace and punctuation removed, inner whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    start, end = 0, len(text)
    while start < end and _is_trim(text[start]):
        start += 1
    while end > start and _is_trim(text[end - 1]):
        end -= 1
    return " ".join(text[start:end].split())


def _is_trim(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith("P")


def exact_match(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal to (any of) their reference(s) after `normalize_answer`, 0-1."""
    _check_pairs(predictions, references)
    hits = 0
    for pred, ref in zip(predictions, references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        hits += normalize_answer(pred) in {normalize_answer(r) for r in refs}
    return hits / len(predictions)


def rouge(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]],
          use_stemmer: bool = True) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum mean F-measure (0-1): rouge_score's per-pair F-measures, averaged.

    Texts are put one sentence per line first (`split_sentences`), as the standard summarization scripts do:
    rouge_score's rougeLsum reads sentences from newlines, and without them it equals rougeL.
    """
    per_pair = rouge_per_pair(predictions, references, use_stemmer)
    return {k: sum(v) / len(v) for k, v in per_pair.items()}


# Words whose final period does not end a sentence (lower-cased, inner periods kept: "u.s", "e.g").
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc e.g i.e cf approx no nos fig inc ltd co corp dept est govt "
    "jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k u.n a.m p.m".split())
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s)")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: each line, split after . ! ? followed by a space, except after an abbreviation or an
    initial ("Mr.", "e.g.", "J.").

    The summarization scripts (transformers' run_summarization) use nltk's punkt model, which is data that must
    be downloaded (not available offline); this rule agrees with it on ordinary prose, and a score stays
    reproducible without any download.
    """
    out: list[str] = []
    for line in text.splitlines():
        start = 0
        for match in _SENTENCE_END.finditer(line):
            if match.group().startswith(".") and not match.group().startswith(".."):
                words = line[start:match.start()].split()
                word = words[-1].lstrip("\"'\u201c\u2018([").lower() if words else ""
                if word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                    continue
            out.append(line[start:match.end()].strip())
            start = match.end()
        if line[start:].strip():
            out.append(line[start:].strip())
    return out


def rouge_per_pair(predictions: Sequence[str], references: Sequence[Any], use_stemmer: bool) -> dict[str, list[float]]:
    _check_pairs(predictions, references)
    # one sentence per line (for rougeLsum; the other types ignore line breaks)
    predictions = ["\n".join(split_sentences(p)) for p in predictions]
    refs = ["\n".join(split_sentences(r)) if isinstance(r, str) else ["\n".join(split_sentences(x)) for x in r]
            for r in references]
    scorer = _rouge_scorer(use_stemmer)
    out: dict[str, list[float]] = {k: [] for k in ROUGE_KEYS}
    for pred, ref in zip(predictions, refs):
        # several references: each type scores its best one (rouge_score's score_multi, as evaluate's rouge does)
        scores = scorer.score(ref, pred) if isinstance(ref, str) else scorer.score_multi(list(ref), pred)
        for k in ROUGE_KEYS:
            out[k].append(float(scores[k].fmeasure))
    return out


# Scripts written without spaces between words: each character is a token (as ROUGE for Chinese and Japanese
# is usually computed), so a sentence is not one giant "word".
_UNSPACED = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
                       "\uf900-\ufaff\U00020000-\U0002fa1f]")


class ScriptTokenizer:
    """ROUGE tokens for text in any script: rouge_score's own rule, widened from [a-z0-9] to every letter, digit
    and combining mark.

    rouge_score's default tokenizer keeps only a-z and 0-9, so Chinese, Russian or Arabic text has no tokens
    at all (an identical prediction scores 0) and "Müller" becomes "m ller". Here: lower-case; a token is a
    run of letters, digits and combining marks (Devanagari's vowel signs belong to their word); each character
    of a script written without spaces (CJK, kana, Thai, Lao, Myanmar, Khmer) is a token; the Porter stemmer,
    as rouge_score applies it, on ASCII words longer than 3 characters. On ASCII text this is exactly
    rouge_score's tokenization (tests/test_evaluation.py compares them on DialogSum's references).
    """

    def __init__(self, use_stemmer: bool = True):
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        word: list[str] = []
        for ch in text.lower() + " ":
            if _UNSPACED.match(ch):
                self._add(tokens, word)
                tokens.append(ch)
            elif ch.isalnum() or unicodedata.category(ch).startswith("M"):
                word.append(ch)
            else:
                self._add(tokens, word)
        return tokens

    def _add(self, tokens: list[str], word: list[str]) -> None:
        if not word:
            return
        text = "".join(word)
        word.clear()
        if self._stemmer is not None and text.isascii() and len(text) > 3:
            text = self._stemmer.stem(text)
        tokens.append(text)


@functools.lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), tokenizer=ScriptTokenizer(use_stemmer))


def _check_pairs(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise IftError(f"{len(predictions)} predictions but {len(references)} references", None,
                       "pass one reference (or list of references) per prediction")
    if not predictions:
        raise IftError("nothing to score: no predictions", None, "pass at least one prediction")

