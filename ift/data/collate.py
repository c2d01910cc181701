"""Batches for training and evaluation: padding, packing, and a sampler whose order is a function of (seed, epoch).

Dynamic padding pads each batch to its own longest row (right side; labels -100 on padding).
Packing (causal models) concatenates examples into rows with position ids that restart at every example and
no attention mask: transformers' padding-free convention (as `DataCollatorWithFlattening`). Models detect the
example boundaries from the position ids (transformers' masking_utils builds the block-diagonal causal mask
for sdpa and eager; flash attention takes the varlen path) and keep attention inside each example, as long as
no KV cache is passed (`ift.training.loss` calls the model with `use_cache=False`). Two ways to pack:
- `data.packing: true`: each batch's rows become one row (padding-free; the batch keeps its row count);
- `data.packing: bfd`: rows are packed into bins of at most `data.max_length` tokens by best-fit decreasing
  (`pack_bins`, TRL's default strategy), once; a batch is `per_device_train_batch_size` bins, in an order drawn
  per (seed, epoch). Bins of one batch are padded to the longest with a padding pseudo-example (positions restart,
  no loss), so no real token attends to padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ift.errors import IftError
from ift.data.encoding import IGNORE, pad_id, pad_rows

FEATURES = ("input_ids", "attention_mask", "labels")
CPU_PAD_MULTIPLE = 16  # tokens; PhraseBank's 117 batches: 7 widths instead of 47, 5.7% more tokens computed


def padded_length(n: int, multiple: int | None, limit: int | None = None) -> int:
    """n tokens rounded up to the multiple a batch is padded to (none: n), but not past `limit` (nor below n)."""
    if not multiple:
        return n
    up = int(math.ceil(n / multiple) * multiple)
    return up if limit is None else max(n, min(up, limit))


class Collator:
    """features (dicts with input_ids, labels, attention_mask) -> a batch of tensors."""

    def __init__(self, tokenizer: Any, kind: str, packing: bool | str = False, pad_to_multiple_of: int | None = None,
                 pad_limit: int | None = None):
        if packing and kind != "causal":
            raise IftError("packing concatenates decoder-only sequences; it does not apply to seq2seq",
                           "data.packing", "set data.packing: false")
        self.kind, self.packing, self.multiple = kind, packing, pad_to_multiple_of
        self.limit = pad_limit  # no input padded past this width (labels of seq2seq: the multiple alone)
        self.pad_id = pad_id(tokenizer)

    def __call__(self, features: Sequence[dict] | Sequence[Sequence[dict]]) -> dict[str, torch.Tensor]:
        if self.packing == "bfd":  # features: bins, each a list of rows
            return self._bins(features)
        if self.packing:
            return self._packed(features)
        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f["labels"]) if f.get("labels") is not None else list(f["input_ids"]) for f in features]
        width = padded_length(max(len(x) for x in ids), self.multiple, self.limit)
        input_ids, attention_mask = pad_rows(ids, self.pad_id, width=width)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.kind == "seq2seq":
            batch["labels"] = pad_rows(labels, IGNORE, width=padded_length(max(len(x) for x in labels), self.multiple))[0]
        else:
            batch["labels"] = pad_rows(labels, IGNORE, width=width)[0]
        return batch

    def _packed(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        row = _concatenated(features)
        return self._rows([row], padded_length(len(row[0]), self.multiple))

    def _bins(self, bins: Sequence[Sequence[dict]]) -> dict[str, torch.Tensor]:
        rows = [_concatenated(b) for b in bins]
        return self._rows(rows, padded_length(max(len(r[0]) for r in rows), self.multiple))

    def _rows(self, rows: list[tuple[list[int], list[int], list[int]]], width: int) -> dict[str, torch.Tensor]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        for ids, labels, positions in rows:
            extra = width - len(ids)
            # padding forms its own pseudo-example: positions restart, no loss
            out["input_ids"].append(ids + [self.pad_id] * extra)
            out["labels"].append(labels + [IGNORE] * extra)
            out["position_ids"].append(positions + list(range(extra)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def _concatenated(features: Sequence[dict]) -> tuple[list[int], list[int], list[int]]:
    """(input ids, labels, position ids) of examples laid end to end in one row."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for f in features:
        x = list(f["input_ids"])
        y = list(f["labels"]) if f.get("labels") is not None else list(x)
        ids += x
        # the first token of an example must not be predicted from the previous example's last one
        labels += [IGNORE] + y[1:]
        positions += range(len(x))
    return ids, labels, positions


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Row indices grouped into bins of at most `capacity` tokens, best-fit decreasing: the longest row first,
    each into the fullest bin it still fits (a new bin when none does). Deterministic: ties keep row order."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        n = int(lengths[i])
        at = bisect.bisect_left(free, (n, -1))  # the least space left that still holds n
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
            continue
        space, b = free.pop(at)
        bins[b].append(i)
        bisect.insort(free, (space - n, b))
    return bins


