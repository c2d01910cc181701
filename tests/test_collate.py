"""ift.data.collate's sampler is transformers' LengthGroupedSampler driven by a (seed, epoch) generator."""

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
