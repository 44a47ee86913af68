"""Raw data of the three paper recipes in their real formats, small enough for tests.

Each writer makes the files a user downloads (aclImdb's tree, the TL;DR comparisons and
filtered corpus as `datasets` exports them, hh-rlhf's JSON lines), with the quirks the
preprocessors must handle, and returns the directory.
"""
import json
import os
import random

POSITIVE = ["great", "wonderful", "moving", "brilliant", "fun"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "weak"]
NEUTRAL = "the film movie story plot acting scene was and it a this with very of".split()


def _review(rng, sentiment_words, n_words):
    words = [rng.choice(NEUTRAL) for _ in range(n_words)]
    for _ in range(max(2, n_words // 4)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(sentiment_words))
    return " ".join(words).capitalize() + "."


def write_aclimdb(root, n_per_class=(12, 8), seed=0):
    """aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt reviews with <br /> breaks, plus unsup/,
    a stray non-review file and one review too short to complete. n_per_class: (train, test)."""
    rng = random.Random(seed)
    base = os.path.join(root, "aclImdb")
    for split, n in zip(("train", "test"), n_per_class):
        for sentiment, words, ratings in (("pos", POSITIVE, (7, 10)), ("neg", NEGATIVE, (1, 4))):
            directory = os.path.join(base, split, sentiment)
            os.makedirs(directory)
            for i in range(n):
                text = _review(rng, words, rng.randint(14, 30)) + "<br /><br />" + _review(rng, words, 8)
                with open(os.path.join(directory, f"{i}_{rng.randint(*ratings)}.txt"), "w") as f:
                    f.write(text)
        with open(os.path.join(base, split, "urls_pos.txt"), "w") as f:
            f.write("http://www.imdb.com/title/tt0000000/usercomments\n")
    with open(os.path.join(base, "train", "pos", f"{n_per_class[0]}_9.txt"), "w") as f:
        f.write("Great.")  # fewer tokens than the prompt: skipped
    with open(os.path.join(base, "train", "pos", ".DS_Store"), "w") as f:
        f.write("junk")
    os.makedirs(os.path.join(base, "train", "unsup"))
    with open(os.path.join(base, "train", "unsup", "0_0.txt"), "w") as f:
        f.write("An unlabelled review.")
    return base


def _post(rng, n):
    return " ".join(rng.choice(NEUTRAL + POSITIVE) for _ in range(n)) + "."


def write_tldr(root, n=(16, 6), seed=0):
    """summarize_from_feedback comparisons (train.json / test.json, JSON lines as `to_json`
    writes them) and the filtered corpus (train.jsonl / test.jsonl). The test comparisons
    include a CNN/DM article (no post) and a pair of identical summaries."""
    rng = random.Random(seed)
    comparisons, filtered = os.path.join(root, "summarize_from_feedback"), os.path.join(root, "openai-tldr-filtered")
    os.makedirs(comparisons)
    os.makedirs(filtered)
    for split, count in zip(("train", "test"), n):
        rows, posts = [], []
        for i in range(count):
            info = {"id": f"t3_{split}{i}", "post": _post(rng, rng.randint(12, 30)), "title": _post(rng, 5),
                    "subreddit": rng.choice(["relationships", "AskReddit", "tifu"])}
            good, bad = _post(rng, rng.randint(3, 8)), _post(rng, rng.randint(3, 8))
            choice = rng.randint(0, 1)
            summaries = [{"text": " " + (good if choice == 0 else bad) + "\n", "policy": "ref", "note": None},
                         {"text": good if choice == 1 else bad, "policy": "sup2", "note": "ok"}]
            rows.append({"info": info, "summaries": summaries, "choice": choice, "worker": "w1", "batch": "b1",
                         "split": split, "extra": {}})
            posts.append({"id": info["id"], "subreddit": info["subreddit"], "title": info["title"],
                          "post": info["post"], "summary": good})
        if split == "test":
            rows.append({"info": {"id": "cnn1", "article": "News text.", "title": "News", "site": "cnn",
                                  "post": None, "subreddit": None},
                         "summaries": [{"text": "a", "policy": "x", "note": None},
                                       {"text": "b", "policy": "y", "note": None}], "choice": 0})
            same = dict(rows[0], summaries=[{"text": "same", "policy": "x", "note": None},
                                            {"text": " same ", "policy": "y", "note": None}])
            rows.append(same)
            posts.append(dict(posts[0], summary="  "))
        for path, records in ((os.path.join(comparisons, f"{split}.json"), rows),
                              (os.path.join(filtered, f"{split}.jsonl"), posts)):
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
    return comparisons, filtered


def write_hh(root, n=(16, 6), seed=0):
    """hh-rlhf helpful-base train.jsonl / test.jsonl with the known quirks in the train split:
    'Humans:' for 'Human:', a turn marker inside an answer, dialogues that differ before the
    last turn, and an empty final answer."""
    rng = random.Random(seed)
    directory = os.path.join(root, "hh-rlhf")
    os.makedirs(directory)
    for split, count in zip(("train", "test"), n):
        rows = []
        for i in range(count):
            turns = rng.randint(1, 3)
            dialogue = ""
            for t in range(turns):
                dialogue += f"\n\nHuman: {_post(rng, rng.randint(3, 8))}"
                if t < turns - 1:
                    dialogue += f"\n\nAssistant: {_post(rng, rng.randint(3, 8))}"
            good = " " + " ".join(rng.choice(NEUTRAL + POSITIVE) for _ in range(rng.randint(3, 9)))
            bad = " " + " ".join(rng.choice(NEUTRAL + NEGATIVE) for _ in range(rng.randint(3, 9)))
            rows.append({"chosen": dialogue + "\n\nAssistant:" + good, "rejected": dialogue + "\n\nAssistant:" + bad})
        if split == "train":
            rows.append({"chosen": "\n\nHumans: hi there\n\nAssistant: hello, how can I help?",
                         "rejected": "\n\nHumans: hi there\n\nAssistant: what"})
            rows.append({"chosen": "\n\nHuman: tell me a story\n\nAssistant: Once upon a time. Human: and then?",
                         "rejected": "\n\nHuman: tell me a story\n\nAssistant: no"})
            rows.append({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                         "rejected": "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: e"})
            rows.append({"chosen": "\n\nHuman: q\n\nAssistant: fine answer", "rejected": "\n\nHuman: q\n\nAssistant: "})
        with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return directory
