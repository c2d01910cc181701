"""Splits: each source's own splits kept, missing ones carved from train (seeded, optionally stratified); leaks."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ift.data.cache import cache_fingerprint, stable_int
from ift.data.sources import LoadedSource
from ift.errors import IftError
from ift.recipe import SPLITS, DataConfig, SourceConfig


def explicit_splits(cfg: SourceConfig) -> set[str]:
    return set(cfg.splits.model_fields_set) if "splits" in cfg.model_fields_set else set()


def assign_rows(source: LoadedSource) -> dict[str, Any | None]:
    """Our split -> the source's dataset (None: carve it from train)."""
    explicit = explicit_splits(source.cfg)
    out: dict[str, Any | None] = {}
    for ours in SPLITS:
        theirs = getattr(source.cfg.splits, ours)
        if theirs is None:
            out[ours] = None
        elif theirs in source.raw:
            out[ours] = source.raw[theirs]
        elif ours in explicit or ours == "train":
            fix = (f"name one of its splits ({', '.join(source.raw)})"
                   + ("" if ours == "train" else f", or set {source.key}.splits.{ours}: null to carve it from train"))
            raise IftError(f"split '{theirs}' is not in source '{source.name}' (it has: {', '.join(source.raw)})",
                           f"{source.key}.splits.{ours}", fix)
        else:
            out[ours] = None  # the default name is absent: carve
    if out["train"] is None:
        raise IftError(f"source '{source.name}' has no training split", f"{source.key}.splits.train",
                       f"name the split holding training rows (it has: {', '.join(source.raw)})")
    return out


