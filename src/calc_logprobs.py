"""Log-probs of sampled completions under a model: `gen` data plus "logps" per completion.

    python src/calc_logprobs.py --model_name_or_path models/x_imdb/sft --data_path results/policy_sft \\
        --split test --output_path results/policy_sft/test_logps_sft.json

Each record of DATA_PATH/SPLIT.json[l] (or .parquet) comes back with its fields (prompt, completions and the
token-exact fields it carries) and "logps", "temp" and "scored_tokens": logps[i] = log
pi^temp(completion_i | prompt) summed over the completion's tokens, the log-probs whose
differences are EXO's h. The completion is its sampled ids as they are when the record carries
them from this model's tokenizer (a tokenizer that differs falls back to text + EOS, with a
warning), else its text + EOS (a conversation's answer: the template's tokens for that turn, up to its end-of-turn token); then the training rule's cuts (--max_gen_len on the right, the
prompt on the left to fit --max_seq_len). "temp" is the --temp scored at and scored_tokens[i]
a digest of the token sequence scored, so eval_kl.py can refuse two files that scored
different tokens or temperatures. For a KL estimate score the samples at the temperature they
were sampled at. Batched, sharded across ranks and resumable (utils/sharding.py).
"""
import os
import re

from utils.fileio import InputError, atomic_write_json, cli_main
from utils.data.raw_datasets import token_fields
from utils.inference import (add_gen_data_args, add_inference_args, check_inference_args, record_scored_tokens,
                             score_completions, start_scoring)
from utils.logprobs import add_fused_logprobs_arg, model_sequence_logprobs
from utils.model_utils import load_causal_lm, model_fingerprint
from utils.prefix_sharing import add_prefix_sharing_arg, resolve_prefix_sharing
from utils.args import base_parser
from utils.process_exit import run_and_exit


def default_output(data_path, split, model_path):
    """DATA_PATH/SPLIT_logps_<model path with separators as _>.json, one file per scoring model."""
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", os.path.normpath(model_path)).strip("_.")
    return os.path.join(data_path, f"{split}_logps_{slug}.json")


def parse_args(argv=None):
    parser = add_gen_data_args(add_inference_args(base_parser(__doc__.split("\n\n")[0])))
    g = parser.add_argument_group("log-probs")
    g.add_argument("--model_name_or_path", required=True, help="causal LM whose log-probs to compute")
    g.add_argument("--temp", type=float, default=1.0,
                   help="logits are divided by this temperature; for a KL estimate, the --temp the samples were drawn at")
    add_fused_logprobs_arg(g)
    g.add_argument("--output_path", default=None,
                   help="output JSON file; default DATA_PATH/SPLIT_logps_<MODEL PATH with / as _>.json")
    add_prefix_sharing_arg(g)
    args = parser.parse_args(argv)
    check_inference_args(args, "max_seq_len", "max_gen_len")
    if args.temp <= 0:
        raise InputError(f"--temp must be positive, got {args.temp}")
    args.output_path = args.output_path or default_output(args.data_path, args.split, args.model_name_or_path)
    if os.path.isdir(args.output_path):
        raise InputError(f"--output_path {args.output_path}: is a directory; name the output file")
    return args


@cli_main
def main(argv=None):
    args = parse_args(argv)
    model, tokenizer, tokenisation, records, _, device = start_scoring(args, load_causal_lm)
    prefix_sharing = resolve_prefix_sharing(args.prefix_sharing, model)

    def write(logps):
        atomic_write_json(args.output_path, [{"prompt": r["prompt"], "completions": r["completions"], **token_fields(r),
                                              "logps": v, "temp": args.temp, "scored_tokens": t}
                                             for r, v, t in zip(records, logps,
                                                                 record_scored_tokens(tokenisation, records))])

    settings = {"stage": "logprobs", "model": model_fingerprint(args.model_name_or_path),
                "tokenisation": tokenisation.settings_fingerprint(), "temp": args.temp, "dtype": args.dtype}

    def logps_of(batch):
        return model_sequence_logprobs(model, batch, args.temp, args.fused_logprobs, prefix_sharing)

    logps = score_completions(records, tokenisation, logps_of, device, args.output_path, settings, args, write,
                              desc="log-probs")
    if logps is not None:
        print(f"wrote log-probs of {sum(map(len, logps))} completions of {len(logps)} prompts to {args.output_path}")


if __name__ == "__main__":
    run_and_exit(main)
