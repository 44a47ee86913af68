"""Evaluate policies as the paper's IMDB experiment does: oracle reward and KL(pi || pi_sft).

    python exp/quickstart/evaluate.py --prompts review/sft:DATA --sft_model SFT \\
        --model ckpt1=models/x/ckpt1 --model ckpt2=models/x/ckpt2 --output_dir eval/x \\
        [--reward_model RM] [--oracle vader|none]

For each NAME=PATH, in OUTPUT_DIR/NAME:
  test.json          completions of the test prompts sampled from the policy (src/inference_sft.py)
  logps_policy.json  their log-probs under the policy, logps_sft.json under the SFT model
                     (src/calc_logprobs.py), at the sampling temperature
  kl.json            KL(pi || pi_sft) = mean log-ratio over the samples (src/eval_kl.py)
  oracle/test.json   the samples' oracle rewards, as rw data: VADER's (oracle.py) or, with --oracle rm:PATH,
                     a one-logit model's (src/inference_rm.py; the IMDB recipe's sentiment classifier)
  reward.json        their mean oracle reward; neither with --oracle none
  rw/test.json       with --reward_model: the samples scored by it, as rw data (src/inference_rm.py)
  rm_reward.json     with --reward_model: their mean reward-model reward
  winrate.json       with --winrate_baseline: the samples' win rate against the baseline's samples of the
                     same prompts, judged by the oracle in both orders (src/eval_winrate.py)

These are the entry points a GPU user runs one launcher call at a time; here they are called
in one process, because on a CPU each launch costs ~15 s of start-up for a few seconds of work,
and a dozen checkpoints would spend most of the quickstart starting Python. Each step's
output is kept by a rerun only when its record, OUTPUT_DIR/NAME/stages/STEP.json
(utils/provenance.py), says it was made from the same inputs (the digests of the model, the
data and the files it reads, and its settings) and its files are unchanged: a rerun after a
crash resumes, and one with another model, baseline, judge or setting redoes what they
change. A model whose path is --sft_model is the SFT model itself: its KL is 0 by definition
and is recorded without scoring.
"""
import argparse
import os
import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parent
REPO_ROOT = QUICKSTART.parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import calc_logprobs  # noqa: E402
import eval_kl  # noqa: E402
import eval_winrate  # noqa: E402
import inference_rm  # noqa: E402
import inference_sft  # noqa: E402
from utils import provenance  # noqa: E402
from utils.fileio import InputError, atomic_write_json, cli_main, read_json_records  # noqa: E402
from utils.inference import reward_summary  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True, help="NAME/KIND:PATH whose test split holds the prompts")
    parser.add_argument("--dataset_module", nargs="*", default=[], metavar="MODULE",
                        help="Python files or module names that register the prompts' dataset class")
    parser.add_argument("--sft_model", required=True, help="the SFT model, pi_sft of the KL")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="a policy to evaluate (repeatable); results go to OUTPUT_DIR/NAME")
    parser.add_argument("--output_dir", required=True, help="one subdirectory per policy is written here")
    parser.add_argument("--return_num", type=int, default=4, help="completions sampled per test prompt")
    parser.add_argument("--temp", type=float, default=0.8, help="sampling temperature, also used for the log-probs")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens sampled per completion at most")
    parser.add_argument("--max_length", type=int, default=96, help="prompt + new tokens when sampling")
    parser.add_argument("--max_seq_len", type=int, default=None,
                        help="prompt + completion tokens when scoring; default --max_length + 8")
    parser.add_argument("--max_gen_len", type=int, default=None,
                        help="completion tokens when scoring (EOS included); default --max_new_tokens + 8")
    parser.add_argument("--batch_size", type=int, default=32, help="prompts (or records) per batch")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed (the same for every policy)")
    parser.add_argument("--reward_model", default=None,
                        help="also score the samples with this reward model: rw/test.json and rm_reward.json")
    parser.add_argument("--oracle", default="vader",
                        help="vader: the quickstart's oracle reward, VADER's sentiment of prompt + completion; "
                             "rm:PATH: the score of a one-logit model (a reward model, or train_class.py's classifier, "
                             "whose logit is the IMDB recipe's oracle log-odds); none: no oracle")
    parser.add_argument("--winrate_baseline", default=None, metavar="GEN_DIR",
                        help="also judge each policy's samples against these (e.g. the SFT model's test samples): "
                             "winrate.json; not for the --sft_model itself")
    parser.add_argument("--winrate_judge", default=f"fn:{QUICKSTART / 'oracle.py'}:oracle_rewards",
                        help="the judge of --winrate_baseline (src/eval_winrate.py --judge); default the VADER oracle")
    args = parser.parse_args(argv)
    if args.oracle not in ("vader", "none") and not (args.oracle.startswith("rm:") and args.oracle[3:]):
        raise InputError(f"--oracle {args.oracle!r}: expected vader, none or rm:PATH")
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--model {spec!r}: expected NAME=PATH")
    return args


def step(out, name, made_from, outputs, run):
    """Run `run()` unless OUT/stages/NAME.json records that `outputs` were made from `made_from`
    and they are unchanged; then record them."""
    record = os.path.join(out, "stages", f"{name}.json")
    reason = provenance.why_not_reusable(record, made_from, outputs)
    if reason is None:
        print(f"{out}: {name} made from the same inputs before, kept", flush=True)
        return
    if reason != "not done yet":
        print(f"{out}: {name} redone ({reason})", flush=True)
    run()
    provenance.write_record(record, made_from, outputs)


