"""Judged win rates (src/eval_winrate.py): the statistics, every judge on tiny local models, the
openai judge against a fake in-process server (retries, 429/5xx, budget, bad replies) and
against a real vLLM OpenAI-compatible server on CPU (killed mid-run, resumed from the cache)."""
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, finish, free_port, read, start, write_split

import eval_winrate
import eval_winrate_joint
from utils import winrate_stats as stats
from utils.judges import Failed, JudgmentCache, OpenAIJudge, RewardModelJudge, ScoreJudge, judge_all, parse_label

ORACLE = f"fn:{REPO_ROOT / 'exp' / 'quickstart' / 'oracle.py'}:oracle_rewards"
SHORT_PROMPT = "Which is better?\n{prompt}\nA: {first}\nB: {second}\nAnswer A or B:"
HAS_OPENAI = importlib.util.find_spec("openai") is not None


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """policy gen data (2 completions per prompt), a baseline of reference answers (sft) and
    another policy's gen data, on 12 prompts, no two answers to a prompt alike; and a short
    judge prompt that fits a tiny model."""
    root = tmp_path_factory.mktemp("winrate")
    words = "good great fun the movie was bad awful dull plot".split()
    policy, reference, other = [], [], []
    for i in range(12):
        prompt = f"review {i} the movie"
        policy.append({"prompt": prompt, "completions": [" ".join(words[(i + j + k) % 10] for k in range(3 + j))
                                                         for j in range(2)]})
        reference.append({"prompt": prompt, "chosen": " ".join(words[(2 * i + k) % 10] for k in range(5))})
        other.append({"prompt": prompt, "completions": [" ".join(words[(3 * i + j + k) % 10] for k in range(2))
                                                        for j in range(2)]})
    dirs = {name: str(root / name) for name in ("policy", "reference", "other")}
    for name, records in (("policy", policy), ("reference", reference), ("other", other)):
        write_split(dirs[name], "test", records)
    prompt_file = root / "judge_prompt.txt"
    prompt_file.write_text(SHORT_PROMPT)
    dirs["judge_prompt"] = str(prompt_file)
    dirs["root"] = root
    return dirs


def winrate(samples, tmp_path, *flags, baseline="reference", kind="sft"):
    out = tmp_path / "winrate.json"
    eval_winrate.main(["--policy", samples["policy"], "--baseline", samples[baseline], "--baseline_kind", kind,
                       "--output_path", str(out), "--bootstrap", "200", *flags])
    return read(out)


def error_line(capsys, *argv):
    """The one error line (and exit code) of an eval_winrate run that must fail."""
    with pytest.raises(SystemExit) as stopped:
        eval_winrate.main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]  # beside the progress bar
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return stopped.value.code, lines[0]


# -- the statistics -------------------------------------------------------------------------------
FIXTURES = json.loads((REPO_ROOT / "tests" / "winrate_fixtures" / "alpaca_eval_lc.json").read_text())


