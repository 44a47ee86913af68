"""Sharded, resumable inference: what sampling, reward scoring and log-prob scoring share.

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

Scoring `gen` data (reward model, log-probs) tokenises every (prompt, completion) pair by the
training rule (utils/data/data_utils.py), so a score here is the score training computes: a
completion with its sampled ids (and the tokenizer that made them) is scored on those ids.
"""
import glob
import hashlib
import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm

from .data.collators import pad_sequences
from .data.data_utils import Encoder, Tokenisation
from .data.chat import add_chat_template_arg
from .data.raw_datasets import JsonDataset, MissingSplit
from .fileio import InputError, atomic_write_json
from .model_utils import check_position_limit, load_tokenizer
from .prefix_sharing import add_prefix_sharing_arg
from .args import base_parser
from .distributed import add_distributed_args, init_distributed, to_device

SHARD_DIR = ".shards"
# Ranks reach the merge at very different times (a resumed rank may have nothing left to do
# while another samples for hours), longer than the default group's 30-minute timeout.
MERGE_WAIT_TIMEOUT = timedelta(days=2)


# -- flags --------------------------------------------------------------------------------
def add_inference_args(parser):
    """Flags every inference script shares."""
    g = parser.add_argument_group("inference")
    g.add_argument("--batch_size", type=int, default=8, help="prompts (records) per batch on each rank")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="precision of the model")
    g.add_argument("--seed", type=int, default=1234,
                   help="seeds python, numpy and torch; sampling seeds each batch from it and the batch's position")
    g.add_argument("--save_interval", type=float, default=300,
                   help="seconds between saves of a rank's finished batches to its shard (0: after every batch); "
                        "a killed run loses at most this much work per rank")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="allow model code shipped inside the checkpoint directory to run")
    add_distributed_args(g)
    return parser