def data_digest(spec):
    """The digest of the data of a NAME/KIND:PATH spec (None for a hub id: the spec names it)."""
    return provenance.digest(spec.partition(":")[2]) if ":" in spec else None


def judge_digest(spec):
    """The digest of an fn: judge's file (its code is the judge), or of an rm:/lm: judge's model."""
    kind, _, target = spec.partition(":")
    if kind == "fn":
        return provenance.digest(target.rpartition(":")[0])
    return provenance.digest(target) if kind in ("rm", "lm") else None


def evaluate(name, model_path, args):
    out = os.path.join(args.output_dir, name)
    samples = os.path.join(out, "test.json")
    # scoring cuts, by default with room for every sampled token (the stop token included): nothing the
    # sampler drew is cut
    lengths = ["--max_seq_len", str(args.max_seq_len or args.max_length + 8),
               "--max_gen_len", str(args.max_gen_len or args.max_new_tokens + 8)]
    sampling = {"model": provenance.digest(model_path), "prompts": args.prompts, "data": data_digest(args.prompts),
                "dataset_module": [[m, provenance.digest(m)] for m in args.dataset_module],
                **{k: getattr(args, k) for k in ("return_num", "temp", "max_new_tokens", "max_length", "batch_size",
                                                 "seed")}}
    step(out, "samples", sampling, [samples], lambda: inference_sft.main(
        ["--model_name_or_path", model_path, "--data_name_path", args.prompts, "--split", "test",
         "--return_num", str(args.return_num), "--temp", str(args.temp), "--top_k", "0", "--top_p", "1.0",
         "--max_new_tokens", str(args.max_new_tokens), "--max_length", str(args.max_length),
         "--batch_size", str(args.batch_size), "--seed", str(args.seed), "--output_path", out,
         "--dataset_module", *args.dataset_module]))
    scoring = {"samples": provenance.digest(samples), "lengths": lengths, "batch_size": args.batch_size}
    kl_file = os.path.join(out, "kl.json")
    if os.path.abspath(model_path) == os.path.abspath(args.sft_model):
        atomic_write_json(kl_file, {"kl": 0.0, "n": 0, "policy": model_path, "sft": model_path})
    else:
        logps = {}
        for role, path in (("policy", model_path), ("sft", args.sft_model)):
            logps[role] = os.path.join(out, f"logps_{role}.json")
            step(out, f"logps_{role}", {**scoring, "model": provenance.digest(path), "temp": args.temp}, [logps[role]],
                 lambda path=path, role=role: calc_logprobs.main(
                     ["--model_name_or_path", path, "--data_path", out, "--split", "test", "--temp", str(args.temp),
                      "--batch_size", str(args.batch_size), *lengths, "--output_path", logps[role]]))
        step(out, "kl", {role: provenance.digest(f) for role, f in logps.items()}, [kl_file],
             lambda: eval_kl.main([logps["policy"], logps["sft"], "--output_path", kl_file]))
    if args.reward_model:
        rw_dir = os.path.join(out, "rw")
        step(out, "rw", {**scoring, "reward_model": provenance.digest(args.reward_model)}, [rw_dir],
             lambda: inference_rm.main(["--model_name_or_path", args.reward_model, "--data_path", out, "--split",
                                        "test", "--mode", "label", "--batch_size", str(args.batch_size), *lengths,
                                        "--output_path", rw_dir]))
        rm_summary = reward_summary([r["rewards"] for r in read_json_records(os.path.join(rw_dir,
                                                                                                         "test.json"))])
        atomic_write_json(os.path.join(out, "rm_reward.json"), {**rm_summary, "model": args.reward_model})
        print(f"{name}: reward-model reward {rm_summary['mean']:.4f} (std {rm_summary['std']:.4f})", flush=True)
    if args.winrate_baseline and os.path.abspath(model_path) != os.path.abspath(args.sft_model):
        winrate_file = os.path.join(out, "winrate.json")
        judged = {"samples": provenance.digest(samples), "baseline": provenance.digest(args.winrate_baseline),
                  "judge": args.winrate_judge, "judge_digest": judge_digest(args.winrate_judge), "name": name}
        step(out, "winrate", judged, [winrate_file], lambda: eval_winrate.main(
            ["--policy", out, "--baseline", args.winrate_baseline, "--judge", args.winrate_judge, "--name", name,
             "--output_path", winrate_file]))
    if args.oracle != "none":
        oracle_dir = os.path.join(out, "oracle")
        if args.oracle == "vader":
            from oracle import label_rewards
            label_rewards(samples, oracle_dir)
        else:
            oracle_model = args.oracle[3:]
            step(out, "oracle", {**scoring, "oracle": provenance.digest(oracle_model)}, [oracle_dir],
                 lambda: inference_rm.main(["--model_name_or_path", oracle_model, "--data_path", out, "--split", "test",
                                            "--mode", "label", "--batch_size", str(args.batch_size), *lengths,
                                            "--output_path", oracle_dir]))
        rewards = [r["rewards"] for r in read_json_records(os.path.join(oracle_dir, "test.json"))]
        summary = {k: v for k, v in reward_summary(rewards).items() if k != "num_prompts"}
        atomic_write_json(os.path.join(out, "reward.json"), summary)
        print(f"{name}: oracle reward {summary['mean']:.4f} (std {summary['std']:.4f}, n {summary['n']})", flush=True)

@cli_main
def main(argv=None):
    args = parse_args(argv)
    for spec in args.model:
        name, _, path = spec.partition("=")
        evaluate(name, path, args)


if __name__ == "__main__":
    main()
