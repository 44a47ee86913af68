"""From `--data_name_path` to tokenised, cached `datasets.Dataset`s.

Tokenisation rule: prompt and completion are tokenised separately; EOS is appended to the
completion, which is then cut on the right to `max_gen_len`; the prompt is cut on the left so
the whole fits `max_seq_len` (a BOS the tokenizer puts in front is kept). Only completion
tokens carry loss. The result is cached with `datasets` under a key made of the data files'
content, the tokenizer, the lengths and the stage's encoding parameters.
"""
import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import sys

import datasets
import torch

from .raw_datasets import get_raw_dataset
from ..fileio import InputError, atomic_dir, commit_dir, where

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "exo_align")


# -- naming ---------------------------------------------------------------------------------
def parse_data_name_path(spec):
    """'NAME/KIND:PATH' -> ('NAME/KIND', 'PATH')."""
    name_kind, sep, path = spec.partition(":")
    if not sep or not name_kind or not path:
        raise InputError(f"--data_name_path {spec!r}: expected NAME/KIND:PATH, e.g. imdb/rw:data/imdb_rw")
    return name_kind, path


def import_dataset_module(module):
    """Import a file path or module name so that its @register_dataset classes register."""
    try:
        if module.endswith(".py") or os.path.sep in module:
            if not os.path.isfile(module):
                raise InputError(f"--dataset_module {module}: no such file")
            name = "exo_align_user_datasets_" + hashlib.sha1(os.path.abspath(module).encode()).hexdigest()[:8]
            spec = importlib.util.spec_from_file_location(name, module)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[name] = loaded
            spec.loader.exec_module(loaded)
            return loaded
        return importlib.import_module(module)
    except ImportError as err:
        raise InputError(f"--dataset_module {module}: cannot import ({err})") from None


def load_raw_datasets(data_name_paths, dataset_modules=()):
    for module in dataset_modules or ():
        import_dataset_module(module)
    return [get_raw_dataset(*parse_data_name_path(spec)) for spec in data_name_paths]


# -- tokenisation ---------------------------------------------------------------------------
class Tokenisation:
    """The tokenisation rule above, for one tokenizer and pair of lengths."""

    def __init__(self, tokenizer, max_seq_len, max_gen_len):
        if max_gen_len >= max_seq_len:
            raise InputError(f"--max_gen_len {max_gen_len} must be smaller than --max_seq_len {max_seq_len} "
                             "so that at least one prompt token conditions the completion")
        if tokenizer.eos_token_id is None:
            raise InputError(f"tokenizer {tokenizer.name_or_path}: has no EOS token; set eos_token in its config")
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.max_gen_len = max_gen_len
        self.prompts_cut = 0  # sequences whose prompt `join` cut, reported once a split is tokenised
        # Tokens the tokenizer puts in front of every text (a BOS); left cuts keep them.
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        special = tokenizer("a")["input_ids"]
        self.num_prefix = next((i for i in range(len(special) - len(plain) + 1)
                                if special[i:i + len(plain)] == plain), 0)
        if max_seq_len - max_gen_len <= self.num_prefix:
            raise InputError(f"--max_seq_len {max_seq_len} - --max_gen_len {max_gen_len} leaves no room for a prompt "
                             f"token after the {self.num_prefix} the tokenizer puts in front")

    def prompts(self, texts):
        return self.tokenizer(list(texts))["input_ids"]

    def completions(self, texts):
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [c + [eos] for c in ids]

    def join(self, prompt_ids, completion_ids):
        """(input_ids, prompt_len) with the completion cut right, then the prompt cut left."""
        completion_ids = completion_ids[:self.max_gen_len]
        room = self.max_seq_len - len(completion_ids)
        if len(prompt_ids) > room:
            self.prompts_cut += 1
            prefix = prompt_ids[:self.num_prefix]
            prompt_ids = prefix + prompt_ids[len(prompt_ids) - (room - len(prefix)):]
        return prompt_ids + completion_ids, len(prompt_ids)

    def fingerprint(self):
        tok = self.tokenizer
        backend = tok.backend_tokenizer.to_str() if getattr(tok, "is_fast", False) else repr(sorted(tok.get_vocab().items()))
        payload = [type(tok).__name__, backend, str(tok.special_tokens_map), self.max_seq_len, self.max_gen_len]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


