"""Length-grouped batching: batches of similar-length sequences, so dynamic padding pads little.

Batches are padded to their longest sequence; drawn at random, a batch of 16 sequences whose
lengths spread over 24-190 tokens is about 40% padding, which the forward and backward pay for
in full. Grouping by length removes most of it while keeping the randomness where it matters:
each epoch shuffles the data, cuts it into mega-batches of many batches, sorts only inside a
mega-batch, and shuffles the order of the resulting batches (the recipe of Hugging Face's
LengthGroupedSampler, made to deal whole batches to ranks).
"""
import math

import numpy as np
import pyarrow.compute as pc
import pyarrow.types as pat
import torch
from torch.utils.data import DistributedSampler, Sampler


def sequence_lengths(dataset, column="input_ids"):
    """Tokens per example, [N]: len(input_ids), or for examples of K sequences (alignment, reward
    pairs) the longest of the K, which is what the padded batch pays. Read through Arrow, so no
    token list becomes Python objects."""
    ids = dataset.with_format("arrow")[:][column].combine_chunks()
    if pat.is_list(ids.type.value_type) or pat.is_large_list(ids.type.value_type):  # [K][T] per example
        per_sequence = pc.list_value_length(pc.list_flatten(ids)).to_numpy()
        candidates = pc.list_value_length(ids).to_numpy()
        return np.maximum.reduceat(per_sequence, np.concatenate([[0], np.cumsum(candidates)[:-1]]))
    return pc.list_value_length(ids).to_numpy()


class StartPartWay:
    """Sampler mixin over a class's `order()` (this epoch's indices): the next pass starts
    `start` samples in, so a resumed run continues at the exact sample it stopped at; the order
    itself stays a function of seed and epoch only."""

    start = 0

    def __iter__(self):
        indices = list(self.order())[self.start:]
        self.start = 0
        return iter(indices)


class LengthGroupedSampler(StartPartWay, Sampler):
    """A DistributedSampler that deals batches of similar length.

    Each rank gets ceil(N / world) examples per epoch (the first ones repeat to make the count
    even, as DistributedSampler does), in batches of `batch_size` that line up with the
    DataLoader's: the i-th batch of every rank comes from one global batch of
    batch_size * world similar-length examples. The longest global batch goes first, so a run
    that runs out of memory does so at its first step. `set_epoch` reshuffles, as usual.
    """

    def __init__(self, lengths, batch_size, num_replicas=1, rank=0, seed=0, mega_batch_batches=50):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.num_replicas, self.rank, self.seed = batch_size, num_replicas, rank, seed
        self.mega_batch_batches = mega_batch_batches
        self.num_samples = math.ceil(len(self.lengths) / num_replicas)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def global_batches(self):
        """This epoch's global batches (index arrays), in the order they are trained."""
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=gen).numpy()
        total = self.num_samples * self.num_replicas
        order = np.concatenate([order, order[:total - len(order)]])  # wrap around to an even split
        global_size = self.batch_size * self.num_replicas
        mega = global_size * self.mega_batch_batches
        batches = []
        for start in range(0, total, mega):
            chunk = order[start:start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + global_size] for i in range(0, len(chunk), global_size)]
        # only the last batch can be short (the total is a multiple of the world size, not of
        # the global batch); it stays last so that every other batch lines up with the loader's
        last = [batches.pop()] if len(batches[-1]) < global_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        longest = max(range(len(shuffled)), key=lambda i: self.lengths[shuffled[i]].max(), default=None)
        if longest is not None:
            shuffled.insert(0, shuffled.pop(longest))
        return shuffled + last

    def order(self):
        for batch in self.global_batches():
            share = len(batch) // self.num_replicas
            yield from batch[self.rank * share:(self.rank + 1) * share].tolist()


class ResumableSampler(StartPartWay, DistributedSampler):
    """DistributedSampler whose next pass can start part-way (StartPartWay)."""

    def order(self):
        return DistributedSampler.__iter__(self)
