"""Tests for the data layer: tokenisation rule, encoders, caching, input errors, the dataset
registry, collators and the pref_to_rw converter (README: Data formats).

Expected values are derived from the written contract (README, module docstrings), using
the tokenizer directly, not by re-running the code under test.
"""
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers.processors import TemplateProcessing

import utils.data.raw_datasets as raw_mod
from utils.tiny_model import EOS, builtin_corpus, make_tiny_model
from utils.data.collators import AlignmentCollator, SFTCollator
from utils.data.tokenisation import Tokenisation
from utils.data.encoders import AlignmentEncoder, SFTEncoder
from utils.data.tokenised_datasets import build_dataset
from utils.data.dataset_names import get_raw_dataset, load_raw_datasets, parse_data_name_path
from utils.data.raw_datasets import JsonDataset, PromptRawDataset
from utils.fileio import InputError
from utils.model_utils import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]

datasets.disable_progress_bars()


# --------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tiny"
    make_tiny_model(out, builtin_corpus(), arch="gpt2")
    return load_tokenizer(str(out))


def _with_prefix(tokenizer, n):
    """A copy of `tokenizer` whose post-processor puts `n` EOS/BOS tokens in front of every text."""
    tok = copy.deepcopy(tokenizer)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    prefix = " ".join([EOS] * n)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{prefix} $A", pair=f"{prefix} $A $B", special_tokens=[(EOS, eos_id)])
    return tok


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    tok = _with_prefix(tokenizer, 1)
    assert tok("a")["input_ids"] == [tok.bos_token_id] + tokenizer("a")["input_ids"]
    return tok


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_json(directory, name, obj):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(json.dumps(obj), encoding="utf-8")
    return directory / name


def sft_make(tok, source, kind):
    return SFTEncoder(tok, source, kind)


def align_make(num_contrastive, pref_labels):
    def make(tok, source, kind):
        return AlignmentEncoder(tok, source, kind, num_contrastive, pref_labels)
    return make


SFT_ENC = {"stage": "sft"}


def align_enc(k, pref_labels):
    return {"stage": "align", "num_contrastive": k, "pref_labels": pref_labels}


def build_align(data_dir, kind, tok, cache_dir, k=2, pref_labels=False, name="d"):
    raw = JsonDataset(name, str(data_dir), kind)
    return build_dataset([raw], "train", tok, str(cache_dir), align_enc(k, pref_labels), align_make(k, pref_labels))


def build_sft(data_dir, tok, cache_dir, name="d"):
    raw = JsonDataset(name, str(data_dir), "sft")
    return build_dataset([raw], "train", tok, str(cache_dir), SFT_ENC, sft_make)


def good_rw(prompt="Human: hi", c=4):
    return {"prompt": prompt, "completions": [f"answer number {j}" for j in range(c)],
            "rewards": [float(j) for j in range(c)]}


PROMPT = "Human: What is the capital of France?\n\nAssistant:"
ANSWER = " The capital of France is Paris."


# --------------------------------------------------------------------------------------
# 1. Tokenisation rule
# --------------------------------------------------------------------------------------
def test_prompts_and_completions_tokenised_separately_eos_appended(tokenizer):
    """Prompts are tokenised as-is and completions get exactly one EOS appended."""
    tok = Tokenisation(tokenizer, 64, 32)
    eos = tokenizer.eos_token_id
    assert tok.prompts([PROMPT, "x"]) == [tokenizer(PROMPT)["input_ids"], tokenizer("x")["input_ids"]]
    assert tok.completions([ANSWER, "y"]) == [ids_of(tokenizer, ANSWER) + [eos], ids_of(tokenizer, "y") + [eos]]
    assert tok.num_prefix == 0


def test_join_short_inputs_untouched(tokenizer):
    """A prompt + completion that fit are concatenated unchanged and prompt_len = len(prompt)."""
    tok = Tokenisation(tokenizer, 64, 32)
    p = tok.prompts([PROMPT])[0]
    c = tok.completions([ANSWER])[0]
    assert len(p) + len(c) <= 64 and len(c) <= 32
    assert tok.join(p, c) == (p + c, len(p))


def test_join_completion_cut_right_eos_counted():
    """The completion is cut on the right to max_gen_len, EOS included: a long one loses its EOS."""
    tok = Tokenisation(_FakeTok(), max_seq_len=20, max_gen_len=4)
    eos = _FakeTok.eos_token_id
    prompt = [11, 12]
    # exactly max_gen_len with EOS: kept whole
    assert tok.join(prompt, [21, 22, 23, eos]) == ([11, 12, 21, 22, 23, eos], 2)
    # one token too long: the EOS is the token that goes
    assert tok.join(prompt, [21, 22, 23, 24, eos]) == ([11, 12, 21, 22, 23, 24], 2)
    assert tok.join(prompt, list(range(30, 40)) + [eos]) == ([11, 12, 30, 31, 32, 33], 2)


def test_join_prompt_only_truncation():
    """A completion that fits is kept whole and the prompt is cut on the LEFT to fit max_seq_len."""
    tok = Tokenisation(_FakeTok(), max_seq_len=8, max_gen_len=5)
    eos = _FakeTok.eos_token_id
    prompt = list(range(100, 110))  # 10 tokens
    completion = [21, 22, eos]  # 3 <= max_gen_len
    ids, prompt_len = tok.join(prompt, completion)
    assert ids == [105, 106, 107, 108, 109, 21, 22, eos]
    assert prompt_len == 5 == len(ids) - len(completion)


