"""The tokenised-data cache (`--data_output_path`): which rank writes it, and each entry's key.

The cache directory (`--data_output_path`) may be one directory every node sees (a shared
file system) or a directory on each node's own disk. Which it is, is found out once per run
and directory: rank 0 leaves a marker there and every rank looks for it. Shared: global rank
0 builds each cache entry and the others wait and read it. Node-local: each node's local rank
0 builds into its own directory. A wrong answer costs time, never correctness: builds are
committed atomically and a second builder of the same entry keeps the first one's copy.
"""
import contextlib
import functools
import hashlib
import json
import os
import uuid

import torch

from .. import provenance

# 2: the prompt is cut once per group of candidates (Tokenisation.join_group), not per candidate
CACHE_VERSION = 2
DEFAULT_CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "exo_align")


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@functools.lru_cache(maxsize=None)
def cache_dir_is_shared(cache_dir):
    """True when every rank sees the same `cache_dir` (always, within one machine)."""
    if not _distributed() or torch.distributed.get_world_size() == 1:
        return True
    dist = torch.distributed
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = os.path.join(cache_dir, f".shared-probe-{token[0]}")
    if dist.get_rank() == 0:
        os.makedirs(cache_dir, exist_ok=True)
        with open(marker, "w"):
            pass
    dist.barrier()
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, os.path.exists(marker))
    if dist.get_rank() == 0:
        os.remove(marker)  # every rank has looked: all_gather_object returns once all have
    return all(seen)


def is_cache_writer(cache_dir):
    """Whether this rank builds and writes the entries of `cache_dir` (see above)."""
    if not _distributed():
        return True
    if cache_dir_is_shared(os.path.abspath(cache_dir)):
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


@contextlib.contextmanager
def cache_writer_first(cache_dir):
    """Let the writer of `cache_dir` build (and cache) first; the other ranks then read its cache."""
    writer = is_cache_writer(cache_dir)
    if _distributed() and not writer:
        torch.distributed.barrier()
    yield writer
    if _distributed() and writer:
        torch.distributed.barrier()


def cache_key(raw, split, tokenisation, encoding):
    """Hash of what the tokenised split depends on: data content, tokenizer, lengths, encoding."""
    digest = hashlib.sha256()
    meta = [CACHE_VERSION, type(raw).__module__, type(raw).__qualname__, raw.name, raw.kind, split,
            tokenisation.settings_fingerprint(), encoding]
    digest.update(json.dumps(meta, sort_keys=True).encode())
    files = raw.data_files(split)
    for path in files:
        digest.update(provenance.file_digest(path).encode())
    if not files:  # a custom dataset with no files to point at: key on its records
        digest.update(json.dumps(raw.records(split), sort_keys=True).encode())
    return digest.hexdigest()
