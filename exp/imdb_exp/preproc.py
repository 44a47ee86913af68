"""IMDB (aclImdb) -> the oracle's class data and the SFT model's prefix-completion data.

    python exp/imdb_exp/preproc.py --raw /path/to/aclImdb --tokenizer /path/to/gpt2-large \\
        [--prefix_len 10] [--output_dir exp/imdb_exp/data]

Reads the review files of the extracted aclImdb_v1.tar.gz, `{train,test}/{pos,neg}/<id>_<rating>.txt`
(`unsup/` and every other file are ignored), turns the HTML line breaks `<br />` into newlines
and writes

  OUTPUT_DIR/imdb_class/     `class` records {text, label}, label 1 = positive (pos/), 0 = negative;
  OUTPUT_DIR/imdb_prefixN/   `sft` records {prompt, chosen}: prompt = the first N tokens of the
                             review under --tokenizer, chosen = the rest (prompt + chosen is the
                             review, character for character).

Reviews are read in order of their numeric id. The test split of imdb_prefixN interleaves
positive and negative reviews (pos, neg, pos, ...) in an order shuffled with --seed, so the
first K test prompts (e.g. --prompt_num 512 when decoding) are balanced; the leftover of the
larger class follows at the end. Skipped and counted: empty reviews, and for imdb_prefixN the
reviews of at most N tokens (nothing left to complete). A rating that contradicts its
directory (pos needs 7-10, neg 1-4) is an error.
"""
import argparse
import os
import random
import re
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from utils.data.preproc_utils import Skips, write_datasets  # noqa: E402
from utils.fileio import InputError, cli_main, where  # noqa: E402
from utils.model_utils import load_tokenizer  # noqa: E402

REVIEW_FILE = re.compile(r"(\d+)_(\d+)\.txt")
LABELS = {"pos": 1, "neg": 0}
RATINGS = {"pos": range(7, 11), "neg": range(1, 5)}  # aclImdb's README: >= 7 positive, <= 4 negative


def clean(text):
    return text.replace("<br />", "\n").strip()


def read_reviews(raw, split, sentiment, skips):
    """[(id, text)] of RAW/SPLIT/SENTIMENT in id order; non-review files are skipped and counted."""
    directory = os.path.join(raw, split, sentiment)
    if not os.path.isdir(directory):
        raise InputError(f"{directory}: no such directory; --raw must be the extracted aclImdb directory")
    reviews = []
    for name in tqdm(sorted(os.listdir(directory)), desc=f"{split}/{sentiment}", dynamic_ncols=True):
        match = REVIEW_FILE.fullmatch(name)
        path = os.path.join(directory, name)
        if not match or not os.path.isfile(path):
            skips.add(split, f"{split}/{sentiment}: not a <id>_<rating>.txt review file")
            continue
        if int(match[2]) not in RATINGS[sentiment]:
            raise InputError(f"{where(path, field='rating')}: rating {match[2]} in {sentiment}/ "
                             f"(expected {RATINGS[sentiment].start}-{RATINGS[sentiment].stop - 1})")
        try:
            with open(path, encoding="utf-8") as f:
                text = clean(f.read())
        except UnicodeDecodeError as err:
            raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        if not text:
            skips.add(split, "empty review")
            continue
        reviews.append((int(match[1]), text))
    return [text for _, text in sorted(reviews)]


def split_prefix(tokenizer, text, ids, prefix_len):
    """(prompt, completion) with prompt = the first `prefix_len` tokens, as text. The prompt
    grows by a token while its decoding is not a prefix of the text (a token boundary inside
    a multi-byte character), so prompt + completion is always exactly the review."""
    for n in range(prefix_len, len(ids)):
        prompt = tokenizer.decode(ids[:n])
        if text.startswith(prompt):
            return prompt, text[len(prompt):]
    return text, ""


def interleave(positive, negative, seed):
    """pos, neg, pos, neg, ... each class shuffled with `seed`; the longer one's rest at the end."""
    rng = random.Random(seed)
    positive, negative = positive[:], negative[:]
    rng.shuffle(positive)
    rng.shuffle(negative)
    mixed = [r for pair in zip(positive, negative) for r in pair]
    n = min(len(positive), len(negative))
    return mixed + positive[n:] + negative[n:]


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True, help="the extracted aclImdb directory (train/, test/)")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer (HF directory) that counts the prompt's tokens: the policy's, e.g. gpt2-large")
    parser.add_argument("--prefix_len", type=int, default=10, help="prompt length in tokens (the paper: 10)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the test split's interleaved order")
    parser.add_argument("--output_dir", default=str(Path(__file__).resolve().parent / "data"),
                        help="where imdb_class/ and imdb_prefixN/ are written")
    args = parser.parse_args(argv)
    if args.prefix_len < 1:
        raise InputError(f"--prefix_len must be at least 1, got {args.prefix_len}")
    if not os.path.isdir(args.raw):
        raise InputError(f"--raw {args.raw}: no such directory")
    tokenizer = load_tokenizer(args.tokenizer)

    skips = Skips()
    reviews = {(split, s): read_reviews(args.raw, split, s, skips) for split in ("train", "test") for s in LABELS}
    class_data, prefix_data, kept = {}, {}, {}
    for split in ("train", "test"):
        class_data[split] = [{"text": text, "label": LABELS[s]} for s in LABELS for text in reviews[split, s]]
        by_sentiment = {}
        for s in LABELS:
            texts = reviews[split, s]
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            by_sentiment[s] = []
            for text, text_ids in zip(texts, ids):
                prompt, completion = split_prefix(tokenizer, text, text_ids, args.prefix_len)
                if not completion.strip():
                    skips.add(split, f"imdb_prefix{args.prefix_len}: review of at most {args.prefix_len} tokens")
                    continue
                by_sentiment[s].append({"prompt": prompt, "chosen": completion})
        if split == "test":
            prefix_data[split] = interleave(by_sentiment["pos"], by_sentiment["neg"], args.seed)
        else:
            prefix_data[split] = by_sentiment["pos"] + by_sentiment["neg"]
        kept[split] = len(class_data[split])
        kept[f"{split} (imdb_prefix{args.prefix_len})"] = len(prefix_data[split])
    skips.report(kept)

    class_dir = os.path.join(args.output_dir, "imdb_class")
    prefix_dir = os.path.join(args.output_dir, f"imdb_prefix{args.prefix_len}")
    write_datasets({class_dir: class_data, prefix_dir: prefix_data}, {class_dir: "class", prefix_dir: "sft"})


if __name__ == "__main__":
    main()
