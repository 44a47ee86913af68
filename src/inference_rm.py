"""Scoring stage: a reward model's reward of every sampled completion, as `rw` data or a summary.

    deepspeed --include localhost:0,1 src/inference_rm.py --model_name_or_path models/x_imdb/rm \\
        --data_path data/imdb_sft --split train --mode label     # writes data/imdb_rw/train.json

Reads `gen` data (DATA_PATH/SPLIT.json[l] or .parquet). Each prompt + completion is tokenised
by the training rule (the sampled ids where the record carries them from this model's
tokenizer; else text + EOS, or for a conversation the template's tokens up to the answer's
end-of-turn token; completion cut on the right to --max_gen_len, prompt on the left to fit
--max_seq_len) and scored by the one-label sequence classifier at its last non-pad token, the
way reward-model training scores it. Batched, sharded across ranks and resumable
(utils/sharding.py).

  label  writes `rw` records {prompt, completions, rewards} to DATA_PATH_rw/SPLIT.json, where a
         trailing `_sft` is dropped from DATA_PATH first (data/imdb_sft -> data/imdb_rw); the
         token-exact fields of a record (completion_ids, ...) are carried into it.
  eval   writes {mean, std, n, num_prompts, model, data} over all completions to
         DATA_PATH/SPLIT_reward_eval.json (std over completions, not of the mean).

Both modes print the mean and std.
"""
import os

from utils.data.raw_datasets import token_fields
from utils.fileio import atomic_write_json, cli_main
from utils.inference import parse_scoring_args, reward_summary, score_completions, start_scoring
from utils.model_utils import load_reward_model, model_fingerprint
from utils.prefix_sharing import resolve_prefix_sharing
from utils.reward_scoring import reward_scores
from utils.process_exit import run_and_exit


def parse_args(argv=None):
    return parse_scoring_args(__doc__, "reward model directory (AutoModelForSequenceClassification with one label)",
                              "label", "rw", argv, prefix_sharing=True)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    model, tokenizer, tokenisation, records, data_file, device = start_scoring(args, load_reward_model)

    prefix_sharing = resolve_prefix_sharing(args.prefix_sharing, model, "the reward model")

    def score(batch):
        return reward_scores(model, batch, prefix_sharing)

    if args.mode == "label":
        output_file = os.path.join(args.output_path, f"{args.split}.json")

        def write(rewards):
            atomic_write_json(output_file, [{"prompt": r["prompt"], "completions": r["completions"], **token_fields(r),
                                             "rewards": v} for r, v in zip(records, rewards)])
    else:
        output_file = os.path.join(args.output_path, f"{args.split}_reward_eval.json")

        def write(rewards):
            atomic_write_json(output_file, {**reward_summary(rewards), "model": args.model_name_or_path,
                                            "data": data_file})

    settings = {"stage": "reward", "model": model_fingerprint(args.model_name_or_path),
                "tokenisation": tokenisation.settings_fingerprint(), "dtype": args.dtype}
    rewards = score_completions(records, tokenisation, score, device, output_file, settings, args, write,
                                desc="scoring")
    if rewards is not None:
        summary = reward_summary(rewards)
        print(f"reward of {summary['n']} completions of {summary['num_prompts']} prompts: mean {summary['mean']:.4f} "
              f"std {summary['std']:.4f}; wrote {output_file}")


if __name__ == "__main__":
    run_and_exit(main)
