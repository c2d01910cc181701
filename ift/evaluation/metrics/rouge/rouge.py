"""ROUGE as an `evaluate` metric module shipped with ift, so `evaluate.load(<this folder>)` works offline.

It wraps Google's `rouge_score` (the reference implementation the Hub's `rouge` module also wraps) with two
deliberate choices:
- the aggregate is the plain mean of per-pair F-measures, which is deterministic and equal to averaging
  `rouge_score` results yourself (the Hub module reports the median of a random bootstrap instead);
- `use_stemmer` defaults to True (Porter stemming, as summarization papers report ROUGE).
rougeLsum splits summaries into sentences on newlines only, exactly as `rouge_score` does.
Several references per prediction are allowed; a pair scores its best reference (`score_multi`).
"""

import datasets
import evaluate
import numpy as np
from rouge_score import rouge_scorer

_DESCRIPTION = """\
ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures computed with `rouge_score`, averaged over pairs.
Case-insensitive; tokens are lowercase alphanumeric runs (rouge_score's default tokenizer).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, or list of lists of references (best reference counts).
    rouge_types: subset of ["rouge1", "rouge2", "rougeL", "rougeLsum"] (any "rougeN" works too).
    use_stemmer: Porter-stem tokens before matching (default True).
    use_aggregator: True returns the mean F-measure per type; False returns the per-pair lists.
    tokenizer: optional callable text -> list of tokens replacing rouge_score's tokenizer.
Returns:
    {"rouge1": float, "rouge2": float, "rougeL": float, "rougeLsum": float} on a 0-1 scale.
Example:
    >>> rouge = evaluate.load("ift/metrics/rouge")
    >>> rouge.compute(predictions=["hello there"], references=["hello there"])
    {'rouge1': 1.0, 'rouge2': 1.0, 'rougeL': 1.0, 'rougeLsum': 1.0}
"""

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    pages = "74--81",
}
"""

DEFAULT_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


class _CallableTokenizer:
    """rouge_score wants an object with .tokenize(text); users pass a plain function."""

    def __init__(self, func):
        self.func = func

    def tokenize(self, text):
        return self.func(text)


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://aclanthology.org/W04-1013"],
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=True, use_aggregator=True,
                 tokenizer=None):
        types = list(rouge_types or DEFAULT_TYPES)
        scorer = rouge_scorer.RougeScorer(
            rouge_types=types, use_stemmer=use_stemmer,
            tokenizer=_CallableTokenizer(tokenizer) if tokenizer is not None else None,
        )
        per_pair = {t: [] for t in types}
        for pred, ref in zip(predictions, references):
            # evaluate hands single references over as str and multi-references as list
            if isinstance(ref, (list, tuple)):
                scores = scorer.score_multi(list(ref), pred)
            else:
                scores = scorer.score(ref, pred)
            for t in types:
                per_pair[t].append(float(scores[t].fmeasure))
        if not use_aggregator:
            return per_pair
        return {t: float(np.mean(v)) if v else 0.0 for t, v in per_pair.items()}
