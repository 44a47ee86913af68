"""Judged win rate of a policy's samples against a baseline, position-debiased, with intervals.

    python src/eval_winrate.py --policy RESULTS/ckpt3 --baseline data/tldr --baseline_kind pref \\
        --judge openai:gpt-4o --judge_prompt exp/tldr_exp/judge_prompt.txt --output_path RESULTS/ckpt3/winrate.json

--policy is gen data (inference_sft.py output: DIR/SPLIT.json[l] or .parquet); --baseline is
gen data of another policy (e.g. the SFT model's samples), or with --baseline_kind sft / pref
a dataset whose `chosen` answers (the reference summaries, HH's chosen answers) are the
baseline. Each policy record is matched to the baseline record of the same prompt; its
completion j is compared with the baseline's completion j, or with the one reference. A
policy prompt the baseline lacks is one error line.

Repeated prompts. A prompt that several policy records share is one prompt: its records'
completions are pooled in file order, their pairs averaged together, and it is one unit of
the bootstrap (the report counts the records pooled). In gen baselines (samples, as the
quickstart's, whose test prompts repeat as real openings do) a repeated prompt's records are
more samples of it, pooled alike: the prompt's k-th policy completion meets its k-th baseline
sample. A reference baseline (sft / pref: one `chosen` answer each) that answers a prompt
differently in two records is refused, in one line naming the prompt and both records;
--baseline_duplicates first keeps the first record's answer, counting and listing the records
left out (the TL;DR and HH comparisons repeat a post with another chosen answer each time).
The same answer twice is one answer.

Judges (utils/judges.py): rm:PATH (a reward model: sigmoid(r_policy - r_baseline)), lm:PATH (a
local instruct LM's next-token probabilities of the labels), openai:MODEL (any
OpenAI-compatible chat endpoint, --judge_base_url, key in $OPENAI_API_KEY or
--judge_api_key_env), fn:FILE.py:FUNCTION (a reward function, e.g. the quickstart's VADER
oracle: fn:exp/quickstart/oracle.py:oracle_rewards).

Every pair is judged in both orders. Each order gives P(policy wins); the pair's score is
their mean when both orders agree on a side, else 0.5 (a tie): a judge that always prefers
the first answer scores exactly 50%. Reported (utils/winrate_stats.py has the math):

- the win rate: the mean over prompts of each prompt's mean pair score, with a 95% interval
  over prompts: the percentile bootstrap, or, below 30 prompts or at a win rate of exactly 0
  or 1, where the bootstrap under-covers, the Wilson score interval (the report says which);
- the tie rate (pairs scored 0.5) and position consistency (pairs whose orders agree);
- the length-controlled win rate, AlpacaEval 2's length_controlled_minimal estimator on the
  judged pairs (L1 logistic regression of the soft scores on tanh of the standardised length
  difference, penalty by 5-fold cross-validation, read at zero difference); for several
  policies against one baseline, eval_winrate_joint.py adds AlpacaEval's prompt-difficulty term;
- mean lengths (characters), and every pair's score and lengths (`judged_pairs`);
- failed judgments: whatever a judge gives that is not a finite probability (NaN, None, an
  exception, a reply that is neither label, a request budget spent) is a failed judgment, never
  a tie: counted by reason and listed (policy record, completion, order, reason). With more
  than 5% failed no win rate is given: one line says how many and why, and the exit code is 1.
  Below that, a pair with a failed order is left out.

Every judgment is cached on disk as it comes (--judge_cache, default beside --output_path),
keyed on the judge (with its prompt file and settings), the prompt and the two answers in
their order: a killed or repeated run asks only what it has not been told.
"""
import hashlib
import json
import os
from collections import namedtuple

from tqdm import tqdm

from utils import winrate_stats as stats
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
    g.add_argument("--baseline_duplicates", default="refuse", choices=["refuse", "first"],
                   help="a prompt that the baseline answers differently in two records: refuse (one error line "
                        "naming both), or first: keep the first record's answer (those left out are counted)")
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


