"""The recipe preprocessors on raw fixtures in the real formats (in-process, fast), and the
oracle's labelling rule."""
import importlib.util
import json
import os

import pytest
from helpers import REPO_ROOT

import recipe_fixtures
from utils.fileio import INPUT_ERROR_EXIT_CODE


def load_script(recipe, name):
    path = REPO_ROOT / "exp" / f"{recipe}_exp" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{recipe}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path):
    with open(path) as f:
        return json.load(f)


def expect_input_error(main, argv, capsys, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == INPUT_ERROR_EXIT_CODE
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]  # the progress bars come before it
    assert err.startswith("error:") and "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in err, err


# -- IMDB -----------------------------------------------------------------------------------
def test_imdb_preproc(tmp_path, tiny_model, capsys):
    preproc = load_script("imdb", "preproc")
    raw = recipe_fixtures.write_aclimdb(str(tmp_path / "raw"))
    preproc.main(["--raw", raw, "--tokenizer", tiny_model, "--output_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "skipped 1: train/pos: not a <id>_<rating>.txt review file" in out
    assert "skipped 1: imdb_prefix10: review of at most 10 tokens" in out

    classes = {s: load(tmp_path / "out" / "imdb_class" / f"{s}.json") for s in ("train", "test")}
    assert [r["label"] for r in classes["test"]] == [1] * 8 + [0] * 8
    assert len(classes["train"]) == 25  # 13 pos (the short one too) + 12 neg; unsup/ ignored
    assert all("<br />" not in r["text"] and "\n\n" in r["text"] for r in classes["train"] if r["text"] != "Great.")

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    test = load(tmp_path / "out" / "imdb_prefix10" / "test.json")
    texts = {r["text"]: r["label"] for r in classes["test"]}
    labels = [texts[r["prompt"] + r["chosen"]] for r in test]  # prompt + chosen is the review, exactly
    assert labels == [1, 0] * 8  # interleaved
    assert [r["prompt"] + r["chosen"] for r in test[::2]] != [r["text"] for r in classes["test"][:8]]  # shuffled
    assert all(len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) == 10 for r in test)

    again = tmp_path / "again"
    preproc.main(["--raw", raw, "--tokenizer", tiny_model, "--output_dir", str(again)])
    assert load(again / "imdb_prefix10" / "test.json") == test  # the seeded order is reproducible


def test_imdb_preproc_errors(tmp_path, tiny_model, capsys):
    preproc = load_script("imdb", "preproc")
    raw = recipe_fixtures.write_aclimdb(str(tmp_path / "raw"))
    os.rename(os.path.join(raw, "test", "neg", os.listdir(os.path.join(raw, "test", "neg"))[0]),
              os.path.join(raw, "test", "neg", "99_8.txt"))
    out = tmp_path / "out"
    expect_input_error(preproc.main, ["--raw", raw, "--tokenizer", tiny_model, "--output_dir", str(out)], capsys,
                       "99_8.txt", 'field "rating"', "rating 8 in neg/")
    assert not out.exists()  # nothing partial
    expect_input_error(preproc.main, ["--raw", str(tmp_path), "--tokenizer", tiny_model], capsys,
                       "no such directory")


def test_label_pref_takes_extremes_and_skips_ties():
    from inference_class import label_pref
    from utils.inference import labelled_dir

    records = [{"prompt": "a", "completions": ["x", "y", "z"]}, {"prompt": "b", "completions": ["u", "v"]},
               {"prompt": "c", "completions": ["", "w"]}]  # an empty sample cannot be pref text
    pairs, skipped = label_pref(records, [[0.5, -2.0, 3.0], [1.0, 1.0], [2.0, 1.0]])
    assert pairs == [{"prompt": "a", "chosen": "z", "rejected": "y"}] and skipped == 2
    assert labelled_dir("data/imdb_prefix10_sft/", "pref") == os.path.normpath("data/imdb_prefix10_pref")


# -- TL;DR ----------------------------------------------------------------------------------
def test_tldr_preproc(tmp_path, capsys):
    comparisons, filtered = recipe_fixtures.write_tldr(str(tmp_path / "raw"))
    load_script("tldr", "preproc_pref").main([comparisons, "--output_dir", str(tmp_path / "tldr")])
    load_script("tldr", "preproc_filter").main([filtered, "--output_dir", str(tmp_path / "tldr_filtered")])
    out = capsys.readouterr().out
    assert "skipped 1: no reddit post (a news article comparison)" in out
    assert "skipped 1: identical summaries" in out and "skipped 1: empty summary" in out

    raw = [json.loads(line) for line in open(os.path.join(comparisons, "train.json"))]
    pref = load(tmp_path / "tldr" / "train.json")
    assert len(pref) == len(raw) == 16
    first, record = raw[0], pref[0]
    info = first["info"]
    assert record["prompt"] == f"SUBREDDIT: r/{info['subreddit']}\nTITLE: {info['title']}\nPOST: {info['post']}\nTL;DR:"
    assert record["chosen"] == " " + first["summaries"][first["choice"]]["text"].strip()
    assert record["rejected"] == " " + first["summaries"][1 - first["choice"]]["text"].strip()
    sft = load(tmp_path / "tldr_filtered" / "test.json")
    assert len(sft) == 6 and all(r["chosen"].startswith(" ") and r["prompt"].endswith("\nTL;DR:") for r in sft)


def test_tldr_preproc_errors(tmp_path, capsys):
    preproc = load_script("tldr", "preproc_pref")
    comparisons, _ = recipe_fixtures.write_tldr(str(tmp_path / "raw"))
    path = os.path.join(comparisons, "test.json")
    lines = open(path).read().splitlines()
    bad = json.loads(lines[2])
    del bad["info"]["title"]
    lines[2] = json.dumps(bad)
    open(path, "w").write("\n".join(lines) + "\n")
    out = tmp_path / "tldr"
    expect_input_error(preproc.main, [comparisons, "--output_dir", str(out)], capsys,
                       "test.json record 2", 'field "info.title"', "missing field")
    assert not out.exists()


# -- HH -------------------------------------------------------------------------------------
def test_hh_preproc(tmp_path, capsys):
    raw = recipe_fixtures.write_hh(str(tmp_path / "raw"))
    load_script("hh", "preproc").main([raw, "--output_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "train: kept 18, skipped 2" in out
    assert "skipped 1: chosen and rejected differ before the last turn" in out
    assert "skipped 1: empty final answer" in out
    assert "fixed 1: 'Humans:' read as the turn marker 'Human:'" in out
    assert "fixed 1: answer cut before a turn marker inside its text" in out

    pref = load(tmp_path / "out" / "hh" / "train.json")
    by_prompt = {r["prompt"]: r for r in pref}
    humans = by_prompt["\n\nHuman: hi there\n\nAssistant:"]
    assert (humans["chosen"], humans["rejected"]) == (" hello, how can I help?", " what")
    story = by_prompt["\n\nHuman: tell me a story\n\nAssistant:"]
    assert story["chosen"] == " Once upon a time."
    raw_first = json.loads(open(os.path.join(raw, "train.jsonl")).readline())
    assert pref[0]["prompt"] + pref[0]["chosen"] == raw_first["chosen"]
    assert pref[0]["prompt"] + pref[0]["rejected"] == raw_first["rejected"]
    sft = load(tmp_path / "out" / "hh_chosen" / "train.json")
    assert sft == [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in pref]


def test_hh_preproc_writes_messages(tmp_path, capsys):
    """--format messages: the same dialogues as the text records, turn for turn, as messages."""
    raw = recipe_fixtures.write_hh(str(tmp_path / "raw"))
    preproc = load_script("hh", "preproc")
    preproc.main([raw, "--output_dir", str(tmp_path / "text")])
    preproc.main([raw, "--output_dir", str(tmp_path / "msgs"), "--format", "messages"])
    text, msgs = (load(tmp_path / d / "hh" / "train.json") for d in ("text", "msgs"))
    assert len(text) == len(msgs)
    for t, m in zip(text, msgs):
        rendered = "".join(f"\n\n{'Human' if x['role'] == 'user' else 'Assistant'}: {x['content']}"
                           for x in m["prompt"]) + "\n\nAssistant:"
        assert rendered == t["prompt"]  # the fixture's turns hold no stray spaces
        assert m["prompt"][-1]["role"] == "user"
        assert m["chosen"] == {"role": "assistant", "content": t["chosen"].strip()}
        assert m["rejected"] == {"role": "assistant", "content": t["rejected"].strip()}
    story = next(m for m in msgs if m["prompt"] == [{"role": "user", "content": "tell me a story"}])
    assert story["chosen"]["content"] == "Once upon a time."
    sft = load(tmp_path / "msgs" / "hh_chosen" / "train.json")
    assert sft == [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in msgs]


def test_hh_preproc_errors(tmp_path, capsys):
    preproc = load_script("hh", "preproc")
    raw = recipe_fixtures.write_hh(str(tmp_path / "raw"))
    with open(os.path.join(raw, "test.jsonl"), "a") as f:
        f.write(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": 3}) + "\n")
    expect_input_error(preproc.main, [raw, "--output_dir", str(tmp_path / "out")], capsys,
                       "test.jsonl record 6", 'field "rejected"', "expected str")
    assert not (tmp_path / "out").exists()
