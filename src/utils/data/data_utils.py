"""From `--data_name_path` to tokenised, cached `datasets.Dataset`s.

Tokenisation rule: prompt and completion are tokenised separately; EOS is appended to the
completion, which is then cut on the right to `max_gen_len`; the prompt is cut on the left so
the whole fits `max_seq_len` (a BOS the tokenizer puts in front is kept). Only completion
tokens carry loss. Conversational records are rendered with the chat template instead
(utils/data/chat.py): the prompt with the generation prompt, the completion as the assistant
turn up to its end-of-turn token, with no EOS after it; the cuts are the same. A sampled
completion that carries its exact token ids (`completion_ids`, from a tokenizer with the
record's `tokenizer_fingerprint`) is not re-tokenised: its ids are the completion as they
are, the stop token included only where one was sampled, and the same cuts apply; ids that
do not decode to the record's text (a completion edited after sampling) are refused, one
line naming the record. With another tokenizer its text is used instead, with a warning. The result is cached with
`datasets` under a key made of the data files' content, the tokenizer (and chat template),
the lengths and the stage's encoding parameters; each entry records its files' digests
(utils/provenance.py) and one damaged since is rebuilt, with one line saying so.
"""
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import uuid

import datasets
import torch

from .chat import COMPLETION_FIELDS, ChatTemplate, is_conversation
from .raw_datasets import check_columns_for_kind, parse_columns, resolve_dataset
from .. import provenance
from ..fileio import InputError, atomic_dir, commit_new_dir, where

# 2: the prompt is cut once per group of candidates (Tokenisation.join_group), not per candidate
CACHE_VERSION = 2
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


def get_raw_dataset(name_kind, path, split_names=None, columns=None):
    """The raw dataset `NAME[/KIND]` at `path`, as `--data_name_path NAME[/KIND]:PATH` names it.

    Datasets of your own can be added here by hand, one entry each, as in DeepSpeed-Chat:

        if name == "my_tsv":
            dataset = MyTsv(name, path, kind or None)

    or, with no edit to this file, registered with @register_dataset in a module passed with
    --dataset_module (utils/data/raw_datasets.py). Any other name with a standard KIND reads
    the standard files. `split_names` (--data_split_names) and `columns` (--columns) apply to
    every dataset.
    """
    name, _, kind = name_kind.partition("/")
    dataset = None
    # -- datasets added by hand go here --
    if dataset is None:
        dataset = resolve_dataset(name_kind, path)
    if split_names:
        dataset.split_names = dict(zip(("train", "test"), split_names))
    if columns:
        check_columns_for_kind(columns, dataset.kind, name_kind)
        dataset.columns = dict(columns)
    return dataset


def load_raw_datasets(data_name_paths, dataset_modules=(), split_names=None, columns=None):
    for module in dataset_modules or ():
        import_dataset_module(module)
    columns = parse_columns(columns) if isinstance(columns, str) else columns
    return [get_raw_dataset(*parse_data_name_path(spec), split_names=split_names, columns=columns)
            for spec in data_name_paths]


