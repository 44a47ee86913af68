"""KL(pi || pi_sft) from two calc_logprobs files scoring the same samples drawn from pi.

    python src/eval_kl.py FILE_POLICY FILE_SFT [--output_path kl.json]

KL(pi || pi_sft) = E_{x, y ~ pi}[log pi(y|x) - log pi_sft(y|x)], estimated by the mean over
every completion of logps_policy - logps_sft, with its standard error. The estimate is
unbiased only when the completions were sampled from pi at the temperature both files were
scored at, and each log-prob is of the tokens that were sampled (calc_logprobs scores a
record's completion_ids). The two files must hold the same prompts and completions in the same
order; where they record it ("temp", "scored_tokens": calc_logprobs and inference_sft
--save_logps write both), they must also have been scored at the same temperature and on the
same token sequences, else they are refused.
"""
import argparse
import math

from utils.fileio import InputError, atomic_write_json, cli_main, read_json_records, where


def read_logps(path):
    """Records of a calc_logprobs file, checked: prompt, completions and one finite logp each."""
    records = read_json_records(path)
    if not records:
        raise InputError(f"{path}: no records")
    for index, record in enumerate(records):
        for field, kind in (("prompt", str), ("completions", list), ("logps", list)):
            if field not in record:
                raise InputError(f"{where(path, index, field)}: missing field")
            if not isinstance(record[field], kind):
                got = type(record[field]).__name__
                raise InputError(f"{where(path, index, field)}: expected {kind.__name__}, got {got}")
        if len(record["logps"]) != len(record["completions"]):
            raise InputError(f"{where(path, index, 'logps')}: {len(record['logps'])} log-probs for "
                             f"{len(record['completions'])} completions")
        for j, value in enumerate(record["logps"]):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{where(path, index, 'logps')}[{j}]: expected a finite number, got {value!r:.40}")
        if "scored_tokens" in record and (not isinstance(record["scored_tokens"], list)
                                          or len(record["scored_tokens"]) != len(record["completions"])):
            raise InputError(f"{where(path, index, 'scored_tokens')}: expected one entry per completion")
    return records


def check_same_scoring(policy_path, p, sft_path, s, index):
    """Both records scored at one temperature, on one token sequence per completion."""
    if p.get("temp") != s.get("temp"):
        raise InputError(f"{where(sft_path, index, 'temp')}: scored at temperature {s.get('temp')}, but "
                         f"{policy_path} at {p.get('temp')}; score both with calc_logprobs at the sampling --temp")
    for j, (a, b) in enumerate(zip(p.get("scored_tokens") or [None] * len(p["logps"]),
                                   s.get("scored_tokens") or [None] * len(s["logps"]))):
        if a != b:
            raise InputError(f"{where(sft_path, index, 'scored_tokens')}[{j}]: scored other tokens than "
                             f"{where(policy_path, index)} did (another tokenizer, other cuts, or text instead of "
                             "completion_ids); score both with one tokenizer and the same --max_seq_len/--max_gen_len")


def kl_estimate(policy_path, sft_path):
    """{kl, se, n}: the mean of logp_policy - logp_sft over all completions of the two files and
    its standard error (completions taken as independent)."""
    policy, sft = read_logps(policy_path), read_logps(sft_path)
    if len(policy) != len(sft):
        raise InputError(f"{sft_path}: {len(sft)} records, but {policy_path} has {len(policy)}; "
                         "score the same samples with both models")
    diffs = []
    for index, (p, s) in enumerate(zip(policy, sft)):
        for field in ("prompt", "completions"):
            if p[field] != s[field]:
                raise InputError(f"{where(sft_path, index, field)}: differs from {where(policy_path, index)}; "
                                 "score the same samples with both models")
        check_same_scoring(policy_path, p, sft_path, s, index)
        diffs += [a - b for a, b in zip(p["logps"], s["logps"])]
    n = len(diffs)
    kl = math.fsum(diffs) / n
    se = math.sqrt(math.fsum((d - kl) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else math.nan
    return {"kl": kl, "se": se, "n": n}


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policy_file", help="calc_logprobs output of the policy pi on samples drawn from pi")
    parser.add_argument("sft_file", help="calc_logprobs output of the SFT (reference) model on the same samples")
    parser.add_argument("--output_path", default=None, help="also write {kl, se, n, policy, sft} to this JSON file")
    args = parser.parse_args(argv)
    result = kl_estimate(args.policy_file, args.sft_file)
    print(f"KL(pi || pi_sft) = {result['kl']:.6g} +- {result['se']:.3g} (standard error) over {result['n']} completions")
    if args.output_path:
        atomic_write_json(args.output_path, {**result, "policy": args.policy_file, "sft": args.sft_file})


if __name__ == "__main__":
    main()
