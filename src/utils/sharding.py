"""Sharded, resumable inference: the map that sampling, reward scoring and log-prob scoring share.

Every rank takes a contiguous slice of the inputs (rank 0 the first) and runs a script's
`process_batch(items, first_index) -> [one JSON output per item]` over it batch by batch.
Rank r keeps its results in

    <output dir>/.shards/<output stem>.rank{r}of{w}.<run key>.json

written atomically when its slice is done, every `--save_interval` seconds on the way, and
when the rank dies of an exception. The run key hashes the inputs and every setting that
changes the outputs, so the same command rerun after a crash picks each rank up where its
last save left off (a finished slice is not recomputed), while a run with other settings never
reads stale results. Once every rank is done, rank 0 concatenates the slices in input order,
writes the final output atomically and deletes the shards. (On several nodes the output
directory must be on a filesystem every rank sees, as checkpoints are.)
"""
import glob
import hashlib
import json
import os
import time
from datetime import timedelta

import torch.distributed as dist
from tqdm import tqdm

from .fileio import InputError, atomic_write_json

SHARD_DIR = ".shards"
# Ranks reach the merge at very different times (a resumed rank may have nothing left to do
# while another samples for hours), longer than the default group's 30-minute timeout.
MERGE_WAIT_TIMEOUT = timedelta(days=2)


