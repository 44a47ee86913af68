"""What the inference stages share besides the sharded map (utils/sharding.py): their flags,
and `gen` data scored by the training rule.

Scoring `gen` data (reward model, log-probs) tokenises every (prompt, completion) pair by the
training rule (utils/data/tokenisation.py), so a score here is the score training computes: a
completion with its sampled ids (and the tokenizer that made them) is scored on those ids.
"""
import hashlib
import json
import math
import os

import torch

from .data.collators import pad_sequences
from .data.encoders import Encoder
from .data.tokenisation import Tokenisation
from .data.chat import add_chat_template_arg
from .data.raw_datasets import JsonDataset, MissingSplit
from .fileio import InputError
from .model_utils import check_position_limit, load_tokenizer
from .prefix_sharing import add_prefix_sharing_arg
from .args import base_parser
from .distributed import add_distributed_args, init_distributed, to_device
from .sharding import sharded_map


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


# -- gen data, scored by the training rule ------------------------------------------------
def labelled_dir(data_path, kind):
    """Where labelled data goes beside the `gen` data it came from (docs/pipeline.md): a
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
    model loads so that bad data fails fast. Returns (model, tokenizer, tokenisation, records, data_file,
    device)."""
    check_position_limit(args.model_name_or_path, args.max_seq_len, "--max_seq_len", args.trust_remote_code)
    device = init_distributed(args)
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    tokenisation = Tokenisation(tokenizer, args.max_seq_len, args.max_gen_len, args.chat_template,
                                args.chat_template_date)
    records, data_file = load_gen_records(args.data_path, args.split, tokenisation)
    if check_records is not None:
        check_records(records, data_file)
    model = load_model(args.model_name_or_path, tokenizer, args.dtype, args.trust_remote_code,
                       disable_dropout=True).to(device).eval()
    return model, tokenizer, tokenisation, records, data_file, device


def load_gen_records(data_path, split, tokenisation):
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
    check_prompts(records, tokenisation, path)
    return records, path


def check_prompts(records, tokenisation, source):
    """Every prompt must give the model something to condition on, as training requires."""
    encoder = Encoder(tokenisation, source, "gen")
    for index, record in enumerate(records):
        encoder.check(record, index)


def completion_sequences(tokenisation, records):
    """(token ids, prompt length) of every (prompt, completion) pair of `records`, record-major,
    cut by the training rule (a record's completions are one group: its prompt is cut once):
    the sampled ids where a record carries them, else text + EOS."""
    sequences, prompt_lens = [], []
    for prompt_ids, record in zip(tokenisation.prompts(r["prompt"] for r in records), records):
        for ids, prompt_len in tokenisation.join_group(prompt_ids, tokenisation.record_completions(record)):
            sequences.append(ids)
            prompt_lens.append(prompt_len)
    return sequences, prompt_lens


def completion_batch(tokenisation, records):
    """completion_sequences as one right-padded batch (input_ids, attention_mask, loss_mask on
    the completion's tokens); `group_sizes` counts each record's completions, the rows that
    continue one prompt."""
    batch = pad_sequences(*completion_sequences(tokenisation, records), tokenisation.tokenizer.pad_token_id)
    batch["group_sizes"] = [len(record["completions"]) for record in records]
    return batch


def scored_tokens(ids, prompt_len):
    """16 hex digits naming a scored sequence: its token ids and where its completion starts, so
    two files of log-probs can show they scored the same tokens."""
    return hashlib.sha256(json.dumps([prompt_len, ids]).encode()).hexdigest()[:16]


def record_scored_tokens(tokenisation, records):
    """scored_tokens of every completion of `records`, one list per record."""
    return per_record([scored_tokens(ids, n) for ids, n in zip(*completion_sequences(tokenisation, records))], records)


def per_record(values, records):
    """A flat list of per-completion values, record-major -> one list per record."""
    out, position = [], 0
    for record in records:
        out.append(values[position:position + len(record["completions"])])
        position += len(record["completions"])
    return out


def score_completions(records, tokenisation, score, device, output_file, settings, args, write, desc):
    """sharded_map over gen records, one number per completion: `score(batch)` maps a
    completion_batch on `device` to a [N] tensor. Returns per-record lists on rank 0."""

    @torch.no_grad()
    def process(batch_records, first_index):
        batch = to_device(completion_batch(tokenisation, batch_records), device)
        return per_record(score(batch).float().cpu().tolist(), batch_records)

    return sharded_map(records, process, output_file, settings, args.batch_size, write=write, desc=desc,
                       save_interval=args.save_interval)


def reward_summary(rewards):
    """{mean, std, n, num_prompts} of per-record lists of scores: over all completions (std
    of the completions, not of the mean), what the scoring stages' eval mode writes."""
    flat = [r for per_record in rewards for r in per_record]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((r - mean) ** 2 for r in flat) / len(flat))
    return {"mean": mean, "std": std, "n": len(flat), "num_prompts": len(rewards)}
