"""The quickstart tables of docs/quickstart.md, from a finished quickstart, and the check that keeps them in step.

    python exp/quickstart/readme_tables.py --workdir results/quickstart            # print them
    python exp/quickstart/readme_tables.py --workdir results/quickstart --write docs/quickstart.md
    python exp/quickstart/readme_tables.py --workdir results/quickstart --check docs/quickstart.md

The page holds each table between `<!-- quickstart table: NAME -->` and `<!-- /quickstart
table -->` (offline: one row per method, its checkpoints side by side; online: the online rounds
against the offline exo-rw checkpoints at equal optimizer steps). --write replaces them with what
this workdir's run gives; --check exits 1, naming the first differing line, unless the page's
tables are exactly that (at the printed precision), so a change of the code that moves the
numbers cannot land with the old ones in the docs: rerun the quickstart and --write.
"""
import argparse
import json
import re
import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parent
sys.path.insert(0, str(QUICKSTART.parents[1] / "src"))

from utils.fileio import InputError, atomic_write_text, cli_main, read_text  # noqa: E402

PAGE = "docs/quickstart.md"  # the page --write and --check keep when given no path
BLOCK = re.compile(r"(<!-- quickstart table: (\w+) -->\n)(.*?)(<!-- /quickstart table -->)", re.S)


def _load(path):
    try:
        return json.loads(read_text(path))
    except ValueError as err:
        raise InputError(f"{path}: not JSON ({err}); rerun the quickstart") from None


def _win(row):
    return f"{row['win_rate']:.3f}" if "win_rate" in row else "—"


def offline_table(rows):
    """Each method on one row, its checkpoints' oracle rewards, KLs and win rates against the
    SFT model's samples (oracle judge, both orders) side by side."""
    lines = ["| method | checkpoint | oracle reward | KL(pi ‖ pi_sft) | win rate vs SFT (oracle) |",
             "|---|---|---|---|---|"]
    methods = {}
    for row in rows:
        if not row["method"].startswith("online"):
            methods.setdefault(row["method"], []).append(row)
    for method, points in methods.items():
        if len(points) == 1:
            row = points[0]
            lines.append(f"| {method} | {row['checkpoint']} | {row['reward']:.3f} ± {row['reward_se']:.3f} | "
                         f"{row['kl']:.2f} | {_win(row)} |")
            continue
        names = " / ".join([points[0]["checkpoint"]] + [p["checkpoint"].removeprefix("ckpt") for p in points[1:]])
        rewards = " / ".join(f"{p['reward']:.3f}" for p in points)
        kls = " / ".join(f"{p['kl']:.2f}" for p in points)
        wins = " / ".join(_win(p) for p in points)
        lines.append(f"| {method} | {names} | {rewards} | {kls} | {wins} |")
    return "\n".join(lines)


def online_table(workdir, rows, settings):
    """Round r of online exo-rw beside offline exo-rw's checkpoint r, at the same optimizer steps."""
    offline = [r for r in rows if r["method"] == "exo-rw"]
    online = [r for r in rows if r["method"] == "online-exo-rw"]
    if not online or not offline:
        return None
    lines = ["| optimizer steps | offline exo-rw: oracle reward | KL | online exo-rw: oracle reward | KL | "
             "reward-model reward |", "|---|---|---|---|---|---|"]
    for r, (ckpt, rnd) in enumerate(zip(offline, online), start=1):
        rm = _load(Path(workdir) / "eval" / "online-exo-rw" / rnd["checkpoint"] / "rm_reward.json")["mean"]
        lines.append(f"| {settings['online_steps'] * r} | {ckpt['reward']:.3f} ± {ckpt['reward_se']:.3f} "
                     f"({ckpt['checkpoint']}) | {ckpt['kl']:.2f} | {rnd['reward']:.3f} ± {rnd['reward_se']:.3f} "
                     f"(round {r}) | {rnd['kl']:.2f} | {rm:.2f} |")
    return "\n".join(lines)


def tables(workdir):
    """{name: markdown table} of a finished quickstart's results.json."""
    results = _load(Path(workdir) / "results.json")
    found = {"offline": offline_table(results["rows"])}
    online = online_table(workdir, results["rows"], results["settings"])
    if online:
        found["online"] = online
    return found


def check(readme_text, expected):
    """None when every table block of the page is the expected table, else the first difference."""
    blocks = {m.group(2): m.group(3).strip() for m in BLOCK.finditer(readme_text)}
    for name, table in expected.items():
        if name not in blocks:
            return f"no '<!-- quickstart table: {name} -->' block"
        for have, want in zip(blocks[name].splitlines() + [""] * 99, table.splitlines() + [""] * 99):
            if have != want:
                return f"table {name}: the page has\n  {have}\nwhere this run prints\n  {want}"
    return None


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="results/quickstart", help="a finished quickstart's --workdir")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", metavar="PAGE", nargs="?", const=PAGE,
                        help=f"replace the table blocks of PAGE (default {PAGE}) with this run's tables")
    action.add_argument("--check", metavar="PAGE", nargs="?", const=PAGE,
                        help=f"exit 1 unless the tables of PAGE (default {PAGE}) are this run's")
    args = parser.parse_args(argv)
    expected = tables(args.workdir)
    if args.check:
        problem = check(read_text(args.check), expected)
        if problem:
            print(f"error: {args.check}: {problem}\nrerun the quickstart and "
                  f"`python exp/quickstart/readme_tables.py --workdir {args.workdir} --write {args.check}`",
                  file=sys.stderr)
            sys.exit(1)
        print(f"{args.check}: the quickstart tables are what {args.workdir} printed")
    elif args.write:
        text = read_text(args.write)
        missing = [name for name in expected if name not in {m.group(2) for m in BLOCK.finditer(text)}]
        if missing:
            raise InputError(f"{args.write}: no '<!-- quickstart table: {missing[0]} -->' block to write into")
        text = BLOCK.sub(lambda m: m.group(1) + expected.get(m.group(2), m.group(3).strip()) + "\n" + m.group(4), text)
        atomic_write_text(args.write, text)
        print(f"{args.write}: wrote the tables {', '.join(expected)} of {args.workdir}")
    else:
        print("\n\n".join(expected.values()))


if __name__ == "__main__":
    main()