def shard_range(num_items, rank, world_size):
    """[start, stop) of `rank`'s contiguous slice; the first num_items % world_size ranks take one more."""
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def run_key(inputs, settings):
    """16 hex digits identifying a run's results: the inputs and every output-changing setting."""
    payload = json.dumps({"inputs": inputs, "settings": settings}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _shard_location(output_file):
    """(shard directory, shard file-name stem) of an output file."""
    directory, name = os.path.split(os.path.abspath(output_file))
    return os.path.join(directory, SHARD_DIR), os.path.splitext(name)[0]


def shard_path(output_file, key, rank, world_size):
    directory, stem = _shard_location(output_file)
    return os.path.join(directory, f"{stem}.rank{rank}of{world_size}.{key}.json")


def read_shard(path, key):
    """(outputs so far, complete) of an earlier attempt at a shard; ([], False) when there is none
    (an unreadable file is recomputed rather than trusted)."""
    try:
        with open(path, encoding="utf-8") as f:
            shard = json.load(f)
        if shard["run_key"] != key:
            return [], False
        return shard["outputs"], bool(shard["complete"])
    except (OSError, ValueError, KeyError, TypeError):
        return [], False


class Shard:
    """One rank's contiguous slice of the inputs and its outputs so far, kept in its shard file."""

    def __init__(self, output_file, key, rank, world_size, num_inputs, writes=True):
        self.path, self.key, self.writes = shard_path(output_file, key, rank, world_size), key, writes
        self.start, self.stop = shard_range(num_inputs, rank, world_size)
        self.outputs, self.complete = read_shard(self.path, key)

    def save(self, complete=False):
        self.complete = complete
        if not self.writes:  # a replica's slice is saved by the rank it copies
            return
        atomic_write_json(self.path, {"run_key": self.key, "complete": complete, "start": self.start,
                                      "stop": self.stop, "outputs": self.outputs}, indent=None)


def _distributed():
    return dist.is_available() and dist.is_initialized()


def sharded_map(inputs, process_batch, output_file, settings, batch_size, write=None, desc="inference",
                save_interval=300, rank=None, world_size=None, replica=False):
    """Run `process_batch` over `inputs` on every rank and return the outputs, in input order, on
    rank 0 (None elsewhere) once `write(outputs)` has stored them (default: a JSON list at
    `output_file`). Call on every rank with the same arguments.

    `process_batch(items, first_index)` gets consecutive inputs and the index of the first in
    `inputs`, and returns one JSON-serialisable output per item; `first_index` is what a
    sampler seeds from, so a resumed batch draws what it drew before. `settings` (JSON) and
    `batch_size` go into the run key. `rank` and `world_size` default to torch.distributed's.
    Several processes may share a slice (the ranks of one tensor-parallel engine, which must
    all run its batches): they pass the same `rank`, all but one with `replica`, which computes
    the slice as the others do (resuming where its shard was saved) but writes nothing and
    returns None.
    """
    if rank is None:
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    multi_rank = _distributed() and dist.get_world_size() > 1
    # created up front, when every rank is here: new_group is itself collective
    wait_group = dist.new_group(backend="gloo", timeout=MERGE_WAIT_TIMEOUT) if multi_rank else None
    key = run_key(inputs, {**settings, "batch_size": batch_size})
    if rank == 0 and not replica:
        sizes = ", ".join(str(b - a) for a, b in (shard_range(len(inputs), r, world_size) for r in range(world_size)))
        tqdm.write(f"{desc}: {len(inputs)} inputs on {world_size} rank(s) ({sizes} each), batch {batch_size}, "
                   f"run key {key}")

    shard = Shard(output_file, key, rank, world_size, len(inputs), writes=not replica)
    if shard.complete:
        tqdm.write(f"rank {rank}: reusing its complete shard ({len(shard.outputs)} outputs) from {shard.path}")
    else:
        del shard.outputs[len(shard.outputs) - len(shard.outputs) % batch_size:]  # whole batches only
        if shard.outputs:
            tqdm.write(f"rank {rank}: resuming its shard at {len(shard.outputs)} of {shard.stop - shard.start} "
                       f"from {shard.path}")
        label = f"{desc} [rank {rank}/{world_size}]"
        if rank == 0 and world_size > 1:
            label += f" of {len(inputs)} in all"
        with tqdm(total=shard.stop - shard.start, initial=len(shard.outputs), desc=label, position=rank,
                  dynamic_ncols=True) as bar:
            _fill(shard, inputs, process_batch, batch_size, save_interval, bar)

    if multi_rank:
        dist.barrier(group=wait_group)
    if rank != 0 or replica:
        return None
    merged = []
    for r in range(world_size):
        part = Shard(output_file, key, r, world_size, len(inputs))
        if not part.complete:
            raise RuntimeError(f"the shard of rank {r} is missing or unfinished after all ranks finished; "
                               f"is another run writing to {output_file}?")
        merged.extend(part.outputs)
    if len(merged) != len(inputs):
        raise RuntimeError(f"the shards hold {len(merged)} outputs for {len(inputs)} inputs")
    (write or (lambda outs: atomic_write_json(output_file, outs)))(merged)
    _remove_shards(output_file)
    return merged


def _fill(shard, inputs, process_batch, batch_size, save_interval, bar):
    """Process the rest of `shard`'s slice batch by batch: saved every `save_interval` seconds,
    on an exception (so the rerun keeps what is done) and, marked complete, at the end."""
    saved, last_save = len(shard.outputs), time.monotonic()
    try:
        for first in range(shard.start + len(shard.outputs), shard.stop, batch_size):
            items = inputs[first:min(first + batch_size, shard.stop)]
            results = process_batch(items, first)
            if len(results) != len(items):
                raise RuntimeError(f"process_batch returned {len(results)} outputs for {len(items)} inputs")
            shard.outputs.extend(results)
            bar.update(len(items))
            if time.monotonic() - last_save >= save_interval and first + batch_size < shard.stop:
                shard.save()
                saved, last_save = len(shard.outputs), time.monotonic()
    except InputError:
        raise
    except BaseException:
        if len(shard.outputs) > saved:
            shard.save()
        raise
    shard.save(complete=True)


def _remove_shards(output_file):
    """Delete every shard of `output_file` (stale ones of other settings too: the output supersedes them)."""
    directory, stem = _shard_location(output_file)
    for path in glob.glob(os.path.join(glob.escape(directory), f"{glob.escape(stem)}.rank*of*.*.json")):
        os.remove(path)
    try:
        os.rmdir(directory)
    except OSError:  # other outputs' shards still there
        pass