def test_join_long_prompt_and_long_completion():
    """Both too long: completion cut right to max_gen_len first, prompt then cut left to the rest."""
    tok = Tokenisation(_FakeTok(), max_seq_len=6, max_gen_len=4)
    prompt = list(range(100, 110))
    completion = list(range(200, 210)) + [_FakeTok.eos_token_id]
    ids, prompt_len = tok.join(prompt, completion)
    assert ids == [108, 109, 200, 201, 202, 203]
    assert prompt_len == 2


def test_join_invariants_over_a_grid():
    """For all lengths: total <= max_seq_len, completion = its first min(len, G) ids, prompt = a suffix."""
    eos = _FakeTok.eos_token_id
    for max_seq_len, max_gen_len in [(5, 1), (5, 4), (8, 3), (12, 6)]:
        tok = Tokenisation(_FakeTok(), max_seq_len, max_gen_len)
        for lp in range(1, 15):
            for lc in range(1, 15):
                prompt = list(range(100, 100 + lp))
                completion = list(range(200, 200 + lc - 1)) + [eos]
                ids, n = tok.join(prompt, completion)
                kept_c = completion[:max_gen_len]
                assert len(ids) <= max_seq_len
                assert ids[n:] == kept_c
                assert ids[:n] == prompt[lp - n:]
                assert n == min(lp, max_seq_len - len(kept_c))


def test_join_with_real_tokenizer_truncation(tokenizer):
    """With the real tokenizer, a long prompt/completion pair is cut to the documented ids."""
    tok = Tokenisation(tokenizer, 10, 4)
    p = tok.prompts([PROMPT])[0]
    c = tok.completions([ANSWER * 3])[0]
    assert len(p) > 6 and len(c) > 4
    ids, n = tok.join(p, c)
    assert ids == p[-6:] + ids_of(tokenizer, ANSWER * 3)[:4]
    assert tokenizer.eos_token_id not in ids[n:]
    assert n == 6 and len(ids) == 10


def test_bos_kept_at_position_zero_after_left_cut(tokenizer, bos_tokenizer):
    """A tokenizer that prepends BOS keeps it at position 0 after the prompt is cut on the left."""
    tok = Tokenisation(bos_tokenizer, 8, 3)
    bos = bos_tokenizer.bos_token_id
    assert tok.num_prefix == 1
    p = tok.prompts([PROMPT])[0]
    assert p[0] == bos and p[1:] == ids_of(tokenizer, PROMPT)
    c = tok.completions([ANSWER])[0]
    assert c == ids_of(tokenizer, ANSWER) + [tokenizer.eos_token_id]  # no BOS on completions
    ids, n = tok.join(p, c)
    assert len(ids) == 8 and n == 5
    assert ids[0] == bos
    assert ids[1:5] == p[-4:]
    assert ids[5:] == c[:3]
    # untouched when it fits
    tok_big = Tokenisation(bos_tokenizer, 64, 32)
    assert tok_big.join(p, c) == (p + c, len(p))


def test_tokenisation_rejects_gen_len_not_below_seq_len(tokenizer):
    """max_gen_len >= max_seq_len raises InputError."""
    with pytest.raises(InputError, match="max_gen_len"):
        Tokenisation(tokenizer, max_seq_len=8, max_gen_len=8)
    with pytest.raises(InputError):
        Tokenisation(tokenizer, max_seq_len=8, max_gen_len=9)
    Tokenisation(tokenizer, max_seq_len=8, max_gen_len=7)


def test_multi_token_prefix_still_fits_max_seq_len(tokenizer):
    """A 2-token prefix with max_seq_len - max_gen_len = 1 is rejected or the join still fits max_seq_len."""
    two = _with_prefix(tokenizer, 2)
    try:
        tok = Tokenisation(two, max_seq_len=4, max_gen_len=3)
    except InputError:
        return
    assert tok.num_prefix == 2
    p = tok.prompts([PROMPT])[0]
    c = tok.completions([ANSWER])[0]
    ids, n = tok.join(p, c)
    assert len(ids) <= 4, f"{len(ids)} tokens for max_seq_len 4: {ids}"


class _FakeTok:
    """Minimal tokenizer stand-in for the pure `join` arithmetic (no prefix tokens)."""

    eos_token_id = 1
    name_or_path = "fake"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [50 + ord(ch) % 10 for ch in text]}


# --------------------------------------------------------------------------------------
# 2. Encoders through build_dataset
# --------------------------------------------------------------------------------------
def test_sft_encoder_through_build_dataset(tokenizer, tmp_path):
    """sft records become {input_ids, prompt_len} = prompt ids + chosen ids + EOS, in record order."""
    records = [{"prompt": PROMPT, "chosen": ANSWER}, {"prompt": "Human: hi", "chosen": " Hello there."}]
    write_json(tmp_path / "sft", "train.json", records)
    tok = Tokenisation(tokenizer, 64, 32)
    ds, key = build_sft(tmp_path / "sft", tok, tmp_path / "cache")
    assert set(ds.column_names) == {"input_ids", "prompt_len"}
    assert len(ds) == 2 and isinstance(key, str) and len(key) == 64
    for row, rec in zip(ds, records):
        p = tokenizer(rec["prompt"])["input_ids"]
        assert row["input_ids"] == p + ids_of(tokenizer, rec["chosen"]) + [tokenizer.eos_token_id]
        assert row["prompt_len"] == len(p)