def pairs_of(n, per_prompt=2):
    return [eval_winrate.Pair("p", "a" * (i + 1), "b", i // per_prompt, i // per_prompt, i % per_prompt)
            for i in range(n)]


def test_always_first_is_exactly_half_and_consistent_judges_count():
    pairs = pairs_of(10)
    first = eval_winrate.summarise(pairs, [1.0] * 10, [1.0] * 10, 100, 0)
    assert first["win_rate"] == 0.5 and first["tie_rate"] == 1.0 and first["position_consistency"] == 0.0
    assert first["lc_win_rate"] == pytest.approx(0.5, abs=1e-9)
    policy_wins = eval_winrate.summarise(pairs, [0.9] * 10, [0.2] * 10, 100, 0)
    assert policy_wins["win_rate"] == pytest.approx(0.85) and policy_wins["tie_rate"] == 0
    assert policy_wins["position_consistency"] == 1.0
    assert [p["score"] for p in policy_wins["judged_pairs"]] == pytest.approx([0.85] * 10)
    # failed judgments: counted and listed, left out of the rate, never ties
    mixed = eval_winrate.summarise(pairs, [Failed("x")] * 5 + [1.0] * 5, [0.0] * 9 + [Failed("y")], 100, 0)
    assert mixed["failed"] == 6 and mixed["valid_pairs"] == 4 and mixed["win_rate"] == 1.0
    assert mixed["failure_reasons"] == {"x": 5, "y": 1}
    assert mixed["failed_judgments"][-1] == {"record": 4, "completion": 1, "order": "baseline first", "reason": "y"}


def test_length_controlled_win_rate_removes_a_length_preference():
    # a judge that prefers the longer answer, whatever it says; half the pairs longer, half shorter
    diffs = [d for d in range(-20, 21) if d]
    policy, baseline = [100 + d for d in diffs], [100] * len(diffs)
    lc = stats.lc_minimal([1.0 if d > 0 else 0.0 for d in diffs], policy, baseline)
    assert lc["lc_win_rate"] == pytest.approx(0.5, abs=1e-3) and lc["length_weight"] > 1
    # the policy wins 3 of 4 at every length difference: LC leaves that as it is, length weight 0
    lc = stats.lc_minimal([0.75] * len(diffs), policy, baseline)
    assert lc["lc_win_rate"] == pytest.approx(0.75, abs=1e-2) and lc["length_weight"] == 0
    assert "needs 5 pairs" in stats.lc_minimal([1.0] * 4, [1] * 4, [2] * 4)["lc_unavailable"]


def fixture_policies(case):
    return [(p["prompts"], p["scores"], p["length_policy"], p["length_baseline"]) for p in case["policies"]]


@pytest.mark.parametrize("case", FIXTURES["cases"], ids=[c["name"] for c in FIXTURES["cases"]])
def test_lc_is_alpaca_evals_on_the_same_judgments(case):
    """alpaca-eval 0.6.6's own numbers on these judgments (tests/winrate_fixtures/make_alpaca_eval_fixtures.py)."""
    for policy, theirs, truth in zip(fixture_policies(case), case["alpaca_eval_minimal"], case["truth_lc"]):
        ours = stats.lc_minimal(*policy[1:])["lc_win_rate"]
        assert ours == pytest.approx(theirs, abs=1e-3)
        raw = sum(policy[1]) / len(policy[1])
        if case["name"].startswith(("length-biased", "reward-model")):  # the length bias is taken out
            assert abs(ours - truth) < 0.01 < 0.1 < abs(raw - truth)
    if "alpaca_eval_noreg" in case:
        fits, difficulty = stats.lc_with_difficulty(fixture_policies(case))
        assert difficulty == pytest.approx(case["difficulty"], abs=1e-4)
        joint = [fit["lc_win_rate"] for fit in fits]
        assert joint == pytest.approx(case["alpaca_eval_noreg"], abs=1e-3)
        # prompts of unequal difficulty: the joint fit is nearer the truth than the minimal one, for every policy
        for ours, minimal, truth in zip(joint, case["alpaca_eval_minimal"], case["truth_lc"]):
            assert abs(ours - truth) < 0.03 < abs(minimal - truth)


def test_small_sample_interval_covers_where_the_percentile_bootstrap_does_not():
    """Coverage by simulation: 0/1 prompt scores (the widest a mean of [0, 1] scores varies) with
    a known win rate, 10 and 20 prompts; the Wilson interval keeps near 95%, the percentile
    bootstrap falls far below it near 0 and 1."""
    rng = np.random.default_rng(0)
    wilson, boot = {}, {}
    for n in (10, 20):
        for p in (0.05, 0.2, 0.5, 0.9):
            hits = np.zeros(2)
            for _ in range(300):
                x = (rng.random(n) < p).astype(float)
                for k, (lo, hi) in enumerate((stats.wilson_interval(x.mean(), n),
                                              stats.bootstrap_interval(x, 200, int(rng.integers(1 << 30))))):
                    hits[k] += lo <= p <= hi
            wilson[n, p], boot[n, p] = hits / 300
    assert np.mean(list(wilson.values())) > 0.93 and min(wilson.values()) > 0.85, wilson
    assert min(boot.values()) < 0.7 and np.mean(list(boot.values())) < 0.9, boot
    # a win rate of exactly 1 over 12 prompts: the report says why and gives Wilson's, not [1, 1]
    result = eval_winrate.summarise(pairs_of(24), [1.0] * 24, [0.0] * 24, 100, 0)
    assert result["win_rate"] == 1 and result["bootstrap_ci"] == [1, 1] and result["ci_method"] == "wilson"
    assert result["ci_low"] == pytest.approx(12 / (12 + 1.96 ** 2), abs=1e-3) and result["ci_high"] == 1
    assert "under-covers" in result["ci_note"]
    many = eval_winrate.summarise(pairs_of(80), [0.9, 0.1] * 40, [0.2, 0.6] * 40, 100, 0)
    assert many["ci_method"] == "percentile bootstrap" and "ci_note" not in many


def test_bootstrap_interval_brackets_the_mean():
    values = [0, 1] * 50
    low, high = stats.bootstrap_interval(values, 2000, 0)
    assert low < 0.5 < high and high - low == pytest.approx(2 * 1.96 * 0.05, rel=0.15)


def test_parse_label():
    assert [parse_label(r) for r in ("A", " B.", "**A**", "(B) because", "A\n", "Answer: A", "", None, "AB")] == \
        ["A", "B", "A", "B", "A", None, None, None, None]


# -- local judges -------------------------------------------------------------------------------
def test_oracle_judge_matches_vader(samples, tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "exp" / "quickstart"))
    from oracle import oracle_rewards

    result = winrate(samples, tmp_path, "--judge", ORACLE)
    expected = []
    for p, b in zip(read(os.path.join(samples["policy"], "test.json")),
                    read(os.path.join(samples["reference"], "test.json"))):
        ref = oracle_rewards(p["prompt"], [b["chosen"]])[0]
        expected.append(sum(1.0 if r > ref else 0.0 if r < ref else 0.5
                            for r in oracle_rewards(p["prompt"], p["completions"])) / 2)
    assert result["win_rate"] == pytest.approx(sum(expected) / len(expected))
    assert result["position_consistency"] == 1.0 and result["failed"] == 0 and result["num_pairs"] == 24
    assert result["ci_low"] <= result["win_rate"] <= result["ci_high"]
    # the rerun reads every judgment from the cache
    again = winrate(samples, tmp_path, "--judge", ORACLE)
    assert again["cached"] == 48 and again["win_rate"] == result["win_rate"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reward_model_judge_is_sigmoid_of_reward_difference(samples, tmp_path, arch):
    from utils.tiny_model import make_tiny_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = make_tiny_model(str(tmp_path / arch), ["review the movie good great fun bad awful dull plot was"] * 4,
                             arch=arch, num_heads=2, pad_token="<pad>" if arch == "llama" else None)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # a fresh head would score everything ~0
    model.save_pretrained(rm_dir)
    result = winrate(samples, tmp_path, "--judge", f"rm:{rm_dir}", "--max_seq_len", "128", "--max_gen_len", "32",
                     baseline="other", kind="gen")
    tok = AutoTokenizer.from_pretrained(rm_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
    model.eval()

    def reward(prompt, answer):
        ids = tok(prompt)["input_ids"] + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

    scores = []
    for p, o in zip(read(os.path.join(samples["policy"], "test.json")), read(os.path.join(samples["other"],
                                                                                         "test.json"))):
        per = []
        for a, b in zip(p["completions"], o["completions"]):
            per.append(1 / (1 + math.exp(reward(p["prompt"], b) - reward(p["prompt"], a))))
        scores.append(sum(per) / len(per))
    assert result["win_rate"] == pytest.approx(sum(scores) / len(scores), abs=1e-5)
    assert result["position_consistency"] == 1.0  # a reward model sees no order


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # absolute and rotary positions: left padding must not matter
def test_local_lm_judge_reads_label_probabilities(samples, tmp_path, arch):
    from utils.tiny_model import make_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    judge = make_tiny_model(str(tmp_path / "judge"), ["Which is better? A B review the movie good bad"] * 4,
                            arch=arch, num_heads=2, max_positions=512, chat_template="chatml")
    result = winrate(samples, tmp_path, "--judge", f"lm:{judge}", "--judge_prompt", samples["judge_prompt"])
    tok = AutoTokenizer.from_pretrained(judge)
    model = AutoModelForCausalLM.from_pretrained(judge).eval()
    a, b = (tok(x, add_special_tokens=False)["input_ids"][0] for x in ("A", "B"))

    def p_first(prompt, first, second):
        text = tok.apply_chat_template([{"role": "user", "content": SHORT_PROMPT.replace("{prompt}", prompt)
                                         .replace("{first}", first).replace("{second}", second)}],
                                       tokenize=False, add_generation_prompt=True)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, -1]
        return torch.softmax(logits[[a, b]], -1)[0].item()

    per_prompt = []
    for p, r in zip(read(os.path.join(samples["policy"], "test.json")),
                    read(os.path.join(samples["reference"], "test.json"))):
        per = [eval_winrate.pair_scores(p_first(p["prompt"], c, r["chosen"]), p_first(p["prompt"], r["chosen"], c))[0]
               for c in p["completions"]]
        per_prompt.append(sum(per) / len(per))
    assert result["win_rate"] == pytest.approx(sum(per_prompt) / len(per_prompt), abs=1e-4)
    assert 0 <= result["position_consistency"] <= 1


# -- bad inputs -----------------------------------------------------------------------------------
def test_bad_inputs_are_one_line(samples, tmp_path, capsys):
    out = str(tmp_path / "w.json")
    common = ["--policy", samples["policy"], "--output_path", out, "--judge", ORACLE]
    missing = tmp_path / "missing"
    write_split(str(missing), "test", read(os.path.join(samples["reference"], "test.json"))[:-1])
    code, line = error_line(capsys, *common, "--baseline", str(missing), "--baseline_kind", "sft")
    assert code == 2 and "record 11" in line and "no record of" in line
    other = tmp_path / "other_prompts"
    write_split(str(other), "test", [{"prompt": "something else", "completions": ["x"]}])
    code, line = error_line(capsys, *common, "--baseline", str(other))
    assert code == 2 and "record 0" in line
    code, line = error_line(capsys, *common, "--baseline", samples["reference"], "--baseline_kind", "gen")
    assert code == 2 and "completions" in line
    code, line = error_line(capsys, "--policy", samples["policy"], "--baseline", samples["other"], "--output_path", out,
                            "--judge", "gpt4")
    assert code == 2 and "expected rm:PATH" in line
    code, line = error_line(capsys, "--policy", samples["policy"], "--baseline", samples["other"], "--output_path", out,
                            "--judge", "openai:x", "--judge_base_url", "http://127.0.0.1:1/v1")
    assert code == 2 and "--judge_prompt" in line
    assert not os.path.exists(out)


# -- judgments that are not probabilities ---------------------------------------------------------
class ListJudge:
    """Gives values[i] for triple i: a value, "skip" (gives nothing) or "raise"."""

    def __init__(self, values):
        self.values = values

    def judge(self, triples, done):
        for i, value in enumerate(self.values):
            if value == "raise":
                raise RuntimeError("boom")
            if value != "skip":
                done(i, value)


def test_whatever_is_not_a_probability_is_a_failed_judgment():
    triples = [("p", f"a{i}", "b") for i in range(8)]
    values, _ = judge_all(ListJudge([0.7, float("nan"), None, "A", 1.5, float("inf"), np.float32(0.25), "skip"]),
                          triples, JudgmentCache(None, "fake"))
    assert values[0] == 0.7 and values[6] == 0.25
    reasons = [v.reason for v in values[1:6]] + [values[7].reason]
    assert all(isinstance(v, Failed) for v in values[1:6] + [values[7]])
    assert ["nan" in reasons[0], "None" in reasons[1], "'A'" in reasons[2], "1.5" in reasons[3], "inf" in reasons[4],
            "no judgment" in reasons[5]] == [True] * 6
    values, _ = judge_all(ListJudge([0.2, "raise", 0.3]), triples[:3], JudgmentCache(None, "fake"))
    assert values[0] == 0.2 and [v.reason for v in values[1:]] == ["the judge raised RuntimeError: boom"] * 2
    # an endpoint judge whose client raises something unforeseen: that judgment fails, the others go on
    judge = OpenAIJudge.__new__(OpenAIJudge)
    judge.concurrency, judge.ask = 2, lambda triple: 1 / 0 if triple[1] == "a1" else 1.0
    values, _ = judge_all(judge, triples[:3], JudgmentCache(None, "fake"))
    assert values[0] == values[2] == 1.0 and "ZeroDivisionError" in values[1].reason


class TableJudge(ScoreJudge):
    """A reward model whose rewards come from a table; `raise` in it makes the batch raise."""
    batch_size = 2
    compare = staticmethod(RewardModelJudge.compare)

    def __init__(self, rewards):
        self.rewards = rewards

    def scores(self, answers):
        if any(self.rewards[a] == "raise" for _, a in answers):
            raise ValueError("out of memory")
        return [self.rewards[a] for _, a in answers]


def test_a_reward_model_that_gives_nan_fails_its_pairs_only():
    judge = TableJudge({"w": 3.0, "x": float("nan"), "y": 0.0, "z": "raise", "v": 1000.0})
    # answers in batches of 2: [w, y], [x, v], [z]
    triples = [("p", "w", "y"), ("p", "x", "v"), ("p", "y", "w"), ("p", "y", "z"), ("p", "v", "y"), ("p", "y", "v")]
    values, _ = judge_all(judge, triples, JudgmentCache(None, "table"))
    assert values[0] == pytest.approx(1 / (1 + math.exp(-3))) and values[2] == pytest.approx(1 - values[0])
    assert isinstance(values[1], Failed) and "nan" in values[1].reason  # not sigmoid(nan) scored as a tie
    assert isinstance(values[3], Failed) and "ValueError: out of memory" in values[3].reason
    assert values[4] == 1.0 and values[5] == 0.0  # a reward gap of 1000: no overflow


JUDGES = """
import math

def length(prompt, completions):
    return [float(len(c)) for c in completions]

def length_nan_once(prompt, completions):
    return [math.nan if c == {nan_answer!r} else float(len(c)) for c in completions]

def all_nan(prompt, completions):
    return [math.nan for c in completions]

def none(prompt, completions):
    return None

def raises(prompt, completions):
    raise ValueError("the scorer broke")
"""


def test_a_judge_that_fails_ends_in_one_line_and_some_failures_are_listed(samples, tmp_path, capsys):
    policy = read(os.path.join(samples["policy"], "test.json"))
    judges = tmp_path / "judges.py"
    judges.write_text(JUDGES.format(nan_answer=policy[3]["completions"][1]))
    out = tmp_path / "w.json"
    common = ["--policy", samples["policy"], "--baseline", samples["reference"], "--baseline_kind", "sft",
              "--output_path", str(out), "--bootstrap", "200"]
    for name, why in (("all_nan", "the judge gave nan, not a finite number"),
                      ("none", "the judge gave NoneType 'None', not a list of one reward"), ("raises", "ValueError: the scorer broke")):
        code, line = error_line(capsys, *common, "--judge", f"fn:{judges}:{name}",
                                "--judge_cache", str(tmp_path / f"{name}.jsonl"))
        assert code == 1 and "48 of 48 judgments failed" in line and why in line and "no win rate" in line, line
        assert not out.exists()
    # one answer of 24 scored NaN: its pair's 2 judgments fail (under 5%), listed; the rest decide the rate
    result = winrate(samples, tmp_path, "--judge", f"fn:{judges}:length_nan_once")
    assert result["failed"] == 2 and result["valid_pairs"] == 23
    assert [(f["record"], f["completion"]) for f in result["failed_judgments"]] == [(3, 1), (3, 1)]
    reference = read(os.path.join(samples["reference"], "test.json"))
    per_prompt = []
    for i, (p, r) in enumerate(zip(policy, reference)):
        kept = [c for j, c in enumerate(p["completions"]) if (i, j) != (3, 1)]
        per_prompt.append(sum((len(c) > len(r["chosen"])) + 0.5 * (len(c) == len(r["chosen"])) for c in kept)
                          / len(kept))
    assert result["win_rate"] == pytest.approx(sum(per_prompt) / len(per_prompt))


def test_a_repeated_prompt_is_one_prompt_and_a_baseline_answering_it_twice_is_refused(samples, tmp_path, capsys):
    judges = tmp_path / "judges.py"
    judges.write_text(JUDGES.format(nan_answer=None))
    length = ["--judge", f"fn:{judges}:length"]
    policy, reference = (read(os.path.join(samples[k], "test.json")) for k in ("policy", "reference"))
    repeated = tmp_path / "repeated"
    write_split(str(repeated), "test", policy + [{"prompt": policy[0]["prompt"], "completions": ["x" * 40, "y"]}])
    out = tmp_path / "w.json"
    common = ["--baseline", samples["reference"], "--baseline_kind", "sft", "--output_path", str(out)]
    eval_winrate.main(["--policy", str(repeated), *common, *length])
    result = read(out)
    assert result["num_prompts"] == 12 and result["num_pairs"] == 26 and result["duplicates"]["policy_records_pooled"] == 1

    def score(c, r):
        return (len(c) > len(r)) + 0.5 * (len(c) == len(r))

    first = [score(c, reference[0]["chosen"]) for c in policy[0]["completions"] + ["x" * 40, "y"]]
    rest = [sum(score(c, r["chosen"]) for c in p["completions"]) / 2 for p, r in zip(policy[1:], reference[1:])]
    assert result["win_rate"] == pytest.approx((sum(first) / 4 + sum(rest)) / 12)  # one prompt, its 4 pairs
    assert {p["record"] for p in result["judged_pairs"]} == set(range(13))

    # samples as the baseline: a repeated prompt's records are more samples, pooled; the k-th meets the k-th
    other = read(os.path.join(samples["other"], "test.json"))
    pooled = tmp_path / "pooled"
    write_split(str(pooled), "test", other + [{"prompt": policy[0]["prompt"], "completions": ["q" * 30, "r"]}])
    eval_winrate.main(["--policy", str(repeated), "--baseline", str(pooled), "--output_path", str(out), *length])
    result = read(out)
    assert result["duplicates"]["baseline_records_pooled"] == 1 and result["num_pairs"] == 26
    assert [(p["length_policy"], p["length_baseline"]) for p in result["judged_pairs"] if p["record"] == 12] == \
        [(40, 30), (1, 1)]
    code, line = error_line(capsys, "--policy", str(repeated), "--baseline", samples["other"], "--output_path",
                            str(tmp_path / "none.json"), *length)
    assert code == 2 and "2 answers to the prompt of" in line and "which has 4 (its records together)" in line

    # the same answer twice is one answer; another answer is refused, naming the prompt and both records
    again = tmp_path / "again"
    write_split(str(again), "test", reference + [dict(reference[5])])
    eval_winrate.main(["--policy", samples["policy"], "--baseline", str(again), "--baseline_kind", "sft",
                       "--output_path", str(out), *length])
    assert read(out)["duplicates"]["baseline_records_left_out"] == []
    conflict = tmp_path / "conflict"
    write_split(str(conflict), "test", reference + [{**reference[5], "chosen": "another answer"}])
    out.unlink()
    args = ["--policy", samples["policy"], "--baseline", str(conflict), "--baseline_kind", "sft",
            "--output_path", str(out), *length]
    code, line = error_line(capsys, *args)
    assert code == 2 and "record 12" in line and "record 5" in line and reference[5]["prompt"] in line, line
    assert not out.exists()
    eval_winrate.main([*args, "--baseline_duplicates", "first"])
    assert read(out)["duplicates"]["baseline_records_left_out"] == [12] and read(out)["num_pairs"] == 24
    assert "1 baseline records of a repeated prompt left out" in capsys.readouterr().out


def test_joint_fit_with_prompt_difficulty_over_several_reports(tmp_path, capsys):
    """The quickstart's case: several policies' reports against one baseline, fitted together."""
    case = next(c for c in FIXTURES["cases"] if "alpaca_eval_noreg" in c)
    paths = []
    for k, policy in enumerate(case["policies"]):
        (tmp_path / f"policy{k}").mkdir()
        judged = [{"prompt": x, "score": s, "length_policy": lp, "length_baseline": lb}
                  for x, s, lp, lb in zip(*fixture_policies(case)[k])]
        report = {"baseline": "base.json", "judge": "fn:j.py:f", "win_rate": sum(policy["scores"]) / 200,
                  "lc_win_rate": case["alpaca_eval_minimal"][k], "judged_pairs": judged}
        paths.append(tmp_path / f"policy{k}" / "winrate.json")
        paths[-1].write_text(json.dumps(report))
    out = tmp_path / "joint.json"
    eval_winrate_joint.main([*map(str, paths), "--output_path", str(out)])
    joint = read(out)
    assert [r["lc_difficulty_win_rate"] for r in joint["policies"]] == pytest.approx(case["alpaca_eval_noreg"], abs=1e-3)
    assert [r["name"] for r in joint["policies"]] == ["policy0", "policy1", "policy2"]
    assert "| policy1 |" in capsys.readouterr().out and "length_controlled_noreg" in joint["estimator"]
    # another baseline, or other prompts: one line
    other = json.loads(paths[2].read_text())
    paths[2].write_text(json.dumps({**other, "judged_pairs": other["judged_pairs"][1:]}))
    with pytest.raises(SystemExit) as stopped:
        eval_winrate_joint.main([*map(str, paths), "--output_path", str(tmp_path / "no.json")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "prompt0000 is judged in only one" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "no.json").exists()


# -- the openai judge against a fake server: retries, budget, failures ------------------------------
class FakeChatServer:
    """An in-process OpenAI-style /v1/chat/completions endpoint whose reply comes from `answer(n)`
    (n: the request's number): a label string, or an HTTP status to fail with."""

    def __init__(self, answer):
        self.answer, self.count, self.lock = answer, 0, threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                with server.lock:
                    server.count += 1
                    n = server.count
                reply = server.answer(n)
                if isinstance(reply, int):
                    body = json.dumps({"error": {"message": f"status {reply}", "type": "x"}}).encode()
                    self.send_response(reply)
                    if reply == 429:
                        self.send_header("Retry-After", "0")
                else:
                    body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                                       "choices": [{"index": 0, "finish_reason": "stop",
                                                    "message": {"role": "assistant", "content": reply}}]}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def openai_flags(samples, url, *flags):
    return ["--judge", "openai:fake", "--judge_base_url", url, "--judge_prompt", samples["judge_prompt"],
            "--judge_backoff", "0.01", "--judge_concurrency", "4", *flags]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_OPENAI, reason="the openai client is not installed (pip install -e '.[judge]')")