def _size(value: float, n: int) -> int:
    if value >= 1:
        return int(value)
    return max(1, int(round(value * n))) if value > 0 else 0  # a fraction asked for rows: at least one


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split `total` over classes in proportion to `counts` (largest remainder), never above a count."""
    if total <= 0 or counts.sum() == 0:
        return np.zeros_like(counts)
    exact = counts * (total / counts.sum())
    out = np.minimum(np.floor(exact).astype(int), counts)
    order = np.argsort(-(exact - out), kind="stable")
    for i in order:
        if out.sum() >= total:
            break
        if out[i] < counts[i]:
            out[i] += 1
    return out


def carve_indices(n: int, sizes: dict[str, int], rng: np.random.Generator,
                  labels: Sequence[Any] | None = None) -> dict[str, np.ndarray]:
    """Row indices for the carved splits and what is left for train; stratified when labels are given.

    Indices within each split are sorted (source order), so selection is cache-friendly; the random
    part is which rows go where.
    """
    need = [s for s in ("validation", "test") if sizes.get(s, 0) > 0]
    if labels is None:
        perm = rng.permutation(n)
        out, start = {}, 0
        for split in need:
            out[split] = np.sort(perm[start:start + sizes[split]])
            start += sizes[split]
        out["train"] = np.sort(perm[start:])
        return out
    keys = np.array([str(v) for v in labels], dtype=object)
    classes = sorted(set(keys.tolist()))
    members = [rng.permutation(np.flatnonzero(keys == c)) for c in classes]
    counts = np.array([len(m) for m in members])
    taken = np.zeros_like(counts)
    picked: dict[str, list[np.ndarray]] = {s: [] for s in need}
    for split in need:
        quota = _allocate(counts - taken, sizes[split])
        for c, m in enumerate(members):
            picked[split].append(m[taken[c]:taken[c] + quota[c]])
        taken += quota
    out = {s: np.sort(np.concatenate(parts)) if parts else np.array([], dtype=int) for s, parts in picked.items()}
    out["train"] = np.sort(np.concatenate([m[taken[c]:] for c, m in enumerate(members)]))
    return out


def check_stratify(data: DataConfig, sources: list[LoadedSource], assignments: list[dict[str, Any | None]]) -> None:
    """stratify_by must name a column of at least one source that carves a split (in a mixture,
    sources without it are carved at random: label columns differ between datasets)."""
    if not data.stratify_by:
        return
    carving = [(s, a["train"]) for s, a in zip(sources, assignments) if a["validation"] is None or a["test"] is None]
    if carving and not any(data.stratify_by in train.column_names for _, train in carving):
        source, train = carving[0]
        raise IftError(f"stratify column '{data.stratify_by}' is not in source '{source.name}'", "data.stratify_by",
                       f"columns are: {', '.join(train.column_names)}; rename one with "
                       f"{source.key}.columns: {{old_name: {data.stratify_by}}}, or remove stratify_by")


def carve_split(source: LoadedSource, assigned: dict[str, Any | None], data: DataConfig, report: dict) -> dict[str, Any]:
    train = assigned["train"]
    n = len(train)
    sizes = {"validation": _size(data.validation_size, n) if assigned["validation"] is None else 0,
             "test": _size(data.test_size, n) if assigned["test"] is None else 0}
    carved = {s: k for s, k in sizes.items() if k > 0}
    info = {"own": [s for s in SPLITS if assigned[s] is not None], "carved": carved, "stratified_by": None}
    report[source.name] = info
    if not carved:
        return _no_missing(dict(assigned), train)
    if sum(carved.values()) >= n:
        raise IftError(f"source '{source.name}' has {n} training rows: too few to carve "
                       + " and ".join(f"{k} {s}" for s, k in carved.items()) + " rows and keep any for training",
                       "data.validation_size / data.test_size", "use smaller sizes, or give the source its own splits")
    labels = None
    if data.stratify_by:
        if data.stratify_by in train.column_names:
            labels = train.with_format("arrow")[data.stratify_by].to_pylist()
            info["stratified_by"] = data.stratify_by
        else:  # another source has the column (checked before): this one is carved at random, and says so
            info["not_stratified"] = f"no column '{data.stratify_by}'"
    rng = np.random.default_rng([data.seed, stable_int(source.name)])
    picked = carve_indices(n, carved, rng, labels)
    out = dict(assigned)
    for split, idx in picked.items():
        fp = cache_fingerprint("carve", train._fingerprint, split, idx)
        out[split] = train.select(idx, new_fingerprint=fp)
    return _no_missing(out, train)


def _no_missing(splits: dict[str, Any | None], train: Any) -> dict[str, Any]:
    """A split sized 0 (validation_size: 0) is an empty dataset with the source's columns."""
    return {s: ds if ds is not None else train.select([], new_fingerprint=cache_fingerprint("empty", train._fingerprint))
            for s, ds in splits.items()}


# ------------------------------------------------------------------------------------- leaks


def _column_np(ds: Any, column: str) -> np.ndarray:
    table = ds.with_format("arrow")[:] if len(ds) else None
    if table is None:
        return np.array([], dtype=np.int64)
    return table.column(column).to_numpy()


def _drop_rows(ds: Any, mask: np.ndarray, why: str) -> Any:
    if not mask.any():
        return ds
    keep = np.flatnonzero(~mask)
    return ds.select(keep, new_fingerprint=cache_fingerprint(why, ds._fingerprint, keep))


def remove_leaks(rendered: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Pairs in validation or test leave train; pairs in test leave validation. Counts per source."""
    hashes = {name: {s: _column_np(ds, "_pair") for s, ds in splits.items()} for name, splits in rendered.items()}
    in_test = np.concatenate([h["test"] for h in hashes.values()])
    in_eval = np.concatenate([in_test, *[h["validation"] for h in hashes.values()]])
    removed: dict[str, dict[str, int]] = {}
    for name, splits in rendered.items():
        train_mask = np.isin(hashes[name]["train"], in_eval)
        val_mask = np.isin(hashes[name]["validation"], in_test)
        splits["train"] = _drop_rows(splits["train"], train_mask, "leak-train")
        splits["validation"] = _drop_rows(splits["validation"], val_mask, "leak-validation")
        removed[name] = {"train": int(train_mask.sum()), "validation": int(val_mask.sum())}
    return removed