class Encoder:
    """Turns a batch of standard records into training examples (a `datasets.map` function).

    `check(record, index)` validates one record first, over the whole split, so a bad record
    stops the run before any tokenisation starts and nothing half-done is left behind.
    """

    def __init__(self, tok, source, kind):
        self.tok, self.source, self.kind = tok, source, kind

    def check(self, record, index):
        if not record["prompt"].strip() and self.tok.num_prefix == 0:
            raise InputError(f"{where(self.source, index, 'prompt')}: empty prompt and the tokenizer adds no BOS; "
                             "give every record a prompt")


class SFTEncoder(Encoder):
    """record -> {input_ids, prompt_len}: one prompt + chosen sequence."""

    def __call__(self, batch, indices):
        prompts = self.tok.prompts(batch["prompt"])
        joined = [self.tok.join(p, c) for p, c in zip(prompts, self.tok.completions(batch["chosen"]))]
        return {"input_ids": [ids for ids, _ in joined], "prompt_len": [n for _, n in joined]}


class AlignmentEncoder(Encoder):
    """record -> C / K groups of K candidates {input_ids [K][T], prompt_lens [K], rewards [K]}.

    `pref` records become the pair (chosen, rejected) with rewards (1, 0). With pref labels
    every group needs a single best reward, since the winner is argmax r.
    """

    def __init__(self, tok, source, kind, num_contrastive, pref_labels):
        if kind not in ("pref", "rw"):
            raise InputError(f"{source}: alignment needs pref or rw data, got kind {kind!r}")
        super().__init__(tok, source, kind)
        self.num_contrastive, self.pref_labels = num_contrastive, pref_labels

    def candidates(self, record):
        if self.kind == "pref":
            return [record["chosen"], record["rejected"]], [1.0, 0.0]
        return record["completions"], record["rewards"]

    def check(self, record, index):
        super().check(record, index)
        texts, rewards = self.candidates(record)
        k = self.num_contrastive
        at = where(self.source, index, "completions" if self.kind == "rw" else "rejected")
        if len(texts) < k:
            raise InputError(f"{at}: {len(texts)} candidates, fewer than --num_contrastive {k}")
        if len(texts) % k:
            raise InputError(f"{at}: {len(texts)} candidates is not a multiple of --num_contrastive {k}; "
                             "they are split into groups of K")
        for start in range(0, len(texts), k) if self.pref_labels else ():
            group = rewards[start:start + k]
            if group.count(max(group)) > 1:
                raise InputError(f"{where(self.source, index, 'rewards')}: candidates {start}..{start + k - 1} tie "
                                 "for the best reward; a pref loss needs one winner (use an -rw loss or drop the tie)")

    def __call__(self, batch, indices):
        out = {"input_ids": [], "prompt_lens": [], "rewards": []}
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        for prompt_ids, record in zip(self.tok.prompts(batch["prompt"]), records):
            texts, rewards = self.candidates(record)
            joined = [self.tok.join(prompt_ids, c) for c in self.tok.completions(texts)]
            for start in range(0, len(texts), self.num_contrastive):
                group = slice(start, start + self.num_contrastive)
                out["input_ids"].append([ids for ids, _ in joined[group]])
                out["prompt_lens"].append([n for _, n in joined[group]])
                out["rewards"].append(rewards[group])
        return out


class PairEncoder(Encoder):
    """pref record -> {input_ids [2][T], prompt_lens [2]}: (prompt + chosen, prompt + rejected),
    each by the Tokenisation rule, for the pairwise reward-model loss."""

    def __init__(self, tok, source, kind):
        if kind != "pref":
            raise InputError(f"{source}: a reward model trains on pref data (prompt, chosen, rejected), "
                             f"got kind {kind!r}")
        super().__init__(tok, source, kind)

    def __call__(self, batch, indices):
        prompts = self.tok.prompts(batch["prompt"])
        chosen = [self.tok.join(p, c) for p, c in zip(prompts, self.tok.completions(batch["chosen"]))]
        rejected = [self.tok.join(p, c) for p, c in zip(prompts, self.tok.completions(batch["rejected"]))]
        return {"input_ids": [[c, r] for (c, _), (r, _) in zip(chosen, rejected)],
                "prompt_lens": [[c, r] for (_, c), (_, r) in zip(chosen, rejected)]}


