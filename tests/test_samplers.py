"""Length-grouped batching: every example once per epoch across ranks, batches that line up
with the DataLoader's and pad little, fresh randomness each epoch."""
import datasets
import numpy as np
import pytest
from utils.data.samplers import LengthGroupedSampler, sequence_lengths


def test_sequence_lengths_of_flat_and_grouped_examples():
    flat = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in (3, 7, 1)]})
    assert sequence_lengths(flat).tolist() == [3, 7, 1]
    grouped = datasets.Dataset.from_dict({"input_ids": [[[1] * 3, [2] * 5], [[1] * 7, [2] * 2], [[1], [1] * 4]]})
    assert sequence_lengths(grouped).tolist() == [5, 7, 4]  # the longest of each group's K
    assert sequence_lengths(grouped.select([2, 0])).tolist() == [4, 5]  # through an index mapping


def per_rank_batches(lengths, batch_size, world, epoch, seed=3):
    out = []
    for rank in range(world):
        sampler = LengthGroupedSampler(lengths, batch_size, world, rank, seed, mega_batch_batches=4)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert len(indices) == len(sampler)
        out.append([indices[i:i + batch_size] for i in range(0, len(indices), batch_size)])
    return out


def padding_fraction(lengths, batches):
    return 1 - sum(lengths[b].sum() for b in batches) / sum(lengths[b].max() * len(b) for b in batches)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_example_once_and_batches_group_by_length(world):
    lengths = np.random.RandomState(0).randint(10, 200, size=101)
    ranks = per_rank_batches(lengths, 4, world, epoch=0)
    flat = [i for batches in ranks for b in batches for i in b]
    assert len(flat) == -(-101 // world) * world  # DistributedSampler's even split
    assert set(flat) == set(range(101))
    assert len({len(batches) for batches in ranks}) == 1  # every rank makes the same number of steps
    grouped = [np.array(b) for batches in ranks for b in batches]
    random = np.array_split(np.random.RandomState(1).permutation(101), len(grouped))
    assert padding_fraction(lengths, grouped) < 0.5 * padding_fraction(lengths, random)
    assert max(lengths[ranks[0][0]]) == lengths.max()  # the longest batch first: memory peaks at step 1


def test_epochs_reshuffle_and_the_seed_reproduces():
    lengths = np.random.RandomState(0).randint(10, 200, size=64)
    first, second = per_rank_batches(lengths, 4, 1, 0), per_rank_batches(lengths, 4, 1, 1)
    assert first != second
    assert first == per_rank_batches(lengths, 4, 1, 0)


@pytest.mark.slow
def test_train_exo_groups_by_length_on_two_ranks(tiny_model, align_data, tmp_path):
    """--group_by_length through the real loop on 2 CPU ranks: same number of steps as the
    default sampler (every rank gets ceil(N / 2) examples), and a model comes out."""
    import re

    from test_train_exo import train_exo

    runs = {}
    for name, flags in (("random", []), ("grouped", ["--group_by_length"])):
        result = train_exo(tiny_model, f"toy/rw:{align_data['rw']}", tmp_path / name, tmp_path / "cache",
                           "--loss_type", "exo-rw", "--num_contrastive", "2", "--print_loss", *flags)
        runs[name] = re.search(r"training [\d,]+ parameters for (\d+) optimizer steps", result.stdout).group(1)
        assert (tmp_path / name / "config.json").exists()
    assert runs["grouped"] == runs["random"]


def test_a_resumed_pass_starts_part_way_then_passes_are_whole_again():
    """What --resume relies on (the loop sets `start` before a pass): the rest of the interrupted
    epoch in the same order, and the next pass whole."""
    lengths = np.random.RandomState(0).randint(10, 200, size=40)
    sampler = LengthGroupedSampler(lengths, 4, 2, 1, seed=5, mega_batch_batches=2)
    sampler.set_epoch(1)
    whole = list(sampler)
    sampler.start = 8
    assert list(sampler) == whole[8:]
    assert list(sampler) == whole
