"""Each rank's DataLoader: its share of a dataset's batches, in an order a resumed run can rejoin."""
import torch
from torch.utils.data import DataLoader

from .samplers import LengthGroupedSampler, ResumableSampler, sequence_lengths


def distributed_loader(dataset, batch_size, collator, shuffle, seed, group_by_length=False):
    """This rank's DataLoader: its share of (shuffled, or length-grouped) batches; the sampler's
    `start` lets a resumed run begin a pass part-way."""
    world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if group_by_length:
        sampler = LengthGroupedSampler(sequence_lengths(dataset), batch_size, world_size, rank, seed)
    else:
        sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    # A private generator: otherwise every pass over a loader draws a seed from the global torch
    # RNG, and a resumed run (which starts a pass mid-epoch) would drift from the interrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                      generator=torch.Generator().manual_seed(seed))
