"""Would batching the LoRA matmuls of modules that share an input (q/k/v, gate/up) make a step faster?

    python bench/adapter_batching.py [--tokens 1440] [--rank 16] [--threads 2] [--dtype float32|bfloat16]

It is worth building only if measured faster. This measures the most it could save: the adapter path alone of one
SmolLM2-135M layer (hidden 576; q 576, k/v 192 outputs; gate/up 1536), forward and backward, as peft computes
it (per module: x @ A_i^T, then @ B_i^T, scaled) against one x @ [A_q; A_k; A_v]^T split into the three B's.
The dropped input x is shared in both (ift's LoraDropout already hands q/k/v one copy). Median of --repeats
timings of --inner passes each; the saving per step is 30 layers x (separate - batched), set against a step.
Both paths give the same outputs and gradients (checked here to 1e-5 relative before timing).
"""

from __future__ import annotations

import argparse
import statistics
import time

LAYERS = 30
GROUPS = {"q/k/v": [576, 192, 192], "gate/up": [1536, 1536]}
HIDDEN = 576


def _weights(outs: list[int], rank: int, dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    a = [(torch.randn(rank, HIDDEN, generator=g) / HIDDEN ** 0.5).to(dtype).requires_grad_() for _ in outs]
    b = [(torch.randn(o, rank, generator=g) / rank ** 0.5).to(dtype).requires_grad_() for o in outs]
    return a, b


def separate(x, a, b, scale: float):
    return [(x @ ai.t()) @ bi.t() * scale for ai, bi in zip(a, b)]


def batched(x, a, b, scale: float):
    import torch

    h = x @ torch.cat(a).t()
    return [hi @ bi.t() * scale for hi, bi in zip(h.split([ai.shape[0] for ai in a], dim=1), b)]


def _pass(path, x, a, b, grads) -> None:
    import torch

    outs = path(x, a, b, 2.0)
    torch.autograd.backward(outs, grads)


def _time(path, x, a, b, grads, inner: int, repeats: int) -> float:
    for _ in range(3):
        _pass(path, x, a, b, grads)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            _pass(path, x, a, b, grads)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def _same(x, a, b, grads) -> None:
    import torch

    results = []
    for path in (separate, batched):
        for t in (x, *a, *b):
            t.grad = None
        outs = path(x, a, b, 2.0)
        torch.autograd.backward(outs, grads)
        results.append([o.detach().float() for o in outs] + [t.grad.float() for t in (x, *a, *b)])
    for s, t in zip(*results):
        assert torch.allclose(s, t, rtol=1e-5, atol=1e-5 * float(s.abs().max())), "batched differs from peft's path"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1440, help="batch x length (the bench's 8 x 180)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--inner", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--step-seconds", type=float, default=5.4,
                   help="a whole LoRA step to set the saving against (bench/lora_step.py: fp32 with ift's dropout)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    total = 0.0
    print(f"{args.tokens} tokens, r {args.rank}, {args.dtype}, {args.threads} threads "
          f"({torch.backends.cpu.get_cpu_capability()})")
    print("| group | peft's path (ms) | batched (ms) | saved per layer (ms) |")
    print("|---|---:|---:|---:|")
    for name, outs in GROUPS.items():
        x = torch.randn(args.tokens, HIDDEN, dtype=dtype).requires_grad_()
        a, b = _weights(outs, args.rank, dtype)
        grads = [torch.randn(args.tokens, o, dtype=dtype) for o in outs]
        _same(x, a, b, grads)
        # interleaved, so drift on a shared host hits both
        sep, bat = [], []
        for _ in range(3):
            sep.append(_time(separate, x, a, b, grads, args.inner, args.repeats))
            bat.append(_time(batched, x, a, b, grads, args.inner, args.repeats))
        s, t = statistics.median(sep), statistics.median(bat)
        total += LAYERS * (s - t)
        print(f"| {name} | {1e3 * s:.3f} | {1e3 * t:.3f} | {1e3 * (s - t):+.3f} |")
    print(f"saved per step ({LAYERS} layers): {1e3 * total:+.1f} ms = {100 * total / args.step_seconds:+.2f}% "
          f"of a {args.step_seconds:g} s step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