class Bins(torch.utils.data.Dataset):
    """A tokenized split seen as bins (`pack_bins`): item i is the list of bin i's rows."""

    def __init__(self, ds: Any, bins: list[list[int]]):
        self.rows, self.bins = _model_columns(ds), bins

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> list[dict]:
        return [self.rows[j] for j in self.bins[i]]


def packing_efficiency(lengths: Sequence[int], capacity: int) -> dict:
    """How full best-fit-decreasing bins of `capacity` tokens are: tokens / (bins x capacity)."""
    bins = pack_bins(lengths, capacity)
    total = int(sum(lengths))
    return {"rows": len(lengths), "bins": len(bins), "capacity": capacity,
            "efficiency": total / (len(bins) * capacity) if bins else 0.0}


# ------------------------------------------------------------------------------------- sampling


def _generator(seed: int, epoch: int) -> torch.Generator:
    """One generator per (seed, epoch): the same order on every run, machine and resume."""
    mixed = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed(int(mixed[0]) << 32 | int(mixed[1]))
    return g


class SeededSampler(Sampler[int]):
    """A shuffled (optionally length-grouped) order that depends only on (seed, epoch).

    Accelerate calls `set_epoch` on the dataloader before every pass, so a resumed run that skips
    the batches it already saw continues with exactly the batches an uninterrupted run would see.
    """

    def __init__(self, n: int, seed: int, batch_size: int = 1, lengths: Sequence[int] | None = None):
        self.n, self.seed, self.batch_size, self.lengths = n, seed, batch_size, lengths
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = _generator(self.seed, self.epoch)
        if self.lengths:  # (transformers' grouping fails on an empty list)
            from transformers.trainer_pt_utils import LengthGroupedSampler  # transformers' trainer: heavy

            # transformers' length grouping (megabatches sorted by length, longest batch first), drawn from
            # the (seed, epoch) generator rather than the global RNG
            return iter(LengthGroupedSampler(self.batch_size, lengths=self.lengths, generator=g))
        return iter(torch.randperm(self.n, generator=g).tolist())


def _model_columns(ds: Any) -> Any:
    keep = [c for c in FEATURES if c in ds.column_names]
    return ds.select_columns(keep) if hasattr(ds, "select_columns") else ds


def row_lengths(ds: Any) -> list[int]:
    """Tokens of each row's input_ids."""
    import pyarrow.compute as pc

    return pc.list_value_length(ds.with_format("arrow")["input_ids"]).to_numpy().tolist()


