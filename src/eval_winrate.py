"""Judged win rate of a policy's samples against a baseline, position-debiased, with intervals.

    python src/eval_winrate.py --policy RESULTS/ckpt3 --baseline data/tldr --baseline_kind pref \\
        --judge openai:gpt-4o --judge_prompt exp/tldr_exp/judge_prompt.txt --output_path RESULTS/ckpt3/winrate.json

--policy is gen data (inference_sft.py output: DIR/SPLIT.json[l] or .parquet); --baseline is
gen data of another policy (e.g. the SFT model's samples), or with --baseline_kind sft / pref
a dataset whose `chosen` answers (the reference summaries, HH's chosen answers) are the
baseline. Each policy record is matched to the baseline record of the same prompt; its
completion j is compared with the baseline's completion j, or with the one reference. A
policy prompt the baseline lacks is one error line.

Judges (utils/judges.py): rm:PATH (a reward model: sigmoid(r_policy - r_baseline)), lm:PATH (a
local instruct LM's next-token probabilities of the labels), openai:MODEL (any
OpenAI-compatible chat endpoint, --judge_base_url, key in $OPENAI_API_KEY or
--judge_api_key_env), fn:FILE.py:FUNCTION (a reward function, e.g. the quickstart's VADER
oracle: fn:exp/quickstart/oracle.py:oracle_rewards).

Every pair is judged in both orders. Each order gives P(policy wins); the pair's score is
their mean when both orders agree on a side, else 0.5 (a tie): a judge that always prefers
the first answer scores exactly 50%. Reported: the win rate (mean score over prompts, each
prompt the mean of its pairs) with a 95% percentile-bootstrap interval over prompts; the tie
rate (pairs scored 0.5); position consistency (pairs whose orders agree); a length-controlled
win rate, as AlpacaEval's GLM does it: a logistic fit of the score on tanh(length difference
/ its standard deviation), in characters, read at zero difference; mean lengths; failed
judgments (a judge that gave no answer, or one that is neither label): with more than 5%
failed no win rate is given, one line says how many and why, and the exit code is 1.

Every judgment is cached on disk as it comes (--judge_cache, default beside --output_path),
keyed on the judge (with its prompt file and settings), the prompt and the two answers in
their order: a killed or repeated run asks only what it has not been told.
"""
import json
import math
import os

import numpy as np
from tqdm import tqdm

from utils.args import base_parser
from utils.data.raw_datasets import JsonDataset
from utils.fileio import InputError, TrainingStopped, atomic_write_json, cli_main, where
from utils.judges import Failed, JudgmentCache, answer_text, judge_all, make_judge

MAX_FAILED_SHARE = 0.05
BASELINE_FIELD = {"gen": "completions", "rw": "completions", "sft": "chosen", "pref": "chosen"}


