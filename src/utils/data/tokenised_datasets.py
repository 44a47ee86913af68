"""Building the datasets a stage trains on: its raw datasets tokenised, cached and concatenated.

Each split of each raw dataset (utils/data/dataset_names.py) is checked and encoded by the
stage's encoder (utils/data/encoders.py, by the rule of utils/data/tokenisation.py). The
result is cached with `datasets` (utils/data/cache.py) under a key made of the data files'
content, the tokenizer (and chat template), the lengths and the stage's encoding parameters;
each entry records its files' digests (utils/provenance.py) and one damaged since is rebuilt,
with one line saying so.
"""
import hashlib
import os
import shutil

import datasets

from .cache import cache_key, cache_writer_first
from .. import provenance
from ..fileio import atomic_dir, commit_new_dir


def tokenised_split(raw, split, tokenisation, cache_dir, encoding, make_encoder):
    """(dataset, cache key) of the tokenised `split` of `raw`; built and validated on a miss."""
    key = cache_key(raw, split, tokenisation, encoding)
    path = os.path.join(cache_dir, f"{raw.name}_{raw.kind}_{split}_{key[:16]}")
    with cache_writer_first(cache_dir) as writer:
        problem = provenance.verify_dir(path) if writer and os.path.isdir(path) else None
        if problem:  # a cache entry damaged since it was written (its files' digests differ)
            print(f"{problem}: rebuilding this cache entry", flush=True)
            shutil.rmtree(path, ignore_errors=True)
        if writer and not os.path.isdir(path):
            records = raw.records(split)
            encoder = make_encoder(tokenisation, raw.source(split), raw.kind)
            for index, record in enumerate(records):
                encoder.check(record, index)
            # from_list takes its columns from the first record; optional fields may start later
            fields = list(dict.fromkeys(field for record in records for field in record))
            records = datasets.Dataset.from_list([{field: r.get(field) for field in fields} for r in records])
            cut_before = tokenisation.prompts_cut
            encoded = records.map(encoder, batched=True, with_indices=True,
                                  remove_columns=records.column_names, desc=f"tokenising {raw.name}/{raw.kind} {split}")
            if tokenisation.prompts_cut > cut_before:
                # Never dropped: a prompt cut on the left still conditions the completion.
                print(f"{raw.source(split)}: {tokenisation.prompts_cut - cut_before} sequences of {len(records)} "
                      f"records had their prompt cut on the left to fit --max_seq_len {tokenisation.max_seq_len}",
                      flush=True)
            tmp = atomic_dir(path)
            encoded.save_to_disk(tmp)
            provenance.record_dir(tmp, {"cache_key": key})
            commit_new_dir(tmp, path)
    return datasets.load_from_disk(path), key


def build_dataset(raw_datasets, split, tokenisation, cache_dir, encoding, make_encoder):
    """Tokenise every dataset of `--data_name_path` and concatenate them.

    Returns (dataset, key); the key identifies the data for caches derived from it, such as
    the reference log-probs.
    """
    parts, keys = zip(*(tokenised_split(raw, split, tokenisation, cache_dir, encoding, make_encoder)
                        for raw in raw_datasets))
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(list(parts))
    return dataset, hashlib.sha256("".join(keys).encode()).hexdigest()