def train_dataloader(ds: Any, batch_size: int, collator: Collator, *, seed: int, group_by_length: bool = False,
                     num_workers: int = 0, bin_capacity: int | None = None) -> DataLoader:
    """Shuffled batches, deterministic per (seed, epoch); length-grouped on request (needs `length`); with
    `bin_capacity`, batches of best-fit-decreasing bins of rows (`data.packing: bfd`)."""
    if bin_capacity:
        bins = Bins(ds, pack_bins(row_lengths(ds), bin_capacity))
        return DataLoader(bins, batch_size=batch_size, sampler=SeededSampler(len(bins), seed), collate_fn=collator,
                          num_workers=num_workers, drop_last=False, persistent_workers=num_workers > 0,
                          generator=torch.Generator().manual_seed(seed))
    lengths = None
    if group_by_length:
        if "length" not in ds.column_names:
            raise IftError("group_by_length needs the `length` column that ift.data.tokenization.tokenize adds",
                           "data.group_by_length", "tokenize the splits with ift.data.tokenization.tokenize first")
        lengths = ds.with_format("arrow")["length"].to_numpy().tolist()
    sampler = SeededSampler(len(ds), seed, batch_size, lengths)
    # Its own generator: without one, every iterator (and the one skip_first_batches makes on resume)
    # draws its base seed from the global RNG, shifting the dropout stream of a resumed run.
    return DataLoader(_model_columns(ds), batch_size=batch_size, sampler=sampler, collate_fn=collator,
                      num_workers=num_workers, drop_last=False, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def train_padding(setting: str | int | None, device_type: str, longest: int) -> tuple[int | None, int | None]:
    """(multiple, limit): how a run pads its training batches (`data.pad_to_multiple_of`), given its longest
    row. auto is CPU_PAD_MULTIPLE on the CPU, where every distinct batch length is a new set of tensor sizes for
    glibc's malloc to fit among the blocks earlier batches freed (a few lengths, each met again, keep the heap from
    growing: docs/benchmarks.md, "CPU memory"), never past the longest row: the top width is then the very shape
    of the pass on the longest rows before step 1, and rows of nearly one length (180-token rows: 192 wide
    otherwise, 6.7% more tokens computed) are not padded for nothing. No padding elsewhere (CUDA's caching
    allocator rounds sizes itself). A number the recipe gives is a plain multiple (e.g. for a kernel's tiles)."""
    if setting == "auto":
        return (CPU_PAD_MULTIPLE, longest) if device_type == "cpu" else (None, None)
    return setting, None


def longest_row(ds: Any) -> int:
    """Tokens in the longest input_ids of a split (seq2seq's `length` counts the target too)."""
    import pyarrow.compute as pc

    return int(pc.max(pc.list_value_length(ds.with_format("arrow")["input_ids"])).as_py() or 0)


def longest_batch(ds: Any, batch_size: int, collator: Collator) -> dict:
    """The `batch_size` longest rows of a split tokenized by ift.data.tokenization.tokenize (its `length` column)
    as one batch: the largest tensors its run will make."""
    lengths = ds.with_format("arrow")["length"].to_numpy()
    rows = np.argsort(-lengths, kind="stable")[:batch_size].tolist()
    columns = _model_columns(ds)
    return collator([columns[i] for i in rows])


def eval_dataloader(ds: Any, batch_size: int, collator: Collator) -> DataLoader:
    """Batches in the split's own order (predictions line up with rows)."""
    return DataLoader(_model_columns(ds), batch_size=batch_size, shuffle=False, collate_fn=collator,
                      generator=torch.Generator().manual_seed(0))  # leaves the global RNG (dropout) alone


@dataclass
class TrainingLoaders:
    """A run's loaders: training (padded as `train_padding` says, or packed) and validation (padded: evaluation
    batches are never packed, since Accelerate drops the rows it repeats to even out the shards by row, and a
    packed batch is one row of several examples), and the collators of both."""

    train: DataLoader
    validation: DataLoader
    train_collator: Collator
    eval_collator: Collator


def training_loaders(tokens: dict, tokenizer, kind: str, data, training, device_type: str) -> TrainingLoaders:
    """The loaders of a run's tokenized splits, from its recipe's `data` and `training` sections."""
    eval_collator = Collator(tokenizer, kind)
    multiple, limit = train_padding(data.pad_to_multiple_of, device_type, longest_row(tokens["train"]))
    train_collator = Collator(tokenizer, kind, packing=data.packing, pad_to_multiple_of=multiple,
                              pad_limit=None if data.packing else limit)
    train = train_dataloader(tokens["train"], training.per_device_train_batch_size, train_collator,
                             seed=training.seed, group_by_length=data.group_by_length,
                             num_workers=training.dataloader_num_workers,
                             bin_capacity=data.max_length if data.packing == "bfd" else None)
    validation = eval_dataloader(tokens["validation"], training.per_device_eval_batch_size, eval_collator)
    return TrainingLoaders(train, validation, train_collator, eval_collator)