def parse_args(argv=None):
    parser = base_parser(__doc__.split("\n\n")[0])
    g = parser.add_argument_group("data")
    g.add_argument("--policy", required=True, help="gen data directory of the policy's samples (SPLIT.json in it)")
    g.add_argument("--baseline", required=True,
                   help="the baseline: gen data of another policy, or a dataset of reference answers (--baseline_kind)")
    g.add_argument("--baseline_kind", default="gen", choices=sorted(BASELINE_FIELD),
                   help="gen / rw: the baseline's completions; sft / pref: its `chosen` answers (the reference)")
    g.add_argument("--split", default="test", choices=["train", "test"], help="which split of both to compare")
    g.add_argument("--num_prompts", type=int, default=-1, help="judge the first N policy records only; -1: all")
    g = parser.add_argument_group("judge")
    g.add_argument("--judge", required=True, metavar="rm:PATH|lm:PATH|openai:MODEL|fn:FILE.py:FUNCTION",
                   help="who judges; see the module docstring")
    g.add_argument("--judge_prompt", default=None,
                   help="judge prompt file with {prompt}, {first}, {second}, asking for A or B (lm and openai "
                        "judges); exp/tldr_exp/judge_prompt.txt and exp/hh_exp/judge_prompt.txt are the recipes'")
    g.add_argument("--judge_cache", default=None,
                   help="JSON-lines cache of every judgment; default OUTPUT_PATH with .judgments.jsonl")
    g.add_argument("--batch_size", type=int, default=8, help="sequences per forward of the rm and lm judges")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="precision of a local judge")
    g.add_argument("--max_seq_len", type=int, default=512,
                   help="rm judge: prompt + answer tokens (prompt cut on the left), as inference_rm.py takes it")
    g.add_argument("--max_gen_len", type=int, default=256, help="rm judge: answer tokens (cut on the right)")
    g.add_argument("--chat_template", default="auto",
                   help="rm judge: how conversational records are rendered (auto, none or a Jinja PATH)")
    g.add_argument("--trust_remote_code", action="store_true", help="allow a local judge's own model code to run")
    g = parser.add_argument_group("openai judge")
    g.add_argument("--judge_base_url", default=None,
                   help="the endpoint, e.g. http://127.0.0.1:8000/v1 for a local vLLM server; default OpenAI's")
    g.add_argument("--judge_api_key_env", default="OPENAI_API_KEY",
                   help="environment variable holding the key (a local server without one needs none)")
    g.add_argument("--judge_concurrency", type=int, default=8, help="requests in flight at most")
    g.add_argument("--judge_timeout", type=float, default=60, help="seconds one request may take")
    g.add_argument("--judge_retries", type=int, default=4,
                   help="retries of a request that got a 429, a 5xx, a timeout or no connection")
    g.add_argument("--judge_backoff", type=float, default=1.0, help="seconds before the first retry; doubles each time")
    g.add_argument("--max_requests", type=int, default=None,
                   help="hard budget of requests this run sends, retries included (cached judgments cost none); "
                        "judgments past it fail, and a rerun resumes from the cache")
    g.add_argument("--judge_max_tokens", type=int, default=4, help="tokens the judge may reply with")
    g.add_argument("--judge_extra_body", type=json.loads, default=None, metavar="JSON",
                   help="extra request fields, e.g. vLLM's '{\"structured_outputs\": {\"choice\": [\"A\", \"B\"]}}' "
                        "to allow only the labels")
    g = parser.add_argument_group("report")
    g.add_argument("--output_path", required=True, help="JSON file of the results (a markdown row is in it too)")
    g.add_argument("--name", default=None, help="the policy's name in the markdown row; default --policy")
    g.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the prompts")
    g.add_argument("--seed", type=int, default=0, help="seeds the bootstrap")
    args = parser.parse_args(argv)
    for name in ("batch_size", "judge_concurrency", "bootstrap"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.judge_retries < 0 or args.judge_timeout <= 0 or args.judge_backoff < 0:
        raise InputError("--judge_retries and --judge_backoff must be non-negative, --judge_timeout positive")
    if args.max_requests is not None and args.max_requests < 0:
        raise InputError(f"--max_requests must be non-negative, got {args.max_requests}")
    if args.num_prompts == 0 or args.num_prompts < -1:
        raise InputError(f"--num_prompts must be -1 (all) or at least 1, got {args.num_prompts}")
    if args.judge_cache is None:
        args.judge_cache = os.path.splitext(args.output_path)[0] + ".judgments.jsonl"
    return args


def prompt_key(prompt):
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def read_split(path, kind, split, flag):
    if not os.path.exists(path):
        raise InputError(f"{flag} {path}: no such file or directory")
    source = JsonDataset(os.path.basename(os.path.normpath(path)), path, kind)
    records = source.records(split)
    if not records:
        raise InputError(f"{source.source(split)}: no records")
    return records, source.source(split)


def pairs_to_judge(args):
    """(prompt, policy answer, baseline answer, record index) of every pair, and the two sources."""
    policy, policy_file = read_split(args.policy, "gen", args.split, "--policy")
    if args.num_prompts > 0:
        policy = policy[:args.num_prompts]
    baseline, baseline_file = read_split(args.baseline, args.baseline_kind, args.split, "--baseline")
    field = BASELINE_FIELD[args.baseline_kind]
    by_prompt = {}
    for record in baseline:
        by_prompt.setdefault(prompt_key(record["prompt"]), record)
    pairs = []
    for index, record in enumerate(policy):
        base = by_prompt.get(prompt_key(record["prompt"]))
        if base is None:
            raise InputError(f"{where(policy_file, index, 'prompt')}: no record of {baseline_file} has this prompt "
                             f"({str(record['prompt'])[:60]!r}); compare samples of the same prompts")
        answers = base[field] if field == "completions" else [base[field]]
        if len(answers) != 1 and len(answers) < len(record["completions"]):
            raise InputError(f"{where(baseline_file, None, field)}: {len(answers)} answers to the prompt of "
                             f"{where(policy_file, index)}, which has {len(record['completions'])}; the baseline "
                             "needs one answer per prompt, or at least as many as the policy")
        for j, completion in enumerate(record["completions"]):
            pairs.append((record["prompt"], completion, answers[j if len(answers) > 1 else 0], index))
    return pairs, policy_file, baseline_file


def pair_scores(forward, backward):
    """(score, consistent) of one pair from P(policy first wins) and P(baseline first wins)."""
    a, b = forward, 1 - backward  # both P(policy wins)
    consistent = (a > 0.5 and b > 0.5) or (a < 0.5 and b < 0.5) or (a == 0.5 and b == 0.5)
    return ((a + b) / 2 if consistent else 0.5), consistent


def bootstrap_interval(per_prompt, resamples, seed):
    rng = np.random.default_rng(seed)
    values = np.asarray(per_prompt, dtype=float)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def length_controlled(scores, length_diffs, iterations=50, ridge=1e-4):
    """sigmoid(a) of the logistic fit score ~ sigmoid(a + b tanh(d / std d)) (AlpacaEval's
    length term), by Newton's method on the soft scores; a tiny ridge keeps a one-sided sample finite."""
    y = np.asarray(scores, dtype=float)
    d = np.asarray(length_diffs, dtype=float)
    std = d.std()
    x = np.stack([np.ones_like(d), np.tanh(d / std) if std > 0 else np.zeros_like(d)], axis=1)
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-x @ w))
        gradient = x.T @ (p - y) + ridge * len(y) * w
        hessian = (x * (p * (1 - p))[:, None]).T @ x + ridge * len(y) * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-w[0])))


