"""ift.data.collate's sampler is transformers' LengthGroupedSampler driven by a (seed, epoch) generator."""

import math

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from ift.data.collate import SeededSampler, _generator


def test_length_grouped_order_is_transformers_sampler_with_the_epoch_generator():
    lengths = [int(x) for x in torch.randint(3, 200, (203,), generator=torch.Generator().manual_seed(0))]
    ours = SeededSampler(len(lengths), seed=7, batch_size=4, lengths=lengths)
    seen = []
    for epoch in (0, 1):
        ours.set_epoch(epoch)
        order = list(ours)
        peer = list(LengthGroupedSampler(4, lengths=lengths, generator=_generator(7, epoch)))
        assert order == peer and sorted(order) == list(range(len(lengths)))
        assert lengths[order[0]] == max(lengths)  # the longest row comes first: memory shows early
        seen.append(order)
    assert seen[0] != seen[1]  # a new epoch draws a new order
    ours.set_epoch(0)
    assert list(ours) == seen[0]  # and the same epoch the same order (exact resume)


def test_plain_order_depends_only_on_seed_and_epoch():
    a, b = SeededSampler(50, seed=3), SeededSampler(50, seed=3)
    b.set_epoch(1)
    assert list(a) == torch.randperm(50, generator=_generator(3, 0)).tolist()
    assert list(a) != list(b) and sorted(list(b)) == list(range(50))


def test_training_batches_on_the_cpu_are_padded_to_a_multiple_of_16_by_default_never_past_the_longest_row():
    from ift.data.collate import CPU_PAD_MULTIPLE, padded_length, train_padding

    assert train_padding("auto", "cpu", 232) == (CPU_PAD_MULTIPLE, 232) and CPU_PAD_MULTIPLE == 16
    assert train_padding("auto", "cuda", 232) == (None, None) and train_padding(None, "cpu", 232) == (None, None)
    assert train_padding(64, "cuda", 232) == (64, None) and train_padding(8, "cpu", 232) == (8, None)
    assert [padded_length(n, 16) for n in (1, 16, 17, 232)] == [16, 16, 32, 240]
    assert padded_length(233, None) == 233 and padded_length(233, None, 200) == 233
    # the top width is the longest row's (the shape of the pass before step 1), not the next multiple
    assert [padded_length(n, 16, 180) for n in (150, 170, 176, 177, 180)] == [160, 176, 176, 180, 180]
    assert padded_length(181, 16, 180) == 181  # never cut


def test_rows_of_nearly_one_length_are_padded_to_the_longest_not_past_it(tiny_tokenizer):
    from ift.data.collate import Collator

    rows = [{"input_ids": [3] * n, "labels": [3] * n, "attention_mask": [1] * n} for n in (171, 178)]
    assert Collator(tiny_tokenizer, "causal", pad_to_multiple_of=16, pad_limit=180)(rows)["input_ids"].shape == (2, 180)
    assert Collator(tiny_tokenizer, "causal", pad_to_multiple_of=16)(rows)["labels"].shape == (2, 192)
    s2s = Collator(tiny_tokenizer, "seq2seq", pad_to_multiple_of=16, pad_limit=20)(
        [{"input_ids": [5] * 19, "labels": [8] * 3}])
    assert s2s["input_ids"].shape == (1, 20) and s2s["labels"].shape == (1, 16)


def test_the_longest_row_counts_input_ids(tiny_tokenizer):
    from datasets import Dataset

    from ift.data.collate import longest_row

    ds = Dataset.from_dict({"input_ids": [[3] * 5, [3] * 9, [3] * 2], "length": [20, 9, 30]})  # seq2seq: + target
    assert longest_row(ds) == 9


def test_the_longest_batch_is_the_longest_rows_padded_as_the_run_pads(tiny_tokenizer):
    from datasets import Dataset

    from ift.data.collate import Collator, longest_batch

    lengths = [5, 40, 7, 33, 12, 39]
    ds = Dataset.from_dict({"input_ids": [[3] * n for n in lengths], "labels": [[3] * n for n in lengths],
                            "attention_mask": [[1] * n for n in lengths], "length": lengths})
    batch = longest_batch(ds, 3, Collator(tiny_tokenizer, "causal", pad_to_multiple_of=16))
    assert batch["input_ids"].shape == (3, 48)
    assert sorted(batch["attention_mask"].sum(1).tolist()) == [33, 39, 40]


def test_best_fit_decreasing_bins_hold_every_row_once_within_capacity():
    import random

    from ift.data.collate import pack_bins

    assert pack_bins([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]  # 5+3, 4+3+1, 2
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    bins = pack_bins(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= math.ceil(sum(lengths) / 64) * 11 / 9 + 1  # BFD's bound: 11/9 OPT + 6/9
    assert bins == pack_bins(lengths, 64)  # deterministic


def test_a_batch_of_bins_scores_every_example_as_the_padded_batch(tiny_tokenizer):
    """The bins' summed token loss equals the padded batch's over the same examples, and every example's
    logits are the same: position ids restart, so no example attends to another or to padding."""
    from conftest import build_tiny_llama
    from ift.data.collate import Collator, pack_bins
    from ift.training.loss import CompletionLoss
    from test_data import _token_rows

    rows = _token_rows(tiny_tokenizer)
    bins = pack_bins([len(r["input_ids"]) for r in rows], 24)
    assert 1 < len(bins) < len(rows)
    for attn in ("sdpa", "eager"):
        model = build_tiny_llama(tiny_tokenizer).eval()
        model.config._attn_implementation = attn
        loss = CompletionLoss(model, "causal")
        packed = Collator(tiny_tokenizer, "causal", packing="bfd", pad_to_multiple_of=8)([[rows[i] for i in b]
                                                                                          for b in bins])
        assert packed["input_ids"].shape[0] == len(bins) and "attention_mask" not in packed
        order = [i for b in bins for i in b]
        padded = Collator(tiny_tokenizer, "causal")([rows[i] for i in order])
        with torch.no_grad():
            (a, n_a), (b, n_b) = loss(**padded), loss(**packed)
            # the first completion token of an example is still predicted from its own prompt in the bin
            assert int(n_a) == int(n_b)
            assert torch.allclose(a, b, atol=1e-4), (attn, a, b)
            full = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
            plain = model(**{k: v for k, v in padded.items() if k != "labels"}, use_cache=False).logits
        at = 0
        for row, bin_ in enumerate(bins):
            offset = 0
            for i in bin_:
                n = len(rows[i]["input_ids"])
                assert torch.allclose(plain[at, :n], full[row, offset:offset + n], atol=1e-4)
                offset, at = offset + n, at + 1


def test_packing_efficiency_counts_tokens_over_bin_capacity():
    from ift.data.collate import packing_efficiency

    assert packing_efficiency([5, 4, 3, 3, 2, 1], 8) == {"rows": 6, "bins": 3, "capacity": 8, "efficiency": 18 / 24}
