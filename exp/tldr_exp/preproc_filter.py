"""The filtered TL;DR corpus (e.g. UCL-DARK/openai-tldr-filtered) -> `sft` data.

    python exp/tldr_exp/preproc_filter.py /path/to/openai-tldr-filtered [--output_dir exp/tldr_exp/data/tldr_filtered]

PATH holds train.jsonl and test.jsonl (one post a line with subreddit, title, post and
summary). Each post becomes {"prompt": "SUBREDDIT: r/<subreddit>\\nTITLE: <title>\\nPOST:
<post>\\nTL;DR:", "chosen": " <summary>"}, the prompt format of preproc_pref.py. Skipped and
counted: empty posts and empty summaries.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from preproc_pref import tldr_prompt  # noqa: E402
from utils.data.preproc_utils import Skips, field, read_json_lines, write_datasets  # noqa: E402
from utils.fileio import InputError, cli_main  # noqa: E402


def post_to_sft(record, path, index, skips, split):
    subreddit, title, post, summary = (field(record, path, index, name)
                                       for name in ("subreddit", "title", "post", "summary"))
    if not post.strip():
        skips.add(split, "empty post")
        return None
    if not summary.strip():
        skips.add(split, "empty summary")
        return None
    return {"prompt": tldr_prompt(subreddit, title, post), "chosen": " " + summary.strip()}


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="directory with train.jsonl and test.jsonl of the filtered corpus")
    parser.add_argument("--output_dir", default=str(Path(__file__).resolve().parent / "data" / "tldr_filtered"),
                        help="where the sft data is written")
    args = parser.parse_args(argv)
    skips, data = Skips(), {}
    for split in ("train", "test"):
        path = os.path.join(args.path, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such file; export the corpus' train and test splits as "
                             "train.jsonl and test.jsonl")
        records = (post_to_sft(r, path, i, skips, split) for i, r in enumerate(read_json_lines(path)))
        data[split] = [r for r in records if r is not None]
    skips.report({split: len(records) for split, records in data.items()})
    write_datasets({args.output_dir: data}, {args.output_dir: "sft"})


if __name__ == "__main__":
    main()