def summarise(pairs, forward, backward, resamples, seed):
    """The report of judged pairs: forward[i] = P(policy first wins), backward[i] = P(baseline first wins)."""
    total = 2 * len(pairs)
    failures = [v for v in forward + backward if isinstance(v, Failed)]
    result = {"num_pairs": len(pairs), "num_prompts": len({p[3] for p in pairs}), "judgments": total,
              "failed": len(failures)}
    if failures:
        reasons = {}
        for f in failures:
            reasons[f.reason] = reasons.get(f.reason, 0) + 1
        result["failure_reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    per_prompt, scores, consistent, diffs, lengths = {}, [], [], [], []
    for (prompt, answer, base, index), f, b in zip(pairs, forward, backward):
        if isinstance(f, Failed) or isinstance(b, Failed):
            continue
        score, agree = pair_scores(f, b)
        per_prompt.setdefault(index, []).append(score)
        scores.append(score)
        consistent.append(agree)
        lengths.append((len(answer_text(answer)), len(answer_text(base))))
        diffs.append(lengths[-1][0] - lengths[-1][1])
    result["valid_pairs"] = len(scores)
    if not scores:
        return result
    prompt_means = [sum(v) / len(v) for v in per_prompt.values()]
    low, high = bootstrap_interval(prompt_means, resamples, seed)
    result.update(
        win_rate=sum(prompt_means) / len(prompt_means), ci_low=low, ci_high=high,
        tie_rate=sum(s == 0.5 for s in scores) / len(scores),
        position_consistency=sum(consistent) / len(consistent),
        lc_win_rate=length_controlled(scores, diffs),
        mean_length_policy=sum(p for p, _ in lengths) / len(lengths),
        mean_length_baseline=sum(b for _, b in lengths) / len(lengths))
    return result


MARKDOWN_HEADER = ("| policy | judge | win rate [95% CI] | LC win rate | ties | position consistency | "
                   "mean length (policy / baseline) | failed |\n|---|---|---|---|---|---|---|---|")


def markdown_row(name, judge, r):
    return (f"| {name} | {judge} | {r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
            f"{r['lc_win_rate']:.3f} | {r['tie_rate']:.3f} | {r['position_consistency']:.3f} | "
            f"{r['mean_length_policy']:.0f} / {r['mean_length_baseline']:.0f} | {r['failed']} of {r['judgments']} |")


@cli_main
def main(argv=None):
    args = parse_args(argv)
    pairs, policy_file, baseline_file = pairs_to_judge(args)
    judge = make_judge(args.judge, args)
    cache = JudgmentCache(args.judge_cache, judge.id)
    triples = [(p, a, b) for p, a, b, _ in pairs] + [(p, b, a) for p, a, b, _ in pairs]
    with tqdm(total=len(triples), desc="judging", unit="judgment") as progress:
        values, cached = judge_all(judge, triples, cache, progress)
    forward, backward = values[:len(pairs)], values[len(pairs):]
    result = summarise(pairs, forward, backward, args.bootstrap, args.seed)
    requests = getattr(judge, "requests", None)
    result.update(judge=args.judge, judge_prompt=args.judge_prompt, policy=policy_file, baseline=baseline_file,
                  cached=cached, requests=requests, judge_cache=args.judge_cache)
    asked = f"{cached} judgments from the cache" + (f", {requests} requests sent" if requests is not None else "")
    if result["failed"] > MAX_FAILED_SHARE * result["judgments"]:
        reason, count = next(iter(result["failure_reasons"].items()))
        raise TrainingStopped(f"{result['failed']} of {result['judgments']} judgments failed (more than "
                              f"{MAX_FAILED_SHARE:.0%}), so no win rate is given; most often ({count}x): {reason}. "
                              f"{asked}; a rerun asks only what is not in {args.judge_cache}")
    if "win_rate" not in result:
        raise TrainingStopped("no pair was judged")
    name = args.name or args.policy
    result["markdown_header"], result["markdown_row"] = MARKDOWN_HEADER, markdown_row(name, args.judge, result)
    atomic_write_json(args.output_path, result)
    print(f"win rate of {name} vs {baseline_file}: {result['win_rate']:.3f} [{result['ci_low']:.3f}, "
          f"{result['ci_high']:.3f}] over {result['num_prompts']} prompts, {result['num_pairs']} pairs; "
          f"length-controlled {result['lc_win_rate']:.3f}; ties {result['tie_rate']:.3f}, position consistency "
          f"{result['position_consistency']:.3f}; {result['failed']} of {result['judgments']} judgments failed; "
          f"{asked}")
    print(MARKDOWN_HEADER)
    print(result["markdown_row"])
    print(f"wrote {args.output_path}")


if __name__ == "__main__":
    main()
