"""The quickstart's oracle reward: VADER's sentiment compound score of the whole review.

The paper's IMDB experiment labels preferences with, and evaluates against, a fixed sentiment
classifier that the policy never sees; here VADER (a rule-based scorer from the
`vaderSentiment` package, no download) plays that part. The reward of a completion is the
compound score in [-1, 1] of prompt + completion, the review as a reader sees it.

    python exp/quickstart/oracle.py label GEN_DIR PREF_DIR   # gen data -> oracle pref pairs
    python exp/quickstart/oracle.py eval GEN_FILE OUT_JSON   # mean oracle reward of samples
"""
import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from utils.data.raw_datasets import SPLITS, JsonDataset  # noqa: E402
from utils.fileio import InputError, atomic_dir, atomic_write_json, cli_main, commit_dir  # noqa: E402

_analyzer = None


def oracle_rewards(prompt, completions):
    """VADER compound score of prompt + completion, for each completion."""
    global _analyzer
    if _analyzer is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        _analyzer = SentimentIntensityAnalyzer()
    return [_analyzer.polarity_scores(prompt + completion)["compound"] for completion in completions]


def preference_pairs(records):
    """One pref record per prompt: its best against its worst completion by oracle reward.
    Prompts whose completions all score the same carry no preference and are left out, and so
    are those whose best or worst is an empty sample (EOS drawn first), which `pref` text cannot
    hold: the rule inference_class's label_pref follows."""
    pairs = []
    for record in records:
        rewards = oracle_rewards(record["prompt"], record["completions"])
        best = max(range(len(rewards)), key=rewards.__getitem__)
        worst = min(range(len(rewards)), key=rewards.__getitem__)
        if rewards[best] > rewards[worst] and record["completions"][best] and record["completions"][worst]:
            pairs.append({"prompt": record["prompt"], "chosen": record["completions"][best],
                          "rejected": record["completions"][worst]})
    return pairs


def gen_file_records(gen_file):
    """The records of one gen data file (e.g. samples/test.json), checked as gen data."""
    return JsonDataset("samples", os.path.dirname(gen_file), "gen").records(
        os.path.splitext(os.path.basename(gen_file))[0])


def write_data(out_dir, records_by_split):
    """{split: records} as OUT_DIR/<split>.json, the directory written whole (atomically)."""
    tmp = atomic_dir(out_dir)
    for split, records in records_by_split.items():
        atomic_write_json(os.path.join(tmp, f"{split}.json"), records)
    commit_dir(tmp, out_dir)


def label_pref(gen_dir, pref_dir):
    """gen data (train and test) -> oracle-labelled pref data in `pref_dir`, written whole."""
    source = JsonDataset(os.path.basename(os.path.normpath(gen_dir)), gen_dir, "gen")
    labelled = {}
    for split in SPLITS:
        labelled[split] = preference_pairs(source.records(split))
        if not labelled[split]:
            raise InputError(f"{source.split_file(split)}: no prompt has completions of different oracle reward")
    write_data(pref_dir, labelled)
    return {split: len(pairs) for split, pairs in labelled.items()}


def label_rewards(gen_file, rw_dir):
    """The oracle rewards of a gen file's completions, written whole as rw data RW_DIR/test.json."""
    write_data(rw_dir, {"test": [
        {"prompt": r["prompt"], "completions": r["completions"], "rewards": oracle_rewards(r["prompt"], r["completions"])}
        for r in gen_file_records(gen_file)]})


def relabel_rw(rw_dir, out_dir):
    """rw data with the oracle's rewards in place of the reward model's: every other field (the
    sampled ids among them) kept, so a run on it differs from one on RW_DIR only by its labels."""
    source = JsonDataset(os.path.basename(os.path.normpath(rw_dir)), rw_dir, "rw")
    write_data(out_dir, {split: [{**r, "rewards": oracle_rewards(r["prompt"], r["completions"])}
                                 for r in source.records(split)] for split in SPLITS})


def reward_summary(gen_file):
    """{mean, std, n}: the oracle reward over every completion of a gen file."""
    rewards = [r for record in gen_file_records(gen_file) for r in oracle_rewards(record["prompt"], record["completions"])]
    if not rewards:
        raise InputError(f"{gen_file}: no completions")
    mean = sum(rewards) / len(rewards)
    return {"mean": mean, "std": math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)), "n": len(rewards)}


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    label = sub.add_parser("label", help="best-vs-worst oracle preference pairs from gen data")
    label.add_argument("gen_dir", help="gen data directory with train.json and test.json")
    label.add_argument("pref_dir", help="where to write the pref data")
    evaluate = sub.add_parser("eval", help="mean and std of the oracle reward of a gen file")
    evaluate.add_argument("gen_file", help="a gen data file, e.g. samples/test.json")
    evaluate.add_argument("output_path", help="JSON file for {mean, std, n}")
    args = parser.parse_args(argv)
    if args.command == "label":
        counts = label_pref(args.gen_dir, args.pref_dir)
        print(f"wrote {counts['train']} train and {counts['test']} test oracle preference pairs to {args.pref_dir}")
    else:
        summary = reward_summary(args.gen_file)
        atomic_write_json(args.output_path, summary)
        print(f"oracle reward of {summary['n']} completions: mean {summary['mean']:.4f} std {summary['std']:.4f}")


if __name__ == "__main__":
    main()
