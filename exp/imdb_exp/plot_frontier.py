"""The reward-KL frontier of several alignment runs: oracle reward against KL(policy || SFT).

    python exp/imdb_exp/plot_frontier.py RESULTS_DIR [RESULTS_DIR ...] --output imgs/imdb_frontier.png

Each RESULTS_DIR is one run's decoded checkpoints (inference_align.sh output, e.g.
data/imdb_prefix10_infer_res/gpt2-large_imdb/align_exo-rw_nc2) whose ckptN/ each hold
`test_oracle_eval.json` (inference_class.sh ... eval) and `kl.json` (src/eval_kl.py). A run is
one line, its checkpoints in order of N, labelled by the run's directory name
(align_exo-rw_nc2: EXO on rw data, K = 2). The points are also written next to the figure
as JSON (OUTPUT with .json), for tables.
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from utils.fileio import InputError, atomic_write_json, cli_main, where  # noqa: E402

CKPT = re.compile(r"ckpt(\d+)")


def read_number(path, key):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)[key]
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror}); run the evaluation of this checkpoint first") from None
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{where(path, field=key)}: missing or not JSON") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where(path, field=key)}: expected a number, got {type(value).__name__}")
    return float(value)


def run_points(results_dir):
    """[{ckpt, kl, reward}] of one run's checkpoints, in order of N."""
    if not os.path.isdir(results_dir):
        raise InputError(f"{results_dir}: no such directory")
    ckpts = sorted((int(m[1]), name) for name in os.listdir(results_dir) if (m := CKPT.fullmatch(name)))
    if not ckpts:
        raise InputError(f"{results_dir}: no ckptN directories; decode the run with inference_align.sh")
    return [{"ckpt": name,
             "kl": read_number(os.path.join(results_dir, name, "kl.json"), "kl"),
             "reward": read_number(os.path.join(results_dir, name, "test_oracle_eval.json"), "mean")}
            for _, name in ckpts]


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dirs", nargs="+", help="one decoded run per directory (holding ckptN/)")
    parser.add_argument("--output", default="imgs/imdb_frontier.png", help="figure file (png, pdf, svg)")
    parser.add_argument("--title", default="IMDB: oracle reward vs KL(policy || SFT)", help="figure title")
    args = parser.parse_args(argv)
    runs = {}
    for results_dir in args.results_dirs:
        label = os.path.basename(os.path.normpath(results_dir))
        if label in runs:
            label = os.path.normpath(results_dir)
        runs[label] = run_points(results_dir)

    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5))
    for label, points in runs.items():
        axes.plot([p["kl"] for p in points], [p["reward"] for p in points], marker="o", label=label)
    axes.set_xlabel("KL(policy || SFT) (nats per completion)")
    axes.set_ylabel("oracle reward (log-odds of positive)")
    axes.set_title(args.title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    root, ext = os.path.splitext(args.output)
    tmp = f"{root}.tmp{ext}"
    figure.savefig(tmp, dpi=150)
    os.replace(tmp, args.output)
    atomic_write_json(root + ".json", runs)
    print(f"wrote {args.output} and {root}.json ({sum(map(len, runs.values()))} points of {len(runs)} runs)")


if __name__ == "__main__":
    main()