def test_openai_judge_retries_budget_and_failures(samples, tmp_path, capsys):
    # always "A": position bias cancelled exactly; every 3rd request first gets a 429 or a 500, retried
    server = FakeChatServer(lambda n: (429 if n % 6 == 0 else 500) if n % 3 == 0 else "A")
    try:
        result = winrate(samples, tmp_path, *openai_flags(samples, server.url, "--judge_retries", "20"))
        assert result["win_rate"] == 0.5 and result["tie_rate"] == 1 and result["position_consistency"] == 0
        assert result["failed"] == 0 and result["requests"] == server.count > 48
        # the rerun pays nothing
        before = server.count
        again = winrate(samples, tmp_path, *openai_flags(samples, server.url))
        assert server.count == before and again["cached"] == 48 and again["requests"] == 0
    finally:
        server.close()

    # a budget: 10 requests, then nothing more is sent and the run says so
    server = FakeChatServer(lambda n: "B")
    out = str(tmp_path / "budget.json")
    try:
        common = ["--policy", samples["policy"], "--baseline", samples["reference"], "--baseline_kind", "sft",
                  "--output_path", out]
        code, line = error_line(capsys, *common, *openai_flags(samples, server.url, "--max_requests", "10"))
        assert code == 1 and server.count == 10 and "38 of 48 judgments failed" in line and "--max_requests" in line
        assert not os.path.exists(out)
        # the rerun with the budget to finish asks only the 38 left
        result = eval_winrate.main(common + openai_flags(samples, server.url, "--max_requests", "38")) or read(out)
        assert server.count == 48 and result["cached"] == 10 and result["win_rate"] == 0.5
    finally:
        server.close()

    # replies that are neither label: counted failures, no win rate
    server = FakeChatServer(lambda n: "Both are fine")
    try:
        code, line = error_line(capsys, *common, "--judge_cache", str(tmp_path / "c.jsonl"),
                                *openai_flags(samples, server.url))
        assert code == 1 and "48 of 48 judgments failed" in line and "neither label" in line
    finally:
        server.close()

    # a 4xx is not retried; an unreachable endpoint is one line, soon
    server = FakeChatServer(lambda n: 404)
    try:
        code, line = error_line(capsys, *common, "--judge_cache", str(tmp_path / "d.jsonl"),
                                *openai_flags(samples, server.url))
        assert code == 1 and "HTTP 404" in line and server.count == 48
    finally:
        server.close()
    started = time.monotonic()
    code, line = error_line(capsys, *common, "--judge_cache", str(tmp_path / "e.jsonl"),
                            *openai_flags(samples, f"http://127.0.0.1:{free_port()}/v1"))
    assert code == 1 and "unreachable" in line and time.monotonic() - started < 30