def prompt_id(prompt):
    """A short stable name of a prompt, the same in every policy's report (the joint LC fit
    matches prompts by it)."""
    return hashlib.sha256(prompt_key(prompt).encode()).hexdigest()[:16]


def read_split(path, kind, split, flag):
    if not os.path.exists(path):
        raise InputError(f"{flag} {path}: no such file or directory")
    source = JsonDataset(os.path.basename(os.path.normpath(path)), path, kind)
    records = source.records(split)
    if not records:
        raise InputError(f"{source.source(split)}: no records")
    return records, source.source(split)


# one judged pair: `unit` is the prompt's unit of the average and the bootstrap (the index of the
# prompt's first policy record), `record` and `completion` where the policy answer is
Pair = namedtuple("Pair", "prompt answer baseline unit record completion", defaults=(None, None))


def baseline_by_prompt(baseline, baseline_file, field, duplicates):
    """{prompt key: (first record index, answers)} of the baseline, and the indices of the
    records pooled into an earlier one's prompt and of those left out.

    Samples (`completions`): the records of a repeated prompt are more samples of it, pooled in
    file order. Reference answers (`chosen`): the same answer twice is one; a prompt answered
    differently by two records is refused, or with --baseline_duplicates first its first
    record's answer is kept and the others are counted."""
    by_prompt, pooled, dropped = {}, [], []
    for index, record in enumerate(baseline):
        key = prompt_key(record["prompt"])
        answers = list(record[field]) if field == "completions" else [record[field]]
        if key not in by_prompt:
            by_prompt[key] = (index, answers)
        elif field == "completions":
            by_prompt[key][1].extend(answers)
            pooled.append(index)
        elif by_prompt[key][1] != answers:
            if duplicates != "first":
                raise InputError(f"{where(baseline_file, index, field)}: answers the prompt "
                                 f"{str(record['prompt'])[:60]!r} differently from {where(baseline_file, by_prompt[key][0])}"
                                 "; a reference baseline needs one answer per prompt (--baseline_duplicates first "
                                 "keeps the first record's)")
            dropped.append(index)
    return by_prompt, pooled, dropped


def policy_by_prompt(policy):
    """{prompt key: [(record index, completion index, completion), ...]}: a repeated prompt's
    records pooled in file order (one prompt, one unit)."""
    pooled = {}
    for index, record in enumerate(policy):
        pooled.setdefault(prompt_key(record["prompt"]), []).extend(
            (index, j, completion) for j, completion in enumerate(record["completions"]))
    return pooled


def pairs_to_judge(args):
    """The Pairs to judge, the two sources and what was pooled or left out. A prompt's k-th
    policy completion (its records' completions in file order) is compared with the baseline's
    one answer to it, or with its k-th sample."""
    policy, policy_file = read_split(args.policy, "gen", args.split, "--policy")
    if args.num_prompts > 0:
        policy = policy[:args.num_prompts]
    baseline, baseline_file = read_split(args.baseline, args.baseline_kind, args.split, "--baseline")
    field = BASELINE_FIELD[args.baseline_kind]
    by_prompt, base_pooled, dropped = baseline_by_prompt(baseline, baseline_file, field, args.baseline_duplicates)
    pairs = []
    for key, completions in policy_by_prompt(policy).items():
        unit, prompt = completions[0][0], policy[completions[0][0]]["prompt"]
        if key not in by_prompt:
            raise InputError(f"{where(policy_file, unit, 'prompt')}: no record of {baseline_file} has this prompt "
                             f"({str(prompt)[:60]!r}); compare samples of the same prompts")
        base_index, answers = by_prompt[key]
        if len(answers) != 1 and len(answers) < len(completions):
            raise InputError(f"{where(baseline_file, base_index, field)}: {len(answers)} answers to the prompt of "
                             f"{where(policy_file, unit)}, which has {len(completions)} (its records together); "
                             "the baseline needs one answer per prompt, or at least as many as the policy")
        for k, (index, j, completion) in enumerate(completions):
            pairs.append(Pair(prompt, completion, answers[k if len(answers) > 1 else 0], unit, index, j))
    pooled = {"policy_records": len(policy), "policy_records_pooled": len(policy) - len({p.unit for p in pairs}),
              "baseline_records_pooled": len(base_pooled), "baseline_records_left_out": dropped}
    return pairs, policy_file, baseline_file, pooled


