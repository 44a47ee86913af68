"""Oracle scoring: the classifier's log-odds of every sampled completion, as `pref` data or a summary.

    deepspeed --include localhost:0,1 src/inference_class.py --model_name_or_path models/x_imdb/class \\
        --data_path data/imdb_prefix10_sft --split train --mode label_pref   # writes data/imdb_prefix10_pref

Reads `gen` data (DATA_PATH/SPLIT.json[l] or .parquet). Each prompt + completion is tokenised by the
training rule (the sampled ids where the record carries them from this model's tokenizer, else
text + EOS) and scored by the one-logit classifier of train_class.py; its logit is the
log-odds log p(positive) - log p(negative), the oracle reward. Batched, sharded across ranks
and resumable, on the same scoring path as inference_rm.py (utils/inference.py).

  label_pref  writes `pref` records {prompt, chosen, rejected} to DATA_PATH_pref/SPLIT.json,
              where a trailing `_sft` is dropped from DATA_PATH first (data/x_sft ->
              data/x_pref): chosen is the completion with the highest log-odds, rejected the
              one with the lowest. A record whose completions all score the same (e.g.
              identical samples) gives no preference, and one whose best or worst is an
              empty sample cannot be pref text; both are skipped and counted.
  eval        writes {mean, std, n, num_prompts, model, data} of the log-odds over all
              completions to DATA_PATH/SPLIT_oracle_eval.json (std over completions).

For `rw` data with oracle rewards, score with inference_rm.py: the oracle is a reward model.
"""
import os

from utils.fileio import InputError, atomic_write_json, cli_main, where
from utils.inference import parse_scoring_args, reward_summary, score_completions, start_scoring
from utils.model_utils import load_reward_model, model_fingerprint
from utils.process_exit import run_and_exit


def parse_args(argv=None):
    return parse_scoring_args(__doc__, "oracle classifier directory (train_class.py output: one logit = log-odds "
                              "of positive)", "label_pref", "pref", argv)


def label_pref(records, scores):
    """(pref records, number skipped): chosen = highest log-odds, rejected = lowest; records
    whose completions all tie are skipped (no preference to learn from), and so are those whose
    chosen or rejected is an empty sample (EOS drawn first), which `pref` text cannot hold."""
    pairs, skipped = [], 0
    for record, values in zip(records, scores):
        best = max(range(len(values)), key=values.__getitem__)
        worst = min(range(len(values)), key=values.__getitem__)
        if values[best] == values[worst] or not (record["completions"][best] and record["completions"][worst]):
            skipped += 1
            continue
        pairs.append({"prompt": record["prompt"], "chosen": record["completions"][best],
                      "rejected": record["completions"][worst]})
    return pairs, skipped


def check_pairable(records, data_file):
    for index, record in enumerate(records):
        if len(record["completions"]) < 2:
            raise InputError(f"{where(data_file, index, 'completions')}: {len(record['completions'])} "
                             "completion; label_pref needs at least 2 per prompt (sample with --return_num 2+)")


@cli_main
def main(argv=None):
    args = parse_args(argv)
    model, tokenizer, tokenisation, records, data_file, device = start_scoring(
        args, load_reward_model, check_pairable if args.mode == "label_pref" else None)

    def score(batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]

    summary_line = ""
    if args.mode == "label_pref":
        output_file = os.path.join(args.output_path, f"{args.split}.json")

        def write(scores):
            nonlocal summary_line
            pairs, skipped = label_pref(records, scores)
            if not pairs:
                raise InputError(f"{data_file}: every record's completions tie under the oracle; no preference pairs")
            atomic_write_json(output_file, pairs)
            summary_line = (f"wrote {len(pairs)} pref records to {output_file}; skipped {skipped} whose completions "
                            "tie or whose best or worst is empty")
    else:
        output_file = os.path.join(args.output_path, f"{args.split}_oracle_eval.json")

        def write(scores):
            nonlocal summary_line
            atomic_write_json(output_file, {**reward_summary(scores), "model": args.model_name_or_path,
                                            "data": data_file})
            summary_line = f"wrote {output_file}"

    settings = {"stage": "oracle", "model": model_fingerprint(args.model_name_or_path),
                "tokenisation": tokenisation.settings_fingerprint(), "dtype": args.dtype}
    scores = score_completions(records, tokenisation, score, device, output_file, settings, args, write, desc="oracle")
    if scores is not None:
        summary = reward_summary(scores)
        print(f"oracle log-odds of {summary['n']} completions of {summary['num_prompts']} prompts: "
              f"mean {summary['mean']:.4f} std {summary['std']:.4f}; {summary_line}")


if __name__ == "__main__":
    run_and_exit(main)