# -- the openai judge against a real vLLM server ----------------------------------------------------
def vllm_missing():
    """Why the real-server test cannot run here (None: it can)."""
    if not HAS_OPENAI:
        return "the openai client is not installed"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed in this environment (see the vllm CI venv)"
    return None


class VLLMServer:
    """vLLM's OpenAI-compatible server on CPU, serving a local model, in its own process group."""

    def __init__(self, model, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
        # `python -m` of the module: the `vllm serve` command looks its own package metadata up as
        # `vllm`, which a vllm-cpu install lacks
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
             "--port", str(self.port), "--enforce-eager", "--generation-config", "vllm", "--max-model-len", "512",
             "--served-model-name", "tiny-judge"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=os.path.dirname(model))
        self.log_path = log_path
        import urllib.request
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail("the vLLM server exited:\n" + open(log_path).read()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2):
                    return
            except OSError:
                time.sleep(2)
        self.kill()
        pytest.fail("the vLLM server did not answer within 400 s:\n" + open(log_path).read()[-3000:])

    def kill(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


def with_url(cmd, server):
    return [server.url if arg == "{url}" else arg for arg in cmd]


def cache_lines(path):
    return sum(1 for line in open(path) if line.strip()) if os.path.exists(path) else 0


@pytest.mark.slow
@pytest.mark.vllm
def test_openai_judge_on_a_real_vllm_server_killed_and_resumed(samples, tmp_path):
    why = vllm_missing()
    if why:
        if os.environ.get("EXO_ALIGN_REQUIRE_VLLM") == "1":
            pytest.fail(f"EXO_ALIGN_REQUIRE_VLLM=1, but {why}")
        pytest.skip(why)
    from utils.tiny_model import make_tiny_model

    # head_dim 32: vLLM's CPU attention needs at least that
    judge = make_tiny_model(str(tmp_path / "judge"), ["Which is better? A B review the movie good bad"] * 4,
                            arch="llama", hidden_size=64, num_heads=2, max_positions=512, chat_template="chatml")
    # 5 times the prompts (160 judgments), so that the kill lands well before the end
    policy, reference = tmp_path / "policy", tmp_path / "reference"
    for source, target in ((samples["policy"], policy), (samples["reference"], reference)):
        write_split(str(target), "test", [{**r, "prompt": f"{r['prompt']} ({copy})"} for copy in range(5)
                                          for r in read(os.path.join(source, "test.json"))])
    total = 4 * len(read(policy / "test.json"))
    out, cache = tmp_path / "real.json", tmp_path / "real.judgments.jsonl"
    cmd = [sys.executable, str(REPO_ROOT / "src" / "eval_winrate.py"), "--policy", str(policy),
           "--baseline", str(reference), "--baseline_kind", "sft", "--output_path", str(out),
           "--judge", "openai:tiny-judge", "--judge_base_url", "{url}", "--judge_prompt", samples["judge_prompt"], "--judge_backoff", "0.2",
           "--judge_retries", "2", "--judge_timeout", "30", "--bootstrap", "200",
           "--judge_extra_body", json.dumps({"structured_outputs": {"choice": ["A", "B"]}})]

    server = VLLMServer(judge, str(tmp_path / "vllm1.log"))
    try:
        # one request at a time, so the kill lands mid-run
        run = start(with_url(cmd, server) + ["--judge_concurrency", "1"])
        deadline = time.monotonic() + 300
        while cache_lines(cache) < 8 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        server.kill()
        output = finish(run)
        assert run.returncode == 1, output[-3000:]
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "judgments failed" in errors[0] and "unreachable" in errors[0], output[-3000:]
        assert "Traceback" not in output and not out.exists()
        done_before = cache_lines(cache)
        assert 8 <= done_before < total
    finally:
        server.kill()

    server = VLLMServer(judge, str(tmp_path / "vllm2.log"))
    try:
        run = start(with_url(cmd, server) + ["--judge_concurrency", "4"])
        output = finish(run)
        assert run.returncode == 0, output[-3000:]
        result = read(out)
        assert result["cached"] == done_before and result["requests"] == total - done_before, output[-3000:]
        assert result["failed"] == 0 and 0 <= result["win_rate"] <= 1 and "| " in result["markdown_row"]
        print(output)
        # only ever "A": exactly 50%, from the real server
        always_first = start(with_url(cmd, server) + ["--judge_extra_body", json.dumps({"structured_outputs": {"choice": ["A"]}}),
                                    "--output_path", str(tmp_path / "first.json")])
        assert always_first.wait(300) == 0 or pytest.fail(finish(always_first)[-3000:])
        first = read(tmp_path / "first.json")
        assert first["win_rate"] == 0.5 and first["position_consistency"] == 0 and first["failed"] == 0
    finally:
        server.kill()

    # with the server gone, the rerun is answered from the cache alone
    run = start(with_url(cmd, server))
    output = finish(run)
    assert run.returncode == 0 and read(out)["requests"] == 0 and read(out)["cached"] == total, output[-3000:]
    assert read(out)["win_rate"] == result["win_rate"]