def add_gen_data_args(parser):
    """Flags of the scripts that score `gen` data (a completion per sequence, training's cuts)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data_path", required=True,
                   help="directory of gen data (SPLIT.json, .jsonl or .parquet of {prompt, completions}), "
                        "e.g. data/imdb_sft")
    g.add_argument("--split", default="test", choices=["train", "test"], help="which split file to score")
    g.add_argument("--max_seq_len", type=int, default=512,
                   help="prompt + completion tokens; the prompt is cut on the left")
    g.add_argument("--max_gen_len", type=int, default=256, help="completion tokens (EOS included); cut on the right")
    add_chat_template_arg(g)
    return parser


def check_inference_args(args, *positive):
    """Flag values that cannot work, caught before anything loads; `positive` names more flags that must be >= 1."""
    for name in ("batch_size", *positive):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.save_interval < 0:
        raise InputError(f"--save_interval must be non-negative, got {args.save_interval}")
    if args.seed < 0:
        raise InputError(f"--seed must be non-negative, got {args.seed}")


def check_output_dir(path, flag="--output_path"):
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path}: exists and is not a directory")


# -- sharding -----------------------------------------------------------------------------
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

    def __init__(self, output_file, key, rank, world_size, num_inputs):
        self.path, self.key = shard_path(output_file, key, rank, world_size), key
        self.start, self.stop = shard_range(num_inputs, rank, world_size)
        self.outputs, self.complete = read_shard(self.path, key)

    def save(self, complete=False):
        self.complete = complete
        atomic_write_json(self.path, {"run_key": self.key, "complete": complete, "start": self.start,
                                      "stop": self.stop, "outputs": self.outputs}, indent=None)


def _distributed():
    return dist.is_available() and dist.is_initialized()


def sharded_map(inputs, process_batch, output_file, settings, batch_size, write=None, desc="inference",
                save_interval=300, rank=None, world_size=None):
    """Run `process_batch` over `inputs` on every rank and return the outputs, in input order, on
    rank 0 (None elsewhere) once `write(outputs)` has stored them (default: a JSON list at
    `output_file`). Call on every rank with the same arguments.

    `process_batch(items, first_index)` gets consecutive inputs and the index of the first in
    `inputs`, and returns one JSON-serialisable output per item; `first_index` is what a
    sampler seeds from, so a resumed batch draws what it drew before. `settings` (JSON) and
    `batch_size` go into the run key. `rank` and `world_size` default to torch.distributed's.
    """
    if rank is None:
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    multi_rank = world_size > 1 and _distributed()
    # created up front, when every rank is here: new_group is itself collective
    wait_group = dist.new_group(backend="gloo", timeout=MERGE_WAIT_TIMEOUT) if multi_rank else None
    key = run_key(inputs, {**settings, "batch_size": batch_size})
    if rank == 0:
        sizes = ", ".join(str(b - a) for a, b in (shard_range(len(inputs), r, world_size) for r in range(world_size)))
        tqdm.write(f"{desc}: {len(inputs)} inputs on {world_size} rank(s) ({sizes} each), batch {batch_size}, "
                   f"run key {key}")

    shard = Shard(output_file, key, rank, world_size, len(inputs))
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
    if rank != 0:
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


# -- gen data, scored by the training rule ------------------------------------------------
def labelled_dir(data_path, kind):
    """Where labelled data goes beside the `gen` data it came from (README: The pipeline): a
    trailing `_sft` gives way to `_KIND` (data/imdb_sft -> data/imdb_rw); other names gain it."""
    path = os.path.normpath(data_path)
    return (path[:-len("_sft")] if path.endswith("_sft") else path) + f"_{kind}"


def parse_scoring_args(doc, model_help, label_mode, label_kind, argv=None, prefix_sharing=False):
    """Flags of a scoring stage (inference_rm, inference_class): the inference and data flags,
    the scorer, `--mode LABEL_MODE|eval` and `--output_path`, which defaults to the data's
    `_LABEL_KIND` sibling when labelling and to the data directory itself for eval; and
    --prefix_sharing where asked."""
    parser = add_gen_data_args(add_inference_args(base_parser(doc.split("\n\n")[0])))
    g = parser.add_argument_group("scoring")
    g.add_argument("--model_name_or_path", required=True, help=model_help)
    g.add_argument("--mode", default=label_mode, choices=[label_mode, "eval"],
                   help=f"{label_mode}: write {label_kind} data; eval: write the mean and std of the scores")
    g.add_argument("--output_path", default=None,
                   help=f"output directory; default DATA_PATH minus _sft plus _{label_kind} ({label_mode}) "
                        "or DATA_PATH (eval)")
    if prefix_sharing:
        add_prefix_sharing_arg(g)
    args = parser.parse_args(argv)
    check_inference_args(args, "max_seq_len", "max_gen_len")
    if args.output_path is None:
        args.output_path = labelled_dir(args.data_path, label_kind) if args.mode == label_mode else args.data_path
    check_output_dir(args.output_path)
    if args.mode == label_mode and os.path.abspath(args.output_path) == os.path.abspath(args.data_path):
        raise InputError(f"--output_path {args.output_path}: would overwrite the gen data being scored")
    return args


def start_scoring(args, load_model, check_records=None):
    """What calc_logprobs, inference_rm and inference_class do first: join the ranks, load the
    tokenizer, the `gen` records (under the training tokenisation rule) and the frozen model, on
    its device. `check_records(records, data_file)` is a stage's own validation, run before the
    model loads so that bad data fails fast. Returns (model, tokenizer, tok, records, data_file,
    device)."""
    check_position_limit(args.model_name_or_path, args.max_seq_len, "--max_seq_len", args.trust_remote_code)
    device = init_distributed(args)
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    tok = Tokenisation(tokenizer, args.max_seq_len, args.max_gen_len, args.chat_template)
    records, data_file = load_gen_records(args.data_path, args.split, tok)
    if check_records is not None:
        check_records(records, data_file)
    model = load_model(args.model_name_or_path, tokenizer, args.dtype, args.trust_remote_code,
                       disable_dropout=True).to(device).eval()
    return model, tokenizer, tok, records, data_file, device


def load_gen_records(data_path, split, tok):
    """Validated {prompt, completions} records of DATA_PATH/SPLIT.{json,jsonl,parquet} (other fields, such as
    rewards, are ignored), each prompt checked as training checks it."""
    if not os.path.isdir(data_path):
        raise InputError(f"--data_path {data_path}: no such directory")
    source = JsonDataset(os.path.basename(os.path.normpath(data_path)), data_path, "gen")
    try:
        path = source.split_file(split)
    except MissingSplit:
        raise InputError(f"--data_path {data_path}: no {split}.json, {split}.jsonl or {split}.parquet") from None
    records = source.records(split)
    check_prompts(records, tok, path)
    return records, path


def check_prompts(records, tok, source):
    """Every prompt must give the model something to condition on, as training requires."""
    encoder = Encoder(tok, source, "gen")
    for index, record in enumerate(records):
        encoder.check(record, index)


def completion_sequences(tok, records):
    """(token ids, prompt length) of every (prompt, completion) pair of `records`, record-major,
    cut by the training rule: the sampled ids where a record carries them, else text + EOS."""
    sequences, prompt_lens = [], []
    for prompt_ids, record in zip(tok.prompts(r["prompt"] for r in records), records):
        for completion_ids in tok.record_completions(record):
            ids, prompt_len = tok.join(prompt_ids, completion_ids)
            sequences.append(ids)
            prompt_lens.append(prompt_len)
    return sequences, prompt_lens


def completion_batch(tok, records):
    """completion_sequences as one right-padded batch (input_ids, attention_mask, loss_mask on
    the completion's tokens); `group_sizes` counts each record's completions, the rows that
    continue one prompt."""
    batch = pad_sequences(*completion_sequences(tok, records), tok.tokenizer.pad_token_id)
    batch["group_sizes"] = [len(record["completions"]) for record in records]
    return batch


def scored_tokens(ids, prompt_len):
    """16 hex digits naming a scored sequence: its token ids and where its completion starts, so
    two files of log-probs can show they scored the same tokens."""
    return hashlib.sha256(json.dumps([prompt_len, ids]).encode()).hexdigest()[:16]


def record_scored_tokens(tok, records):
    """scored_tokens of every completion of `records`, one list per record."""
    return per_record([scored_tokens(ids, n) for ids, n in zip(*completion_sequences(tok, records))], records)


def per_record(values, records):
    """A flat list of per-completion values, record-major -> one list per record."""
    out, position = [], 0
    for record in records:
        out.append(values[position:position + len(record["completions"])])
        position += len(record["completions"])
    return out


def score_completions(records, tok, score, device, output_file, settings, args, write, desc):
    """sharded_map over gen records, one number per completion: `score(batch)` maps a
    completion_batch on `device` to a [N] tensor. Returns per-record lists on rank 0."""

    @torch.no_grad()
    def process(batch_records, first_index):
        batch = to_device(completion_batch(tok, batch_records), device)
        return per_record(score(batch).float().cpu().tolist(), batch_records)

    return sharded_map(records, process, output_file, settings, args.batch_size, write=write, desc=desc,
                       save_interval=args.save_interval)