def test_alignment_encoder_rw_groups(tokenizer, tmp_path):
    """rw with C=4, K=2 gives 2 groups per record in order, each with K ids, prompt_lens and the rewards slice."""
    recs = [
        {"prompt": "Human: one", "completions": [" a", " bb", " ccc", " dddd"], "rewards": [0.5, -1, 2, 3.25]},
        {"prompt": "Human: two words", "completions": [" w", " x", " y", " z"], "rewards": [4, 3, 2, 1]},
    ]
    write_json(tmp_path / "rw", "train.json", recs)
    tok = Tokenisation(tokenizer, 64, 32)
    ds, _ = build_align(tmp_path / "rw", "rw", tok, tmp_path / "cache", k=2, pref_labels=True)
    assert set(ds.column_names) == {"input_ids", "prompt_lens", "rewards"}
    assert len(ds) == 4
    eos = tokenizer.eos_token_id
    for g, row in enumerate(ds):
        rec, start = recs[g // 2], 2 * (g % 2)
        p = tokenizer(rec["prompt"])["input_ids"]
        assert row["input_ids"] == [p + ids_of(tokenizer, t) + [eos] for t in rec["completions"][start:start + 2]]
        assert row["prompt_lens"] == [len(p), len(p)]
        assert row["rewards"] == [float(r) for r in rec["rewards"][start:start + 2]]


def test_alignment_encoder_pref_pairs(tokenizer, tmp_path):
    """pref records become one group [chosen, rejected] with rewards [1.0, 0.0]."""
    recs = [{"prompt": PROMPT, "chosen": " Paris.", "rejected": " London."},
            {"prompt": "Human: hi", "chosen": " Hello.", "rejected": " Go away."}]
    write_json(tmp_path / "pref", "train.json", recs)
    tok = Tokenisation(tokenizer, 64, 32)
    ds, _ = build_align(tmp_path / "pref", "pref", tok, tmp_path / "cache", k=2, pref_labels=True)
    assert len(ds) == 2
    eos = tokenizer.eos_token_id
    for row, rec in zip(ds, recs):
        p = tokenizer(rec["prompt"])["input_ids"]
        assert row["input_ids"] == [p + ids_of(tokenizer, rec["chosen"]) + [eos],
                                    p + ids_of(tokenizer, rec["rejected"]) + [eos]]
        assert row["prompt_lens"] == [len(p)] * 2
        assert row["rewards"] == [1.0, 0.0]


def test_join_group_cuts_the_prompt_once_for_the_longest_completion():
    """join_group: every completion cut right to max_gen_len, the prompt cut left once so that
    the longest fits; every row gets the same prompt ids and fits max_seq_len."""
    tok = Tokenisation(_FakeTok(), max_seq_len=10, max_gen_len=4)
    eos = _FakeTok.eos_token_id
    prompt = list(range(100, 110))
    group = [[21, eos], list(range(30, 40)) + [eos], [41, 42, eos]]  # 2, 4 after the cut, 3
    joined = tok.join_group(prompt, group)
    assert joined == [(prompt[-6:] + [21, eos], 6), (prompt[-6:] + [30, 31, 32, 33], 6),
                      (prompt[-6:] + [41, 42, eos], 6)]
    assert tok.prompts_cut == 3
    # a group that fits keeps its whole prompt; join is the group of one
    assert tok.join_group(prompt[:4], group) == [(prompt[:4] + c[:4], 4) for c in group]
    assert tok.join(prompt, [21, eos]) == (prompt[-8:] + [21, eos], 8)


def test_alignment_encoder_cuts_each_groups_prompt_once_and_sharing_takes_it_whole(tokenizer, tmp_path):
    """A long prompt is cut once per group of K (for the group's longest candidate), so every
    candidate of a group starts with the same prompt ids, each row fits max_seq_len, and
    prefix sharing then shares the whole prompt; another group of the same record is cut for
    its own longest candidate."""
    from utils.prefix_sharing import pack_groups

    short, long_ = [" ok", " yes"], [ANSWER * 3, " no"]
    recs = [{"prompt": PROMPT, "completions": long_ + short, "rewards": [1, 0, 1, 0]}]
    write_json(tmp_path / "rw", "train.json", recs)
    tok = Tokenisation(tokenizer, 12, 5)
    ds, _ = build_align(tmp_path / "rw", "rw", tok, tmp_path / "cache", k=2)
    p = tokenizer(PROMPT)["input_ids"]
    eos = tokenizer.eos_token_id
    completions = [ids_of(tokenizer, c) + [eos] for c in long_ + short]
    assert len(p) > 12
    for group, row in zip((completions[:2], completions[2:]), ds):
        kept = [c[:5] for c in group]
        room = 12 - max(len(c) for c in kept)
        assert row["prompt_lens"] == [room, room]
        assert row["input_ids"] == [p[-room:] + c for c in kept]
        assert all(len(ids) <= 12 for ids in row["input_ids"])
    assert ds[0]["prompt_lens"] != ds[1]["prompt_lens"]  # each group its own cut
    packed = pack_groups(AlignmentCollator(tokenizer.pad_token_id)(list(ds)))
    assert packed.row_prefix.tolist() == [n for row in ds for n in row["prompt_lens"]]


# --------------------------------------------------------------------------------------
# 3. Caching
# --------------------------------------------------------------------------------------
def _raise_encoder(*args, **kwargs):
    raise AssertionError("re-tokenised although the cache should have been hit")


def test_cache_hit_same_key_no_retokenisation(tokenizer, tmp_path):
    """Same inputs: same key, same data, cache listing unchanged and the encoder never called again."""
    write_json(tmp_path / "rw", "train.json", [good_rw(c=4), good_rw("Human: two", c=4)])
    tok = Tokenisation(tokenizer, 64, 32)
    cache = tmp_path / "cache"
    raw = JsonDataset("d", str(tmp_path / "rw"), "rw")
    ds1, key1 = build_dataset([raw], "train", tok, str(cache), align_enc(2, False), align_make(2, False))
    listing = sorted(os.listdir(cache))
    assert len(listing) == 1
    raw2 = JsonDataset("d", str(tmp_path / "rw"), "rw")
    ds2, key2 = build_dataset([raw2], "train", Tokenisation(tokenizer, 64, 32), str(cache),
                              align_enc(2, False), _raise_encoder)
    assert key2 == key1
    assert sorted(os.listdir(cache)) == listing
    assert ds2.to_list() == ds1.to_list()
    assert not [n for n in os.listdir(cache) if n.endswith(".tmp")]


def test_cache_key_changes_with_inputs(tokenizer, tmp_path):
    """Changing the data content, max_seq_len or the encoding dict changes the key; no .tmp dirs left."""
    data = tmp_path / "rw"
    write_json(data, "train.json", [good_rw(c=4)])
    cache = tmp_path / "cache"

    def key(max_seq_len=64, enc=None):
        raw = JsonDataset("d", str(data), "rw")
        enc = enc or align_enc(2, False)
        return build_dataset([raw], "train", Tokenisation(tokenizer, max_seq_len, 32), str(cache),
                             enc, align_make(enc["num_contrastive"], enc["pref_labels"]))[1]

    base = key()
    assert key() == base
    assert key(max_seq_len=65) != base
    assert key(enc=align_enc(4, False)) != base
    assert key(enc=align_enc(2, True)) != base
    assert key(enc=dict(align_enc(2, False), extra="x")) != base
    write_json(data, "train.json", [good_rw(prompt="Human: changed", c=4)])
    changed = key()
    assert changed != base
    ds, _ = build_align(data, "rw", Tokenisation(tokenizer, 64, 32), cache, k=2)
    assert ds[0]["input_ids"][0][:len(tokenizer("Human: changed")["input_ids"])] == tokenizer("Human: changed")["input_ids"]
    write_json(data, "train.json", [good_rw(c=4)])
    assert key() == base
    names = os.listdir(cache)
    assert not [n for n in names if n.endswith(".tmp") or ".tmp." in n]
    assert len(names) == 6  # base, seq 65, K=4, pref, extra, changed


def test_cache_key_depends_on_tokenizer(tokenizer, bos_tokenizer, tmp_path):
    """A tokenizer that adds a BOS gives a different cache key (and different ids)."""
    write_json(tmp_path / "sft", "train.json", [{"prompt": "Human: hi", "chosen": " yo"}])
    ds1, k1 = build_sft(tmp_path / "sft", Tokenisation(tokenizer, 64, 32), tmp_path / "cache")
    ds2, k2 = build_sft(tmp_path / "sft", Tokenisation(bos_tokenizer, 64, 32), tmp_path / "cache")
    assert k1 != k2
    assert ds2[0]["input_ids"] == [bos_tokenizer.bos_token_id] + ds1[0]["input_ids"]


def test_failed_build_leaves_no_cache_entry(tokenizer, tmp_path):
    """A record that fails during tokenisation leaves nothing (no .tmp, no entry) in the cache dir."""
    write_json(tmp_path / "rw", "train.json", [good_rw(c=3)])
    cache = tmp_path / "cache"
    with pytest.raises(InputError):
        build_align(tmp_path / "rw", "rw", Tokenisation(tokenizer, 64, 32), cache, k=2)
    assert not cache.exists() or os.listdir(cache) == []


# --------------------------------------------------------------------------------------
# 4. Bad input
# --------------------------------------------------------------------------------------
def _err(excinfo):
    return str(excinfo.value)


def test_missing_train_file(tokenizer, tmp_path):
    """A data dir without train.json[l] names the directory and the missing file."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as e:
        build_sft(tmp_path / "empty", Tokenisation(tokenizer, 64, 32), tmp_path / "cache")
    assert str(tmp_path / "empty") in _err(e) and "train.json" in _err(e)


def test_malformed_json_names_line(tokenizer, tmp_path):
    """Malformed JSON in a .json file names the file and its line."""
    d = tmp_path / "bad"
    d.mkdir()
    (d / "train.json").write_text('[\n {"prompt": "a", "chosen": "b"},\n {"prompt": "c" "chosen": "d"}\n]\n')
    with pytest.raises(InputError) as e:
        build_sft(d, Tokenisation(tokenizer, 64, 32), tmp_path / "cache")
    assert str(d / "train.json") in _err(e)
    assert "line 3" in _err(e)


def test_malformed_jsonl_names_line(tokenizer, tmp_path):
    """A malformed line of a .jsonl names that line number (blank lines counted)."""
    d = tmp_path / "bad"
    d.mkdir()
    good = json.dumps({"prompt": "a", "chosen": "b"})
    (d / "train.jsonl").write_text(f"{good}\n\n{good}\n{{oops\n{good}\n")
    with pytest.raises(InputError) as e:
        build_sft(d, Tokenisation(tokenizer, 64, 32), tmp_path / "cache")
    assert str(d / "train.jsonl") in _err(e)
    assert "line 4" in _err(e)


def test_missing_prompt_names_record_3(tokenizer, tmp_path):
    """A record missing "prompt" at index 3 names the file, "record 3" and the field."""
    recs = [{"prompt": f"p{i}", "chosen": "c"} for i in range(5)]
    del recs[3]["prompt"]
    f = write_json(tmp_path / "sft", "train.json", recs)
    with pytest.raises(InputError) as e:
        build_sft(tmp_path / "sft", Tokenisation(tokenizer, 64, 32), tmp_path / "cache")
    msg = _err(e)
    assert str(f) in msg and "record 3" in msg and '"prompt"' in msg


@pytest.mark.parametrize("rewards, expect", [
    ("1,0", "expected list"),
    ([1.0, "x"], "expected a number"),
    ([1.0, True], "expected a number"),
    ([1.0, None], "expected a number"),
    ([1.0], "1 rewards for 2 completions"),
    ([1.0, 0.0, 2.0], "3 rewards for 2 completions"),
])
def test_bad_rewards(tokenizer, tmp_path, rewards, expect):
    """rewards not a list / non-numeric / wrong length raise InputError naming record and field."""
    recs = [{"prompt": "p", "completions": ["a", "b"], "rewards": [1, 0]} for _ in range(4)]
    recs[3]["rewards"] = rewards
    f = write_json(tmp_path / "rw", "train.json", recs)
    with pytest.raises(InputError) as e:
        build_align(tmp_path / "rw", "rw", Tokenisation(tokenizer, 64, 32), tmp_path / "cache", k=2)
    msg = _err(e)
    assert str(f) in msg and "record 3" in msg and 'field "rewards"' in msg and expect in msg


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_reward(tokenizer, tmp_path, literal):
    """A non-finite reward read from JSON (NaN, Infinity, overflow) is an InputError naming the field."""
    d = tmp_path / "rw"
    d.mkdir()
    good = '{"prompt": "p", "completions": ["a", "b"], "rewards": [1, 0]}'
    bad = '{"prompt": "p", "completions": ["a", "b"], "rewards": [%s, 0]}' % literal
    (d / "train.json").write_text(f"[{good}, {good}, {good}, {bad}]")
    with pytest.raises(InputError) as e:
        build_align(d, "rw", Tokenisation(tokenizer, 64, 32), tmp_path / "cache", k=2)
    msg = _err(e)
    assert str(d / "train.json") in msg and "record 3" in msg and 'field "rewards"' in msg
    assert "non-finite" in msg


def test_huge_integer_reward_is_input_error(tokenizer, tmp_path):
    """A reward given as an integer too large for a float is an InputError, not an OverflowError."""
    d = tmp_path / "rw"
    d.mkdir()
    (d / "train.json").write_text('[{"prompt": "p", "completions": ["a", "b"], "rewards": [1%s, 0]}]' % ("0" * 400))
    with pytest.raises(InputError) as e:
        build_align(d, "rw", Tokenisation(tokenizer, 64, 32), tmp_path / "cache", k=2)
    assert 'record 0 field "rewards"' in _err(e)


def test_empty_completion_string(tokenizer, tmp_path):
    """An empty string among completions names the record and completions[j]."""
    recs = [good_rw(c=2) for _ in range(4)]
    recs[3]["completions"][1] = ""
    f = write_json(tmp_path / "rw", "train.json", recs)
    with pytest.raises(InputError) as e:
        build_align(tmp_path / "rw", "rw", Tokenisation(tokenizer, 64, 32), tmp_path / "cache", k=2)
    msg = _err(e)
    assert str(f) in msg and "record 3" in msg and '"completions"[1]' in msg and "empty" in msg


def test_empty_chosen(tokenizer, tmp_path):
    """An empty "chosen" (sft and pref) names the record and the field."""
    recs = [{"prompt": "p", "chosen": "c", "rejected": "r"} for _ in range(4)]
    recs[3]["chosen"] = ""
    f = write_json(tmp_path / "pref", "train.json", recs)
    with pytest.raises(InputError) as e:
        build_align(tmp_path / "pref", "pref", Tokenisation(tokenizer, 64, 32), tmp_path / "cache", k=2)
    assert str(f) in _err(e) and 'record 3 field "chosen"' in _err(e) and "empty" in _err(e)
    f = write_json(tmp_path / "sft", "train.json", [{"prompt": "p", "chosen": ""}])
    with pytest.raises(InputError) as e:
        build_sft(tmp_path / "sft", Tokenisation(tokenizer, 64, 32), tmp_path / "cache")
    assert str(f) in _err(e) and 'record 0 field "chosen"' in _err(e)


def test_c_not_multiple_of_k(tokenizer, tmp_path):
    """C = 3 completions with num_contrastive = 2 names the record and the field."""
    recs = [good_rw(c=4) for _ in range(3)] + [good_rw(c=3)]
    f = write_json(tmp_path / "rw", "train.json", recs)
    with pytest.raises(InputError) as e:
        build_align(tmp_path / "rw", "rw", Tokenisation(tokenizer, 64, 32), tmp_path / "cache", k=2)
    msg = _err(e)
    assert str(f) in msg and 'record 3 field "completions"' in msg and "multiple" in msg


def test_k_larger_than_c(tokenizer, tmp_path):
    """num_contrastive > C (rw and pref) is an InputError naming the record."""
    f = write_json(tmp_path / "rw", "train.json", [good_rw(c=2)] * 4)
    with pytest.raises(InputError) as e:
        build_align(tmp_path / "rw", "rw", Tokenisation(tokenizer, 64, 32), tmp_path / "cache", k=3)
    assert str(f) in _err(e) and "record 0" in _err(e) and "num_contrastive 3" in _err(e)
    f = write_json(tmp_path / "pref", "train.json", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(InputError) as e:
        build_align(tmp_path / "pref", "pref", Tokenisation(tokenizer, 64, 32), tmp_path / "cache", k=4)
    assert str(f) in _err(e) and "record 0" in _err(e)


def test_tie_for_best_reward_only_with_pref_labels(tokenizer, tmp_path):
    """A tie for the best reward in a group is an error with pref labels but fine without them."""
    recs = [good_rw(c=4) for _ in range(4)]
    recs[3]["rewards"] = [0.0, 1.0, 2.0, 2.0]  # group 1 ties for the best
    f = write_json(tmp_path / "rw", "train.json", recs)
    with pytest.raises(InputError) as e:
        build_align(tmp_path / "rw", "rw", Tokenisation(tokenizer, 64, 32), tmp_path / "cache", k=2,
                    pref_labels=True)
    msg = _err(e)
    assert str(f) in msg and 'record 3 field "rewards"' in msg and "tie" in msg and "2..3" in msg
    ds, _ = build_align(tmp_path / "rw", "rw", Tokenisation(tokenizer, 64, 32), tmp_path / "cache", k=2,
                        pref_labels=False)
    assert len(ds) == 8 and ds[7]["rewards"] == [2.0, 2.0]
    # a tie that is not for the best is fine even with pref labels (K = 4, one group per record)
    recs[3]["rewards"] = [0.0, 0.0, 1.0, 2.0]
    write_json(tmp_path / "rw", "train.json", recs)
    ds, _ = build_align(tmp_path / "rw", "rw", Tokenisation(tokenizer, 64, 32), tmp_path / "cache", k=4,
                        pref_labels=True)
    assert len(ds) == 4 and ds[3]["rewards"] == [0.0, 0.0, 1.0, 2.0]


def test_empty_prompt_without_bos(tokenizer, bos_tokenizer, tmp_path):
    """An empty prompt errors (record, "prompt") with a no-BOS tokenizer, and is fine with a BOS one."""
    recs = [{"prompt": "p", "chosen": "c"} for _ in range(4)]
    recs[3]["prompt"] = ""
    f = write_json(tmp_path / "sft", "train.json", recs)
    with pytest.raises(InputError) as e:
        build_sft(tmp_path / "sft", Tokenisation(tokenizer, 64, 32), tmp_path / "cache")
    assert str(f) in _err(e) and 'record 3 field "prompt"' in _err(e)
    with pytest.raises(InputError) as e:
        build_align(tmp_path / "sft", "pref", Tokenisation(tokenizer, 64, 32), tmp_path / "cache2")
    assert "record" in _err(e)  # missing "rejected" is reported before tokenising
    ds, _ = build_sft(tmp_path / "sft", Tokenisation(bos_tokenizer, 64, 32), tmp_path / "cache")
    assert ds[3]["prompt_len"] == 1 and ds[3]["input_ids"][0] == bos_tokenizer.bos_token_id


def test_empty_prompt_alignment(tokenizer, tmp_path):
    """An empty prompt in alignment data names the record and "prompt"."""
    recs = [{"prompt": "p", "chosen": "c", "rejected": "r"} for _ in range(4)]
    recs[3]["prompt"] = ""
    f = write_json(tmp_path / "pref", "train.json", recs)
    with pytest.raises(InputError) as e:
        build_align(tmp_path / "pref", "pref", Tokenisation(tokenizer, 64, 32), tmp_path / "cache")
    assert str(f) in _err(e) and 'record 3 field "prompt"' in _err(e)


def test_parse_data_name_path():
    """NAME/KIND:PATH splits at the first colon; a spec without one is an InputError."""
    assert parse_data_name_path("imdb/rw:data/imdb_rw") == ("imdb/rw", "data/imdb_rw")
    assert parse_data_name_path("x/sft:C:/a:b") == ("x/sft", "C:/a:b")
    for bad in ["no_colon", ":path", "name/kind:"]:
        with pytest.raises(InputError) as e:
            parse_data_name_path(bad)
        assert repr(bad) in _err(e)


def test_unknown_dataset_lists_registered(monkeypatch):
    """An unknown name without a kind lists the registered names and the standard kinds."""

    class Dummy(PromptRawDataset):
        kind = "sft"

    monkeypatch.setitem(raw_mod._REGISTRY, "zz_dummy_registered", Dummy)
    with pytest.raises(InputError) as e:
        load_raw_datasets(["nosuchdata:/tmp/x"])
    msg = _err(e)
    assert "'nosuchdata'" in msg and "zz_dummy_registered" in msg and "registered" in msg
    for kind in raw_mod.KINDS:
        assert kind in msg


def test_unknown_kind():
    """An unknown KIND (standard name or registered class) is an InputError naming it."""
    with pytest.raises(InputError) as e:
        load_raw_datasets(["foo/bogus:/tmp/x"])
    assert "'bogus'" in _err(e) and "sft" in _err(e)
    with pytest.raises(InputError):
        get_raw_dataset("foo", "/tmp/x")
    with pytest.raises(InputError) as e:
        JsonDataset("foo", "/tmp/x", "bogus")
    assert "'bogus'" in _err(e)


def test_standard_name_kind_gives_json_dataset(tmp_path):
    """Any NAME/KIND with a standard KIND is a JsonDataset reading PATH/{split}.json[l]."""
    write_json(tmp_path, "train.json", [{"prompt": "p", "chosen": "c"}])
    (raw,) = load_raw_datasets([f"anything/sft:{tmp_path}"])
    assert isinstance(raw, JsonDataset) and raw.name == "anything" and raw.kind == "sft"
    assert raw.records("train") == [{"prompt": "p", "chosen": "c"}]
    assert raw.data_files("train") == [str(tmp_path / "train.json")]


def test_jsonl_with_unicode_line_separator_in_string(tmp_path):
    """A .jsonl record whose string holds a raw U+2028 (valid JSON, one line) is read as one record."""
    rec = {"prompt": "first\u2028second", "chosen": "ok\u0085done"}
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.jsonl").write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    assert JsonDataset("d", str(d), "sft").records("train") == [rec]


# --------------------------------------------------------------------------------------
# 5. Registry / custom dataset module
# --------------------------------------------------------------------------------------
TSV_MODULE = textwrap.dedent('''
    import os
    from utils.data.raw_datasets import PromptRawDataset, register_dataset

    @register_dataset("tsvpref")
    class TsvPref(PromptRawDataset):
        kind = "pref"

        def source(self, split):
            return os.path.join(self.path, split + ".tsv")

        def load_split(self, split):
            with open(self.source(split), encoding="utf-8") as f:
                return [line.rstrip("\\n").split("\\t") for line in f if line.strip()]

        def get_prompt(self, sample):
            return sample[0]

        def get_chosen(self, sample):
            return sample[1]

        def get_rejected(self, sample):
            return sample[2]
''')


@pytest.fixture
def tsv_setup(tmp_path, monkeypatch):
    monkeypatch.setattr(raw_mod, "_REGISTRY", dict(raw_mod._REGISTRY))  # registration undone afterwards
    py_file = tmp_path / "my_datasets.py"
    py_file.write_text(TSV_MODULE)
    data_dir = tmp_path / "tsv"
    data_dir.mkdir()
    (data_dir / "train.tsv").write_text("Human: hi\t Hello.\t Go away.\nHuman: 2+2?\t 4\t 5\n", encoding="utf-8")
    return py_file, data_dir


def test_custom_dataset_module_registers(tsv_setup):
    """A registered PromptRawDataset subclass in a user file yields standard pref records."""
    py_file, data_dir = tsv_setup
    (raw,) = load_raw_datasets(["tsvpref:" + str(data_dir)], [str(py_file)])
    assert type(raw).__name__ == "TsvPref" and isinstance(raw, PromptRawDataset)
    assert raw.kind == "pref" and raw.name == "tsvpref"
    assert "tsvpref" in raw_mod.registered_datasets()
    assert raw.records("train") == [
        {"prompt": "Human: hi", "chosen": " Hello.", "rejected": " Go away."},
        {"prompt": "Human: 2+2?", "chosen": " 4", "rejected": " 5"},
    ]
    assert raw.get_train_data() == raw.records("train")
    assert raw.data_files("train") == []


def test_custom_dataset_through_alignment_build(tokenizer, tsv_setup, tmp_path):
    """The custom dataset builds alignment pairs; its cache key follows its records (no data files)."""
    py_file, data_dir = tsv_setup
    (raw,) = load_raw_datasets(["tsvpref:" + str(data_dir)], [str(py_file)])
    tok = Tokenisation(tokenizer, 64, 32)
    cache = tmp_path / "cache"
    ds, key = build_dataset([raw], "train", tok, str(cache), align_enc(2, True), align_make(2, True))
    assert len(ds) == 2
    eos = tokenizer.eos_token_id
    p = tokenizer("Human: hi")["input_ids"]
    assert ds[0]["input_ids"] == [p + ids_of(tokenizer, " Hello.") + [eos], p + ids_of(tokenizer, " Go away.") + [eos]]
    assert ds[0]["rewards"] == [1.0, 0.0] and ds[1]["rewards"] == [1.0, 0.0]
    _, key_again = build_dataset([raw], "train", tok, str(cache), align_enc(2, True), _raise_encoder)
    assert key_again == key
    (data_dir / "train.tsv").write_text("Human: hi\t Hello!\t Go away.\n", encoding="utf-8")
    ds2, key2 = build_dataset([raw], "train", tok, str(cache), align_enc(2, True), align_make(2, True))
    assert key2 != key and len(ds2) == 1


def test_custom_dataset_bad_sample_names_source(tsv_setup):
    """A custom sample missing a field names the custom source, the record and the field."""
    py_file, data_dir = tsv_setup
    (data_dir / "train.tsv").write_text("a\tb\tc\nd\te\tf\ng\th\ti\nonly_prompt\tchosen\n", encoding="utf-8")
    (raw,) = load_raw_datasets(["tsvpref:" + str(data_dir)], [str(py_file)])
    with pytest.raises(InputError) as e:
        raw.records("train")
    assert str(data_dir / "train.tsv") in _err(e) and 'record 3 field "rejected"' in _err(e)


def test_dataset_module_missing_file():
    """A --dataset_module path that does not exist is an InputError."""
    with pytest.raises(InputError, match="no such file"):
        load_raw_datasets([], ["/nonexistent/dir/my_datasets.py"])


# --------------------------------------------------------------------------------------
# 6. Collators
# --------------------------------------------------------------------------------------
def test_sft_collator_dynamic_right_padding():
    """SFTCollator pads right to the batch's longest row with pad id; loss_mask = completion positions."""
    pad = 7
    examples = [{"input_ids": [1, 2, 3, 4, 5], "prompt_len": 2},
                {"input_ids": [9, 8, 6], "prompt_len": 1},
                {"input_ids": [4, 4], "prompt_len": 2}]
    batch = SFTCollator(pad)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [9, 8, 6, pad, pad], [4, 4, pad, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]
    for t in batch.values():
        assert t.dtype == torch.long and t.shape == (3, 5)


def test_sft_collator_train_on_prompt():
    """With train_on_prompt=True the loss mask covers the whole (unpadded) sequence."""
    examples = [{"input_ids": [1, 2, 3, 4, 5], "prompt_len": 2}, {"input_ids": [9, 8, 6], "prompt_len": 1}]
    batch = SFTCollator(0, train_on_prompt=True)(examples)
    assert batch["loss_mask"].tolist() == batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_sft_collator_on_built_dataset(tokenizer, tmp_path):
    """Collated built sft rows: width = longest row (< max_seq_len) and loss on completion + EOS only."""
    recs = [{"prompt": PROMPT, "chosen": ANSWER}, {"prompt": "Human: hi", "chosen": " Hello."}]
    write_json(tmp_path / "sft", "train.json", recs)
    ds, _ = build_sft(tmp_path / "sft", Tokenisation(tokenizer, 200, 100), tmp_path / "cache")
    batch = SFTCollator(tokenizer.pad_token_id)([ds[0], ds[1]])
    lengths = [len(ds[0]["input_ids"]), len(ds[1]["input_ids"])]
    assert batch["input_ids"].shape == (2, max(lengths)) and max(lengths) < 200
    for row, rec in enumerate(recs):
        n_completion = len(ids_of(tokenizer, rec["chosen"])) + 1
        assert int(batch["loss_mask"][row].sum()) == n_completion
        assert int(batch["attention_mask"][row].sum()) == lengths[row]
        masked = batch["input_ids"][row][batch["loss_mask"][row].bool()].tolist()
        assert masked == ids_of(tokenizer, rec["chosen"]) + [tokenizer.eos_token_id]


def test_alignment_collator_flattens_group_major():
    """AlignmentCollator: B groups x K -> B*K rows group-major, rewards [B, K], ref_logps only when present."""
    pad = 0
    examples = [
        {"input_ids": [[1, 2, 3], [1, 2, 4, 5]], "prompt_lens": [2, 2], "rewards": [1.0, 0.0]},
        {"input_ids": [[6, 7], [6, 8, 9, 9, 9]], "prompt_lens": [1, 1], "rewards": [0.5, 2.0]},
    ]
    batch = AlignmentCollator(pad)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask", "rewards", "group_sizes"}
    assert batch["group_sizes"] == [2, 2]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 2, 4, 5, 0], [6, 7, 0, 0, 0], [6, 8, 9, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 1, 1, 1, 1]]
    assert batch["rewards"].shape == (2, 2) and batch["rewards"].dtype == torch.float32
    assert batch["rewards"].tolist() == [[1.0, 0.0], [0.5, 2.0]]
    with_ref = [dict(e, ref_logps=[-1.5 - i, -2.5 - i]) for i, e in enumerate(examples)]
    batch = AlignmentCollator(pad)(with_ref)
    assert batch["ref_logps"].shape == (2, 2) and batch["ref_logps"].dtype == torch.float32
    assert batch["ref_logps"].tolist() == [[-1.5, -2.5], [-2.5, -3.5]]


