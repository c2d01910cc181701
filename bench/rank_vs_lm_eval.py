"""Rank classification against lm-evaluation-harness's loglikelihood loop, in one run, equality checked first.

The task: TweetEval emotion (4 choices: anger, joy, optimism, sadness), zero-shot prompts on SmolLM2-135M-Instruct
(float32, CPU unless a GPU is there). Both sides score the very same token ids: ift's encoding of each prompt and
choice (`ift.evaluation.scoring`) is handed to lm-eval's `HFLM._loglikelihood_tokens` (what its public
`loglikelihood` runs after tokenizing), so a difference in the figures is a difference in the scoring, not in the
text. Equality first: every choice's summed log-likelihood within --tolerance of lm-eval's, and the same pick on
every example; then throughput, the two run alternately one batch of examples at a time.

    python bench/rank_vs_lm_eval.py [--examples 64] [--batch-size 16] [--threads N] [--tolerance 1e-3]

Needs lm-eval (pip install 'ift[benchmarks]') and the local data in ../shared/data (see ../shared/data/README.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_throughput import Clock, _rounds, load_model  # noqa: E402 (the same model and clock)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tweet_eval_emotion" / "test.jsonl"
LABELS = ["anger", "joy", "optimism", "sadness"]


def prompts(n: int) -> list[tuple[str, int]]:
    if not DATA.exists():
        raise SystemExit(f"data not found: {DATA} (see ../shared/data/README.md)")
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()][:n]
    return [(f"Tweet: {r['text']}\nWhich emotion does the tweet express: anger, joy, optimism or sadness?\n"
             "Emotion:", r["label"]) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lm_eval.models.huggingface import HFLM

    from ift.evaluation.scoring import _encode_choices, score_choices

    model, tokenizer = load_model()
    if torch.cuda.is_available():
        model.to("cuda")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    pairs = prompts(args.examples)
    texts = [p for p, _ in pairs]
    choices = [[" " + c for c in LABELS]] * len(texts)
    encoded = _encode_choices(tokenizer, "causal", texts, choices, False)

    def ours(idx):
        return [[s for s, _ in row] for row in score_choices(model, tokenizer, "causal", [texts[i] for i in idx],
                                                            [choices[i] for i in idx], batch_size=args.batch_size)]

    def theirs(idx):
        requests = [((texts[i], c), encoded[i][0], ids) for i in idx for c, ids in zip(choices[i], encoded[i][1])]
        flat = [lp for lp, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True)]
        return [flat[k * len(LABELS):(k + 1) * len(LABELS)] for k in range(len(idx))]

    warm = list(range(min(2, len(texts))))
    ours(warm), theirs(warm)
    a, b, t_ours, t_theirs = [], [], Clock(), Clock()
    for chunk in _rounds(list(range(len(texts))), args.batch_size):
        with t_ours:
            a += ours(chunk)
        with t_theirs:
            b += theirs(chunk)
    diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    same_pick = sum(max(range(4), key=ra.__getitem__) == max(range(4), key=rb.__getitem__) for ra, rb in zip(a, b))
    gold = [g for _, g in pairs]
    report = {
        "host": platform.node(), "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(), "examples": len(texts), "choices": len(LABELS),
        "choice_tokens": {c: len(ids) for c, ids in zip(choices[0], encoded[0][1])},
        "prompt_tokens_mean": sum(len(p) for p, _ in encoded) / len(encoded),
        "max_abs_loglikelihood_diff": diff, "same_pick": same_pick,
        "accuracy": sum(max(range(4), key=r.__getitem__) == g for r, g in zip(a, gold)) / len(gold),
        "ift_s": t_ours.wall, "lm_eval_s": t_theirs.wall, "ift_ex_per_s": len(texts) / t_ours.wall,
        "lm_eval_ex_per_s": len(texts) / t_theirs.wall, "speedup": t_theirs.wall / t_ours.wall,
        "speedup_cpu_time": t_theirs.cpu / t_ours.cpu,
    }
    print(json.dumps(report, indent=2))
    if diff > args.tolerance or same_pick != len(texts):
        raise SystemExit(f"not equal to lm-eval: max difference {diff:.2e}, same pick on {same_pick}/{len(texts)}")


if __name__ == "__main__":
    main()
