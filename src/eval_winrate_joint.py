"""Length-controlled win rates of several policies judged against one baseline, with prompt difficulty.

    python src/eval_winrate_joint.py RESULTS/ckpt1/winrate.json RESULTS/ckpt2/winrate.json ... \\
        --output_path RESULTS/winrate_joint.json

Each file is an eval_winrate.py report; all must have judged the same prompts against the same
baseline with the same judge (the quickstart's checkpoints against the SFT model's samples, a
sweep's checkpoints against the reference answers). Their judged pairs are fitted together:
AlpacaEval's length_controlled_v1 features (tanh of the standardised length difference, a
per-prompt instruction difficulty and a constant), with the difficulties fitted on these
policies, jointly, since AlpacaEval's exist only for its own 805 instructions; without v1's
regularisation towards AlpacaEval's two length-gamed baselines (utils/winrate_stats.py has the
math). Each policy's row shows its win rate, the per-policy LC (AlpacaEval 2's
length_controlled_minimal, from its report) and this one. Prints a markdown table; writes
the JSON (the difficulties included).
"""
import argparse
import json
import os

from utils import winrate_stats as stats
from utils.fileio import InputError, atomic_write_json, cli_main, read_text

ESTIMATOR = ("AlpacaEval length_controlled_v1 features (no regularisation to its gamed baselines: "
             "length_controlled_noreg), prompt difficulties fitted jointly on these {n} policies")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", metavar="WINRATE.json", help="eval_winrate.py reports, 2 or more")
    parser.add_argument("--output_path", required=True, help="JSON file of the joint fit")
    args = parser.parse_args(argv)
    if len(args.reports) < 2:
        raise InputError("a joint fit needs 2 or more eval_winrate.py reports, got 1; one policy's LC is in its "
                         "report (lc_win_rate)")
    return args


def labels(paths):
    """A short name for each report: its directory below the reports' common one (eval/dpo-pref/ckpt1/
    winrate.json, ...: dpo-pref/ckpt1), or its path below it where directories repeat."""
    paths = [os.path.abspath(p) for p in paths]
    common = os.path.commonpath([os.path.dirname(p) for p in paths])
    names = [os.path.relpath(os.path.dirname(p), common) for p in paths]
    if len(set(names)) < len(names) or "." in names:
        names = [os.path.splitext(os.path.relpath(p, common))[0] for p in paths]
    return names


def read_report(path):
    try:
        report = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise InputError(f"{path} line {err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(report, dict) or "judged_pairs" not in report:
        raise InputError(f'{path}: no field "judged_pairs"; it is not an eval_winrate.py report, or one written '
                         "before reports listed their pairs (rerun eval_winrate.py: its judgments are cached)")
    return report


def check_comparable(paths, reports):
    """One line unless every report judged the same prompts against the same baseline by the
    same judge, in enough pairs for the cross-validated fit."""
    first, prompts = reports[0], {p["prompt"] for p in reports[0]["judged_pairs"]}
    for path, report in zip(paths, reports):
        too_few = stats.too_few_pairs(len(report["judged_pairs"]))
        if too_few:
            raise InputError(f'{path} field "judged_pairs": {too_few}')
        for field in ("baseline", "judge"):
            if report.get(field) != first.get(field):
                raise InputError(f'{path} field "{field}": {report.get(field)!r}, but {paths[0]} has '
                                 f"{first.get(field)!r}; a joint fit compares policies judged alike")
        theirs = {p["prompt"] for p in report["judged_pairs"]}
        if theirs != prompts:
            extra = sorted(theirs ^ prompts)[0]
            raise InputError(f'{path} field "judged_pairs": prompt {extra} is judged in only one of it and '
                             f"{paths[0]}; a joint fit needs the same prompts for every policy")


@cli_main
def main(argv=None):
    args = parse_args(argv)
    reports = [read_report(path) for path in args.reports]
    check_comparable(args.reports, reports)
    policies = [([p["prompt"] for p in r["judged_pairs"]], [p["score"] for p in r["judged_pairs"]],
                 [p["length_policy"] for p in r["judged_pairs"]], [p["length_baseline"] for p in r["judged_pairs"]])
                for r in reports]
    fits, difficulty = stats.lc_with_difficulty(policies)
    rows = []
    for path, name, report, fit in zip(args.reports, labels(args.reports), reports, fits):
        rows.append({"report": path, "name": name,
                     "win_rate": report["win_rate"], "lc_win_rate": report.get("lc_win_rate"),
                     "lc_difficulty_win_rate": fit["lc_win_rate"], "length_weight": fit["length_weight"],
                     "difficulty_weight": fit["difficulty_weight"], "C": fit["C"]})
    result = {"estimator": ESTIMATOR.format(n=len(rows)), "baseline": reports[0]["baseline"],
              "judge": reports[0]["judge"], "policies": rows, "prompt_difficulty": difficulty}
    atomic_write_json(args.output_path, result)
    print("| policy | win rate | LC (AlpacaEval 2 minimal) | LC with prompt difficulty (joint) |\n|---|---|---|---|")
    for row in rows:
        lc = "—" if row["lc_win_rate"] is None else f"{row['lc_win_rate']:.3f}"
        print(f"| {row['name']} | {row['win_rate']:.3f} | {lc} | {row['lc_difficulty_win_rate']:.3f} |")
    print(f"{result['estimator']}; wrote {os.path.abspath(args.output_path)}")


if __name__ == "__main__":
    main()