# --------------------------------------------------------------------------------------
# 7. pref_to_rw
# --------------------------------------------------------------------------------------
def _run_p2r(*args):
    return subprocess.run([sys.executable, "src/utils/data/pref_to_rw.py", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_pref_to_rw_converts(tmp_path):
    """pref train.json + test.jsonl become rw DIR_p2r/{train,test}.json with rewards [1.0, 0.0]."""
    d = tmp_path / "hh_pref"
    train = [{"prompt": "p1", "chosen": "c1", "rejected": "r1"}, {"prompt": "p2", "chosen": "c2", "rejected": "r2"}]
    test = [{"prompt": "q", "chosen": "yes \u00e9", "rejected": "no"}]
    write_json(d, "train.json", train)
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test), encoding="utf-8")
    proc = _run_p2r(d)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "hh_pref_p2r"
    assert sorted(os.listdir(out)) == ["test.json", "train.json"]
    for name, recs in (("train.json", train), ("test.json", test)):
        got = json.loads((out / name).read_text(encoding="utf-8"))
        assert got == [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]], "rewards": [1.0, 0.0]}
                       for r in recs]
        assert all(isinstance(x, float) for r in got for x in r["rewards"])
    assert sorted(os.listdir(tmp_path)) == ["hh_pref", "hh_pref_p2r"]  # no temporary leftovers
    # the output is valid rw data
    assert JsonDataset("x", str(out), "rw").records("test")[0]["rewards"] == [1.0, 0.0]


@pytest.mark.slow
def test_pref_to_rw_bad_input(tmp_path):
    """Malformed input exits 2 with one "error:" line on stderr, no traceback, and no DIR_p2r."""
    d = tmp_path / "hh_pref"
    write_json(d, "train.json", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    (d / "test.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n{bad\n")
    proc = _run_p2r(d)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "test.jsonl" in lines[0] and "line 2" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "hh_pref_p2r").exists()
    assert sorted(os.listdir(tmp_path)) == ["hh_pref"]


@pytest.mark.slow
def test_pref_to_rw_missing_field(tmp_path):
    """A pref record without "rejected" exits 2 naming the file, record and field."""
    d = tmp_path / "hh_pref"
    write_json(d, "train.json", [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"}])
    write_json(d, "test.json", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    proc = _run_p2r(d)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert str(d / "train.json") in lines[0] and 'record 1 field "rejected"' in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "hh_pref_p2r").exists()