# -- tokenisation ---------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer):
    """16 hex digits identifying what token ids mean to `tokenizer`: its vocabulary, merges,
    added tokens, normalisation and EOS id (not its padding or truncation settings, which
    change while it runs)."""
    if getattr(tokenizer, "is_fast", False):
        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        backend.pop("padding", None)
        backend.pop("truncation", None)
    else:
        backend = sorted(tokenizer.get_vocab().items())
    payload = json.dumps([backend, tokenizer.eos_token_id], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class Tokenisation:
    """The tokenisation rule above, for one tokenizer and pair of lengths."""

    def __init__(self, tokenizer, max_seq_len, max_gen_len, chat_template="auto", chat_template_date=None):
        if max_gen_len >= max_seq_len:
            raise InputError(f"--max_gen_len {max_gen_len} must be smaller than --max_seq_len {max_seq_len} "
                             "so that at least one prompt token conditions the completion")
        if tokenizer.eos_token_id is None:
            raise InputError(f"tokenizer {tokenizer.name_or_path}: has no EOS token; set eos_token in its config")
        self.tokenizer = tokenizer
        self.chat = ChatTemplate(tokenizer, chat_template, chat_template_date)
        self.max_seq_len = max_seq_len
        self.max_gen_len = max_gen_len
        self.prompts_cut = 0  # sequences whose prompt `join_group` cut, reported once a split is tokenised
        # Tokens the tokenizer puts in front of every text (a BOS); left cuts keep them.
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        special = tokenizer("a")["input_ids"]
        self.num_prefix = next((i for i in range(len(special) - len(plain) + 1)
                                if special[i:i + len(plain)] == plain), 0)
        if max_seq_len - max_gen_len <= self.num_prefix:
            raise InputError(f"--max_seq_len {max_seq_len} - --max_gen_len {max_gen_len} leaves no room for a prompt "
                             f"token after the {self.num_prefix} the tokenizer puts in front")

    def prompts(self, prompts):
        """Prompt ids: text tokenised as is, a conversation rendered with the generation prompt."""
        prompts = list(prompts)
        if not any(is_conversation(p) for p in prompts):
            return self.tokenizer(prompts)["input_ids"] if prompts else []
        return [self.chat.prompt_ids(p) if is_conversation(p) else self.tokenizer(p)["input_ids"] for p in prompts]

    def completions(self, completions, prompts=None):
        """Completion ids: text + EOS; an assistant message (of `prompts[i]`, its conversation)
        as the tokens its template adds, up to the end-of-turn token."""
        completions = list(completions)
        if not completions or not isinstance(completions[0], dict):
            eos = self.tokenizer.eos_token_id
            return [c + [eos] for c in self.tokenizer(completions, add_special_tokens=False)["input_ids"]]
        return [self.chat.completion_ids(p, c) for p, c in zip(prompts, completions)]

    def check_conversation(self, record, kind, source, index):
        """Conversational records: a template renders them and every completion meets the prefix
        rule (prompt ids + completion ids = the conversation's ids), else one line naming the record."""
        self.chat.require(source, index)
        try:
            prompt_ids = self.chat.prompt_ids(record["prompt"])
        except ValueError as err:
            raise InputError(f"{where(source, index, 'prompt')}: {err}") from None
        for field in (f for f in COMPLETION_FIELDS[kind] if f in record):  # sampling checks prompts alone
            values = record[field] if field == "completions" else [record[field]]
            for j, completion in enumerate(values):
                try:
                    self.chat.completion_ids(record["prompt"], completion, prompt_ids)
                except ValueError as err:
                    at = where(source, index, f"{field}[{j}]" if field == "completions" else field)
                    raise InputError(f"{at}: {err}") from None

    @functools.cached_property
    def tokenizer_fingerprint(self):
        return tokenizer_fingerprint(self.tokenizer)

    def uses_ids(self, record):
        """Whether `record`'s completions are its exact sampled ids (from this tokenizer)."""
        return record.get("completion_ids") is not None and \
            record.get("tokenizer_fingerprint") == self.tokenizer_fingerprint

    def ids_spell(self, ids, text):
        """Whether sampled `ids` decode to `text`, as the sampler wrote it: the ids before the
        stop token it drew (EOS, an end-of-turn token), or all of them when none was drawn."""
        stops = set(self.chat.end_of_turn_ids) if self.chat.template is not None else {self.tokenizer.eos_token_id}
        body = ids[:-1] if ids and ids[-1] in stops else ids
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return decode(body) == text or decode(ids) == text

    def record_completions(self, record, texts=None):
        """The completion ids of a gen/rw record (or of `texts`, its candidates), uncut: the
        sampled ids as they are when the record carries them from this tokenizer, else text + EOS."""
        if self.uses_ids(record):
            return [list(ids) for ids in record["completion_ids"]]
        texts = record["completions"] if texts is None else texts
        return self.completions(texts, [record["prompt"]] * len(texts))

    def join(self, prompt_ids, completion_ids):
        """(input_ids, prompt_len) with the completion cut right, then the prompt cut left."""
        return self.join_group(prompt_ids, [completion_ids])[0]

    def join_group(self, prompt_ids, group):
        """[(input_ids, prompt_len)] of every completion of `group` (the candidates of one
        prompt): each completion cut right, then the prompt cut left ONCE, so that the group's
        longest completion fits. Every candidate is conditioned on the same prompt tokens, as
        the K samples of one prompt are, and prefix sharing can encode them once."""
        group = [completion_ids[:self.max_gen_len] for completion_ids in group]
        room = self.max_seq_len - max((len(completion_ids) for completion_ids in group), default=0)
        if len(prompt_ids) > room:
            self.prompts_cut += len(group)
            # the BOS a tokenizer (or a chat template) puts in front stays
            keep = self.num_prefix or int(self.chat.template is not None and room > 1
                                           and prompt_ids[0] == self.tokenizer.bos_token_id)
            prefix = prompt_ids[:keep]
            prompt_ids = prefix + prompt_ids[len(prompt_ids) - (room - len(prefix)):]
        return [(prompt_ids + completion_ids, len(prompt_ids)) for completion_ids in group]

    def fingerprint(self):
        tok = self.tokenizer
        backend = tok.backend_tokenizer.to_str() if getattr(tok, "is_fast", False) else repr(sorted(tok.get_vocab().items()))
        payload = [type(tok).__name__, backend, str(tok.special_tokens_map), self.max_seq_len, self.max_gen_len]
        if self.chat.template is not None:  # what renders conversational records
            payload.append(self.chat.template)  # with its date fixed, if it reads one
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


class Encoder:
    """Turns a batch of standard records into training examples (a `datasets.map` function).

    `check(record, index)` validates one record first, over the whole split, so a bad record
    stops the run before any tokenisation starts and nothing half-done is left behind.
    """

    def __init__(self, tok, source, kind):
        self.tok, self.source, self.kind = tok, source, kind
        self.warned = False

    def check(self, record, index):
        if is_conversation(record["prompt"]):
            self.tok.check_conversation(record, self.kind, self.source, index)
        elif not record["prompt"].strip() and self.tok.num_prefix == 0:
            raise InputError(f"{where(self.source, index, 'prompt')}: empty prompt and the tokenizer adds no BOS; "
                             "give every record a prompt")
        if record.get("completion_ids") is None:
            return
        if not self.tok.uses_ids(record):
            if not self.warned:  # once per file: every record of it usually shares the reason
                self.warned = True
                print(f"warning: {where(self.source, index, 'tokenizer_fingerprint')}: the completion ids come from "
                      f"tokenizer {record['tokenizer_fingerprint']} (of {record.get('source_model', '?')}), not "
                      f"this one ({self.tok.tokenizer_fingerprint}); its records are scored from their text + EOS, "
                      "which is not the sequence that was sampled", file=sys.stderr, flush=True)
            return
        vocab = len(self.tok.tokenizer)
        texts = record.get("completions") or []
        if len(texts) != len(record["completion_ids"]):
            raise InputError(f"{where(self.source, index, 'completion_ids')}: {len(record['completion_ids'])} lists of "
                             f"ids for {len(texts)} completions")
        for j, ids in enumerate(record["completion_ids"]):
            if max(ids) >= vocab:
                raise InputError(f"{where(self.source, index, 'completion_ids')}[{j}]: token id {max(ids)} is outside "
                                 f"the tokenizer's vocabulary of {vocab}")
        for j, ids in enumerate(record["completion_ids"]):
            text = texts[j]["content"] if isinstance(texts[j], dict) else texts[j]
            if not self.tok.ids_spell(ids, text):
                raise InputError(f"{where(self.source, index, f'completions[{j}]')}: the text is not what its "
                                 f"completion_ids decode to (edited after sampling?); the ids are what is scored, "
                                 "so fix both, or drop completion_ids and tokenizer_fingerprint to score the text")


class SFTEncoder(Encoder):
    """record -> {input_ids, prompt_len}: one prompt + chosen sequence."""

    def __call__(self, batch, indices):
        prompts = self.tok.prompts(batch["prompt"])
        completions = self.tok.completions(batch["chosen"], batch["prompt"])
        joined = [self.tok.join(p, c) for p, c in zip(prompts, completions)]
        return {"input_ids": [ids for ids, _ in joined], "prompt_len": [n for _, n in joined]}


class AlignmentEncoder(Encoder):
    """record -> C / K groups of K candidates {input_ids [K][T], prompt_lens [K], rewards [K]}.

    `pref` records become the pair (chosen, rejected) with rewards (1, 0). With pref labels
    every group needs a single best reward, since the winner is argmax r. `group_check`, if
    given, says why a group's rewards cannot train the loss (a string), or None where they can.
    """

    def __init__(self, tok, source, kind, num_contrastive, pref_labels, group_check=None):
        if kind not in ("pref", "rw"):
            raise InputError(f"{source}: alignment needs pref or rw data, got kind {kind!r}")
        super().__init__(tok, source, kind)
        self.num_contrastive, self.pref_labels, self.group_check = num_contrastive, pref_labels, group_check

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
            pair = ("; pref records hold one pair (chosen, rejected), so no ranking of more: use --num_contrastive 2, "
                    "or rw data with K scored candidates") if self.kind == "pref" else ""
            raise InputError(f"{at}: {len(texts)} candidates, fewer than --num_contrastive {k}{pair}")
        if len(texts) % k:
            raise InputError(f"{at}: {len(texts)} candidates is not a multiple of --num_contrastive {k}; "
                             "they are split into groups of K")
        for start in range(0, len(texts), k) if self.pref_labels else ():
            group = rewards[start:start + k]
            if group.count(max(group)) > 1:
                raise InputError(f"{where(self.source, index, 'rewards')}: candidates {start}..{start + k - 1} tie "
                                 "for the best reward; a pref loss needs one winner (use an -rw loss or drop the tie)")
        for start in range(0, len(texts), k) if self.group_check else ():
            reason = self.group_check(rewards[start:start + k])
            if reason:
                raise InputError(f"{where(self.source, index, 'rewards')}: candidates {start}..{start + k - 1}: {reason}")

    def __call__(self, batch, indices):
        out = {"input_ids": [], "prompt_lens": [], "rewards": []}
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        for prompt_ids, record in zip(self.tok.prompts(batch["prompt"]), records):
            texts, rewards = self.candidates(record)
            completions = self.tok.record_completions(record, texts)
            for start in range(0, len(texts), self.num_contrastive):
                group = slice(start, start + self.num_contrastive)
                joined = self.tok.join_group(prompt_ids, completions[group])
                out["input_ids"].append([ids for ids, _ in joined])
                out["prompt_lens"].append([n for _, n in joined])
                out["rewards"].append(rewards[group])
        return out


class PairEncoder(Encoder):
    """pref record -> {input_ids [2][T], prompt_lens [2]}: (prompt + chosen, prompt + rejected)
    by the Tokenisation rule (one group: the prompt is cut once, for the longer of the two),
    for the pairwise reward-model loss."""

    def __init__(self, tok, source, kind):
        if kind != "pref":
            raise InputError(f"{source}: a reward model trains on pref data (prompt, chosen, rejected), "
                             f"got kind {kind!r}")
        super().__init__(tok, source, kind)

    def __call__(self, batch, indices):
        prompts = self.tok.prompts(batch["prompt"])
        chosen = self.tok.completions(batch["chosen"], batch["prompt"])
        rejected = self.tok.completions(batch["rejected"], batch["prompt"])
        pairs = [self.tok.join_group(p, [c, r]) for p, c, r in zip(prompts, chosen, rejected)]
        return {"input_ids": [[ids for ids, _ in pair] for pair in pairs],
                "prompt_lens": [[n for _, n in pair] for pair in pairs]}


class ClassEncoder(Encoder):
    """class record -> {input_ids, label}: the text + EOS, cut on the right to max_seq_len.

    The EOS ends the text as it ends the completions the classifier later scores (scoring
    joins prompt + completion + EOS by the training rule, or takes a sample's ids, which end
    with EOS unless --max_new_tokens cut it), so the classifier sees texts much the way it will
    be asked about them. Labels are 0 or 1 (1 = positive)."""

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
# The cache directory (`--data_output_path`) may be one directory every node sees (a shared
# file system) or a directory on each node's own disk. Which it is, is found out once per run
# and directory: rank 0 leaves a marker there and every rank looks for it. Shared: global rank
# 0 builds each cache entry and the others wait and read it. Node-local: each node's local rank
# 0 builds into its own directory. A wrong answer costs time, never correctness: builds are
# committed atomically and a second builder of the same entry keeps the first one's copy.
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


def cache_key(raw, split, tok, encoding):
    """Hash of what the tokenised split depends on: data content, tokenizer, lengths, encoding."""
    digest = hashlib.sha256()
    meta = [CACHE_VERSION, type(raw).__module__, type(raw).__qualname__, raw.name, raw.kind, split,
            tok.fingerprint(), encoding]
    digest.update(json.dumps(meta, sort_keys=True).encode())
    files = raw.data_files(split)
    for path in files:
        digest.update(provenance.file_digest(path).encode())
    if not files:  # a custom dataset with no files to point at: key on its records
        digest.update(json.dumps(raw.records(split), sort_keys=True).encode())
    return digest.hexdigest()


def tokenised_split(raw, split, tok, cache_dir, encoding, make_encoder):
    """(dataset, cache key) of the tokenised `split` of `raw`; built and validated on a miss."""
    key = cache_key(raw, split, tok, encoding)
    path = os.path.join(cache_dir, f"{raw.name}_{raw.kind}_{split}_{key[:16]}")
    with cache_writer_first(cache_dir) as writer:
        problem = provenance.verify_dir(path) if writer and os.path.isdir(path) else None
        if problem:  # a cache entry damaged since it was written (its files' digests differ)
            print(f"{problem}: rebuilding this cache entry", flush=True)
            shutil.rmtree(path, ignore_errors=True)
        if writer and not os.path.isdir(path):
            records = raw.records(split)
            encoder = make_encoder(tok, raw.source(split), raw.kind)
            for index, record in enumerate(records):
                encoder.check(record, index)
            # from_list takes its columns from the first record; optional fields may start later
            fields = list(dict.fromkeys(field for record in records for field in record))
            records = datasets.Dataset.from_list([{field: r.get(field) for field in fields} for r in records])
            cut_before = tok.prompts_cut
            encoded = records.map(encoder, batched=True, with_indices=True,
                                  remove_columns=records.column_names, desc=f"tokenising {raw.name}/{raw.kind} {split}")
            if tok.prompts_cut > cut_before:
                # Never dropped: a prompt cut on the left still conditions the completion.
                print(f"{raw.source(split)}: {tok.prompts_cut - cut_before} sequences of {len(records)} records had "
                      f"their prompt cut on the left to fit --max_seq_len {tok.max_seq_len}", flush=True)
            tmp = atomic_dir(path)
            encoded.save_to_disk(tmp)
            provenance.record_dir(tmp, {"cache_key": key})
            commit_new_dir(tmp, path)
    return datasets.load_from_disk(path), key


def build_dataset(raw_datasets, split, tok, cache_dir, encoding, make_encoder):
    """Tokenise every dataset of `--data_name_path` and concatenate them.

    Returns (dataset, key); the key identifies the data for caches derived from it, such as
    the reference log-probs.
    """
    parts, keys = zip(*(tokenised_split(raw, split, tok, cache_dir, encoding, make_encoder) for raw in raw_datasets))
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(list(parts))
    return dataset, hashlib.sha256("".join(keys).encode()).hexdigest()