def pair_scores(forward, backward):
    """(score, consistent) of one pair from P(policy first wins) and P(baseline first wins)."""
    a, b = forward, 1 - backward  # both P(policy wins)
    consistent = (a > 0.5 and b > 0.5) or (a < 0.5 and b < 0.5) or (a == 0.5 and b == 0.5)
    return ((a + b) / 2 if consistent else 0.5), consistent


def failures(pairs, forward, backward):
    """Every failed judgment: where (policy record, completion, order) and why; and the count of each reason."""
    listed, reasons = [], {}
    for pair, f, b in zip(pairs, forward, backward):
        for order, value in (("policy first", f), ("baseline first", b)):
            if isinstance(value, Failed):
                listed.append({"record": pair.record, "completion": pair.completion, "order": order,
                               "reason": value.reason})
                reasons[value.reason] = reasons.get(value.reason, 0) + 1
    return listed, dict(sorted(reasons.items(), key=lambda kv: -kv[1]))


def interval(prompt_means, resamples, seed):
    """The reported 95% interval over prompts: the percentile bootstrap, or Wilson's score
    interval where the bootstrap under-covers (utils/winrate_stats.py), and both."""
    mean = sum(prompt_means) / len(prompt_means)
    boot = stats.bootstrap_interval(prompt_means, resamples, seed)
    wilson = stats.wilson_interval(mean, len(prompt_means))
    why = stats.bootstrap_under_covers(prompt_means)
    out = {"ci_low": (wilson if why else boot)[0], "ci_high": (wilson if why else boot)[1],
           "ci_method": "wilson" if why else "percentile bootstrap", "bootstrap_ci": list(boot),
           "wilson_ci": list(wilson)}
    if why:
        out["ci_note"] = (f"{why}: the percentile bootstrap interval under-covers here, so the interval is the "
                          "Wilson score interval over prompts")
    return out


def length_controlled(judged):
    """AlpacaEval 2's length_controlled_minimal win rate of the judged pairs, as report fields."""
    lc = stats.lc_minimal([p["score"] for p in judged], [p["length_policy"] for p in judged],
                          [p["length_baseline"] for p in judged])
    if "lc_unavailable" in lc:
        return {"lc_win_rate": None, "lc_unavailable": lc["lc_unavailable"]}
    return {"lc_win_rate": lc["lc_win_rate"], "lc_length_weight": lc["length_weight"], "lc_C": lc["C"]}


def summarise(pairs, forward, backward, resamples, seed):
    """The report of judged Pairs: forward[i] = P(policy first wins), backward[i] = P(baseline first wins)."""
    listed, reasons = failures(pairs, forward, backward)
    result = {"num_pairs": len(pairs), "num_prompts": len({p.unit for p in pairs}), "judgments": 2 * len(pairs),
              "failed": len(listed)}
    if listed:
        result.update(failure_reasons=reasons, failed_judgments=listed)
    per_prompt, judged = {}, []
    for pair, f, b in zip(pairs, forward, backward):
        if isinstance(f, Failed) or isinstance(b, Failed):
            continue
        score, agree = pair_scores(f, b)
        per_prompt.setdefault(pair.unit, []).append(score)
        judged.append({"prompt": prompt_id(pair.prompt), "record": pair.record, "completion": pair.completion,
                       "score": score, "consistent": agree, "length_policy": len(answer_text(pair.answer)),
                       "length_baseline": len(answer_text(pair.baseline))})
    result["valid_pairs"] = len(judged)
    if not judged:
        return result
    prompt_means = [sum(v) / len(v) for v in per_prompt.values()]
    result.update(win_rate=sum(prompt_means) / len(prompt_means), **interval(prompt_means, resamples, seed),
                  tie_rate=sum(p["score"] == 0.5 for p in judged) / len(judged),
                  position_consistency=sum(p["consistent"] for p in judged) / len(judged),
                  **length_controlled(judged), lc_estimator=LC_ESTIMATOR,
                  mean_length_policy=sum(p["length_policy"] for p in judged) / len(judged),
                  mean_length_baseline=sum(p["length_baseline"] for p in judged) / len(judged),
                  judged_pairs=judged)
    return result


