"""TL;DR human comparisons (openai/summarize_from_feedback, "comparisons") -> `pref` data.

    python exp/tldr_exp/preproc_pref.py /path/to/summarize_from_feedback [--output_dir exp/tldr_exp/data/tldr]

PATH holds train.json and test.json as `datasets` exports them (JSON lines: one comparison a
line, with info.{id,post,title,subreddit}, summaries[{text,policy,note}] and choice, the index
of the summary the labeller preferred). Each comparison becomes

    {"prompt": "SUBREDDIT: r/<subreddit>\\nTITLE: <title>\\nPOST: <post>\\nTL;DR:",
     "chosen": " <preferred summary>", "rejected": " <other summary>"}

with surrounding whitespace stripped from every field first. Skipped and counted: comparisons
of news articles (no reddit post: the CNN/DM part of the validation data), empty summaries and
two identical summaries (no preference to learn).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from utils.data.preproc_utils import Skips, field, read_json_lines, write_datasets  # noqa: E402
from utils.fileio import InputError, cli_main, where  # noqa: E402


def tldr_prompt(subreddit, title, post):
    """The prompt format of the TL;DR experiments (Stiennon et al. 2020, and the EXO paper)."""
    return f"SUBREDDIT: r/{subreddit.strip()}\nTITLE: {title.strip()}\nPOST: {post.strip()}\nTL;DR:"


def comparison_to_pref(record, path, index, skips, split):
    post = field(record, path, index, "info", "post", nullable=True)
    if post is None or not post.strip():
        skips.add(split, "no reddit post (a news article comparison)")
        return None
    title = field(record, path, index, "info", "title")
    subreddit = field(record, path, index, "info", "subreddit")
    summaries = field(record, path, index, "summaries", kind=list)
    choice = field(record, path, index, "choice", kind=int)
    if len(summaries) != 2:
        raise InputError(f"{where(path, index, 'summaries')}: expected 2 summaries, got {len(summaries)}")
    if choice not in (0, 1):
        raise InputError(f"{where(path, index, 'choice')}: expected 0 or 1, got {choice}")
    texts = [field(record, path, index, "summaries", j, "text").strip() for j in (0, 1)]
    if not all(texts):
        skips.add(split, "empty summary")
        return None
    if texts[0] == texts[1]:
        skips.add(split, "identical summaries")
        return None
    return {"prompt": tldr_prompt(subreddit, title, post), "chosen": " " + texts[choice],
            "rejected": " " + texts[1 - choice]}


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="directory with train.json and test.json (JSON lines) of the comparisons")
    parser.add_argument("--output_dir", default=str(Path(__file__).resolve().parent / "data" / "tldr"),
                        help="where the pref data is written")
    args = parser.parse_args(argv)
    skips, data = Skips(), {}
    for split in ("train", "test"):
        path = os.path.join(args.path, f"{split}.json")
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such file; export the comparisons' train and validation splits as "
                             "train.json and test.json")
        records = (comparison_to_pref(r, path, i, skips, split) for i, r in enumerate(read_json_lines(path)))
        data[split] = [r for r in records if r is not None]
    skips.report({split: len(records) for split, records in data.items()})
    write_datasets({args.output_dir: data}, {args.output_dir: "pref"})


if __name__ == "__main__":
    main()
