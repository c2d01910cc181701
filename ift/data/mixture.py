"""The training mixture: rows per source (weighted to a total, or examples-proportional with caps), sampled."""

from __future__ import annotations

from typing import Any

import numpy as np

from ift.data.cache import cache_fingerprint, stable_int, source_name
from ift.recipe import DataConfig


def mixture_counts(available: dict[str, int], weights: dict[str, float] | None, total: int | None,
                   caps: dict[str, int | None]) -> dict[str, int]:
    """Rows to take from each source for the training mixture.

    weighted: `total` rows split by the normalised weights (largest remainder); without a total, the
    largest total that needs no source repeated. proportional: every row, up to each source's cap.
    """
    capped = {n: min(a, caps.get(n) or a) for n, a in available.items()}
    if weights is None:
        return capped
    wsum = sum(weights.values())
    share = {n: w / wsum for n, w in weights.items()}
    if total is None:
        total = int(min(capped[n] / share[n] for n in capped if share[n] > 0))
    names = list(available)
    exact = np.array([total * share[n] for n in names])
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return {n: int(c) for n, c in zip(names, counts)}


def _sample(ds: Any, k: int, rng: np.random.Generator, name: str) -> Any:
    """k rows: a random subset, or whole repeats plus a random remainder when k exceeds the rows."""
    n = len(ds)
    if k == n:
        return ds
    repeats, rest = divmod(k, n)
    idx = np.concatenate([np.tile(np.arange(n), repeats), np.sort(rng.choice(n, size=rest, replace=False))])
    return ds.select(idx, new_fingerprint=cache_fingerprint("mix", ds._fingerprint, name, k, idx))


def mix_trains(trains: dict[str, Any], data: DataConfig) -> tuple[Any, dict]:
    import datasets

    mix = data.mixture
    caps = {source_name(s): s.max_rows or (mix.cap if mix.strategy == "proportional" else None) for s in data.sources}
    weights = None
    if mix.strategy == "weighted":
        weights = {source_name(s): (s.weight if s.weight is not None else 1.0) for s in data.sources}
    available = {n: len(ds) for n, ds in trains.items()}
    counts = mixture_counts(available, weights, mix.total, caps)
    parts = []
    for name, ds in trains.items():
        rng = np.random.default_rng([data.seed, stable_int(name), 7])
        if counts[name] > 0 and len(ds) > 0:
            parts.append(_sample(ds, counts[name], rng, name))
    train = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    total = max(sum(counts.values()), 1)
    wsum = sum(weights.values()) if weights else None
    report = {"strategy": mix.strategy, "total": sum(counts.values()), "sources": {
        n: {"available": available[n], "rows": counts[n], "row_share": round(counts[n] / total, 4),
            "weight": round(weights[n] / wsum, 4) if weights else None,
            "repeated": round(counts[n] / available[n], 3) if available[n] and counts[n] > available[n] else None}
        for n in trains}}
    return train, report