LC_ESTIMATOR = "AlpacaEval 2 length_controlled_minimal (alpaca-eval 0.6.6 glm_winrate), on the judged pairs"
MARKDOWN_HEADER = ("| policy | judge | win rate [95% CI] | LC win rate | ties | position consistency | "
                   "mean length (policy / baseline) | failed |\n|---|---|---|---|---|---|---|---|")


def markdown_row(name, judge, r):
    lc = "—" if r["lc_win_rate"] is None else f"{r['lc_win_rate']:.3f}"
    wilson = " (Wilson)" if r["ci_method"] == "wilson" else ""
    return (f"| {name} | {judge} | {r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]{wilson} | "
            f"{lc} | {r['tie_rate']:.3f} | {r['position_consistency']:.3f} | "
            f"{r['mean_length_policy']:.0f} / {r['mean_length_baseline']:.0f} | {r['failed']} of {r['judgments']} |")


def report_line(name, baseline_file, r, asked):
    lc = "none" if r["lc_win_rate"] is None else f"{r['lc_win_rate']:.3f}"
    pooled = r["duplicates"]
    notes = [r["ci_note"]] if "ci_note" in r else []
    if pooled["policy_records_pooled"] or pooled["baseline_records_pooled"]:
        notes.append(f"{pooled['policy_records_pooled']} policy and {pooled['baseline_records_pooled']} baseline "
                     "records of a repeated prompt pooled with its first (one prompt, one unit)")
    if pooled["baseline_records_left_out"]:
        notes.append(f"{len(pooled['baseline_records_left_out'])} baseline records of a repeated prompt left out "
                     "(--baseline_duplicates first)")
    return (f"win rate of {name} vs {baseline_file}: {r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
            f"over {r['num_prompts']} prompts, {r['num_pairs']} pairs; length-controlled (AlpacaEval 2 minimal) {lc}; "
            f"ties {r['tie_rate']:.3f}, position consistency {r['position_consistency']:.3f}; {r['failed']} of "
            f"{r['judgments']} judgments failed; {asked}" + "".join(f"\nnote: {n}" for n in notes))


@cli_main
def main(argv=None):
    args = parse_args(argv)
    pairs, policy_file, baseline_file, pooled = pairs_to_judge(args)
    judge = make_judge(args.judge, args)
    cache = JudgmentCache(args.judge_cache, judge.id)
    triples = [(p.prompt, p.answer, p.baseline) for p in pairs] + [(p.prompt, p.baseline, p.answer) for p in pairs]
    with tqdm(total=len(triples), desc="judging", unit="judgment") as progress:
        values, cached = judge_all(judge, triples, cache, progress)
    forward, backward = values[:len(pairs)], values[len(pairs):]
    result = summarise(pairs, forward, backward, args.bootstrap, args.seed)
    requests = getattr(judge, "requests", None)
    result.update(judge=args.judge, judge_prompt=args.judge_prompt, policy=policy_file, baseline=baseline_file,
                  cached=cached, requests=requests, judge_cache=args.judge_cache, duplicates=pooled)
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
    for long in ("failed_judgments", "judged_pairs"):  # the lists last, after what a reader looks for
        if long in result:
            result[long] = result.pop(long)
    atomic_write_json(args.output_path, result)
    print(report_line(name, baseline_file, result, asked))
    print(MARKDOWN_HEADER)
    print(result["markdown_row"])
    print(f"wrote {args.output_path}")


if __name__ == "__main__":
    main()