class ClassEncoder(Encoder):
    """class record -> {input_ids, label}: the text + EOS, cut on the right to max_seq_len.

    The EOS ends the text as it ends every completion the classifier later scores (scoring
    joins prompt + completion + EOS by the training rule), so the classifier sees texts the
    way it will be asked about them. Labels are 0 or 1 (1 = positive)."""

    def __init__(self, tok, source, kind):
        if kind != "class":
            raise InputError(f"{source}: a classifier trains on class data (text, label), got kind {kind!r}")
        super().__init__(tok, source, kind)

    def check(self, record, index):
        if record["label"] not in (0, 1):
            raise InputError(f"{where(self.source, index, 'label')}: expected 0 or 1, got {record['label']}")

    def __call__(self, batch, indices):
        eos, limit = self.tok.tokenizer.eos_token_id, self.tok.max_seq_len
        texts = self.tok.tokenizer(list(batch["text"]))["input_ids"]
        return {"input_ids": [(ids + [eos])[:limit] for ids in texts], "label": list(batch["label"])}


# -- caching --------------------------------------------------------------------------------
def local_rank():
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextlib.contextmanager
def local_main_first():
    """Let local rank 0 build (and cache) first; the other ranks then read its cache."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and local_rank() != 0:
        torch.distributed.barrier()
    yield
    if distributed and local_rank() == 0:
        torch.distributed.barrier()


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(raw, split, tok, encoding):
    """Hash of what the tokenised split depends on: data content, tokenizer, lengths, encoding."""
    digest = hashlib.sha256()
    meta = [CACHE_VERSION, type(raw).__module__, type(raw).__qualname__, raw.name, raw.kind, split,
            tok.fingerprint(), encoding]
    digest.update(json.dumps(meta, sort_keys=True).encode())
    files = raw.data_files(split)
    for path in files:
        digest.update(_file_sha256(path).encode())
    if not files:  # a custom dataset with no files to point at: key on its records
        digest.update(json.dumps(raw.records(split), sort_keys=True).encode())
    return digest.hexdigest()


def tokenised_split(raw, split, tok, cache_dir, encoding, make_encoder):
    """(dataset, cache key) of the tokenised `split` of `raw`; built and validated on a miss."""
    key = cache_key(raw, split, tok, encoding)
    path = os.path.join(cache_dir, f"{raw.name}_{raw.kind}_{split}_{key[:16]}")
    with local_main_first():
        if not os.path.isdir(path):
            records = raw.records(split)
            encoder = make_encoder(tok, raw.source(split), raw.kind)
            for index, record in enumerate(records):
                encoder.check(record, index)
            records = datasets.Dataset.from_list(records)
            cut_before = tok.prompts_cut
            encoded = records.map(encoder, batched=True, with_indices=True,
                                  remove_columns=records.column_names, desc=f"tokenising {raw.name}/{raw.kind} {split}")
            if tok.prompts_cut > cut_before:
                # Never dropped: a prompt cut on the left still conditions the completion.
                print(f"{raw.source(split)}: {tok.prompts_cut - cut_before} sequences of {len(records)} records had "
                      f"their prompt cut on the left to fit --max_seq_len {tok.max_seq_len}", flush=True)
            tmp = atomic_dir(path)
            encoded.save_to_disk(tmp)
            commit_dir(tmp, path)
    return datasets.load_from_disk(path), key


def build_dataset(raw_datasets, split, tok, cache_dir, encoding, make_encoder):
    """Tokenise every dataset of `--data_name_path` and concatenate them.

    Returns (dataset, key); the key identifies the data for caches derived from it, such as
    the reference log-probs.
    """
    parts, keys = zip(*(tokenised_split(raw, split, tok, cache_dir, encoding, make_encoder) for raw in raw_datasets))
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(list(parts))
    return dataset, hashlib.sha256("".join(keys).encode()).hexdigest()
