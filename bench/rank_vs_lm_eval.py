"""Rank classification against lm-evaluation-harness's loglikelihood loop, in one run, equality checked first.

The task: TweetEval emotion (4 choices: anger, joy, optimism, sadness) in a promptsource template for
tweet_eval/emotion (default `author_emotion`, the one recipes/tweet_eval_emotion.yaml evaluates with), in the
model's chat template as that recipe evaluates (`--no-chat-template`: the bare prompt), zero-shot on
SmolLM2-135M-Instruct (float32, CPU unless a GPU is there). Both sides score the very same token ids: ift's
encoding of each prompt and choice (`ift.evaluation.scoring`) is handed to lm-eval's
`HFLM._loglikelihood_tokens` (what its public `loglikelihood` runs after tokenizing), so a difference in the
figures is a difference in the scoring, not in the text. Equality comes first: no speed is reported unless every
choice's summed log-likelihood (of the very runs timed) is within --tolerance of lm-eval's and the pick is the same
on every example. The sides run alternately, one batch of examples at a time, so a busy machine slows all alike. A third side, ift with the packed pass turned off (`scoring.packable` false:
prompts prefilled, choice tokens continued from a copy of the KV cache), shows what the packed pass does.

    python bench/rank_vs_lm_eval.py [--examples 64] [--batch-size 16] [--template author_emotion]
                                    [--no-chat-template] [--threads N] [--tolerance 1e-3]

Needs lm-eval (pip install 'ift[benchmarks]'), promptsource's templates (pip install --no-deps promptsource) and
the local copy of the data named in tests/shared_data.yaml (cardiffnlp/tweet_eval:emotion).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from eval_throughput import Clock, _rounds, load_model  # noqa: E402 (the same model and clock)

DATA_MAP = ROOT / "tests" / "shared_data.yaml"
DATASET = "cardiffnlp/tweet_eval:emotion"


def rows(n: int) -> list[dict]:
    entry = (yaml.safe_load(DATA_MAP.read_text(encoding="utf-8")) or {}).get(DATASET)
    path = (DATA_MAP.parent / entry["path"] / "test.jsonl") if entry else None
    if path is None or not path.exists():
        raise SystemExit(f"data not found: {DATASET} in {DATA_MAP} (see ../shared/data/README.md)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--template", default="author_emotion", help="a promptsource tweet_eval/emotion template")
    parser.add_argument("--no-chat-template", dest="chat", action="store_false")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lm_eval.models.huggingface import HFLM

    import ift.evaluation.scoring as scoring
    from ift.templates.library import TemplateLibrary

    template = TemplateLibrary().get(f"promptsource:tweet_eval/emotion/{args.template}")
    data = rows(args.examples)
    texts = [template.render(r)[0] for r in data]
    choices = [template.answer_choices(r) for r in data]
    gold = [r["label"] for r in data]
    model, tokenizer = load_model()
    if torch.cuda.is_available():
        model.to("cuda")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    encoded = scoring._encode_choices(tokenizer, "causal", texts, choices, args.chat)
    packable = scoring.packable

    def ours(idx, packed=True):
        scoring.packable = packable if packed else (lambda model, length: False)
        try:
            return [[s for s, _ in row] for row in scoring.score_choices(
                model, tokenizer, "causal", [texts[i] for i in idx], [choices[i] for i in idx],
                chat_template=args.chat, batch_size=args.batch_size)]
        finally:
            scoring.packable = packable

    def theirs(idx):
        requests = [((texts[i], c), encoded[i][0], ids) for i in idx for c, ids in zip(choices[i], encoded[i][1])]
        flat = [lp for lp, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True)]
        out, k = [], 0
        for i in idx:
            out.append(flat[k:k + len(choices[i])])
            k += len(choices[i])
        return out

    warm = list(range(min(2, len(texts))))
    ours(warm), ours(warm, packed=False), theirs(warm)
    a, c, b = [], [], []
    t_ours, t_cont, t_theirs = Clock(), Clock(), Clock()
    for chunk in _rounds(list(range(len(texts))), args.batch_size):
        with t_ours:
            a += ours(chunk)
        with t_cont:
            c += ours(chunk, packed=False)
        with t_theirs:
            b += theirs(chunk)

    def pick(row):
        return max(range(len(row)), key=row.__getitem__)

    diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    diff_cont = max(abs(x - y) for ra, rc in zip(a, c) for x, y in zip(ra, rc))
    same_pick = sum(pick(ra) == pick(rb) for ra, rb in zip(a, b))
    if diff > args.tolerance or diff_cont > args.tolerance or same_pick != len(texts):
        raise SystemExit(f"not equal to lm-eval: max difference {diff:.2e} (packed vs continued {diff_cont:.2e}), "
                         f"same pick on {same_pick}/{len(texts)}; no speed reported")
    report = {
        "host": platform.node(), "cpu": platform.processor() or platform.machine(),
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
        "template": args.template, "chat_template": args.chat, "examples": len(texts), "choices": len(choices[0]),
        "choice_tokens": {ch: len(ids) for ch, ids in zip(choices[0], encoded[0][1])},
        "prompt_tokens_mean": sum(len(p) for p, _ in encoded) / len(encoded),
        "max_abs_loglikelihood_diff": diff, "max_abs_diff_packed_vs_continued": diff_cont,
        "same_pick": same_pick, "accuracy": sum(pick(r) == g for r, g in zip(a, gold)) / len(gold),
        "ift_s": t_ours.wall, "ift_continued_s": t_cont.wall, "lm_eval_s": t_theirs.wall,
        "ift_ex_per_s": len(texts) / t_ours.wall, "lm_eval_ex_per_s": len(texts) / t_theirs.wall,
        "speedup": t_theirs.wall / t_ours.wall, "speedup_cpu_time": t_theirs.cpu / t_ours.cpu,
        "speedup_continued": t_theirs.wall / t_cont.wall, "packed_over_continued": t_cont.wall / t_ours.wall,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
