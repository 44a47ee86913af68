"""The frozen reference's log-probs of a dataset: computed once before training, cached beside the tokenised data.

train_exo's cached mode (--ref_logps cached, the default) scores every candidate of a split with
the reference in one pass (`reference_logps`), keeps the array as .npy keyed on everything
that changes its values (`reference_cache_path`), and reads it back on the next run with the
same key (`cached_reference_logps`); a damaged file is computed again (`read_cached_logps`).
"""
import hashlib
import os

import numpy as np
import torch

from .data.cache import is_cache_writer
from .data.samplers import sequence_lengths
from .data.loaders import distributed_loader
from .distributed import is_rank0, sum_across_ranks, to_device
from .fileio import atomic_file
from .logprobs import model_sequence_logprobs
from .model_utils import model_fingerprint
from .tracking import progress_bar


@torch.no_grad()
def reference_logps(ref_engine, dataset, collator, args, device, prefix_sharing=False):
    """Reference log-probs of every candidate, [len(dataset), K]; each rank scores its shard
    and the shards are exchanged, so every rank ends with the whole array. The pass runs over
    the examples sorted by length, so its batches are barely padded; rows go back in place."""
    by_length = np.argsort(sequence_lengths(dataset), kind="stable")
    loader = distributed_loader(dataset.select(by_length), args.per_device_eval_batch_size, collator, False, args.seed)
    local = []
    for batch in progress_bar(loader, desc="reference log-probs", disable=not is_rank0(), dynamic_ncols=True):
        logps = model_sequence_logprobs(ref_engine, to_device(batch, device), args.temp, args.fused_logprobs,
                                        prefix_sharing)
        local.append(logps.view(-1, args.num_contrastive).cpu())
    local = torch.cat(local).numpy()
    shards = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shards, local)
    # DistributedSampler deals example i to rank i % world_size (padding by wrapping around)
    in_sorted_order = np.stack([s for s in shards], axis=1).reshape(-1, args.num_contrastive)[:len(dataset)]
    values = np.empty_like(in_sorted_order)
    values[by_length] = in_sorted_order
    return values


def reference_cache_path(args, data_key):
    """Where the reference log-probs of the data `data_key` are cached, keyed on everything
    that changes their values: the data, the reference model, tau, the dtype, the head
    reduction and --prefix_sharing as given."""
    # The fused and unfused reductions agree to ~1e-6, not bit for bit, and so do the shared and
    # unshared forwards (auto and on pack different batches, off none); a model that auto would
    # share inexactly must not hand its values to an off run: a run reads its own kind.
    key = hashlib.sha256(f"{data_key}|{model_fingerprint(args.ref_name_or_path)}|{args.temp}|{args.dtype}|"
                         f"{'fused' if args.fused_logprobs else 'logits'}|sharing={args.prefix_sharing}".encode())
    return os.path.join(args.data_output_path, f"ref_logps_{key.hexdigest()[:16]}.npy")


def cached_reference_logps(reference, dataset, data_key, collator, args, device):
    """reference_logps, cached as .npy beside the tokenised data (reference_cache_path).
    `reference()` gives the reference engine and whether it shares prompts; it is only loaded
    on a cache miss. The pass is collective, so the ranks agree: the cache is used only when
    every rank has it (a new node's own disk may not), and it is written by the writers of that
    directory (`is_cache_writer`)."""
    path = reference_cache_path(args, data_key)
    cached = read_cached_logps(path, (len(dataset), args.num_contrastive))
    if sum_across_ranks({"missing": cached is None})["missing"] == 0:
        return cached
    engine, prefix_sharing = reference()
    values = reference_logps(engine, dataset, collator, args, device, prefix_sharing)
    if is_cache_writer(args.data_output_path) and cached is None:
        with atomic_file(path, suffix=".tmp.npy") as tmp:  # np.save appends .npy to other names
            np.save(tmp, values, allow_pickle=False)
    return values


def read_cached_logps(path, shape):
    """The cached array at `path`, or None when there is none or it is damaged (then said in one
    line: it is computed again and replaced)."""
    try:
        values = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as err:
        print(f"{path}: unreadable ({err}); computing the reference log-probs again", flush=True)
        return None
    if values.shape != shape:
        print(f"{path}: holds {values.shape}, expected {shape}; computing the reference log-probs again", flush=True)
        return None
    return values
