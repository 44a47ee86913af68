"""The quickstart's results: a reward/KL/win-rate table and the reward-KL frontier per method.

Reads WORKDIR/eval/METHOD/CHECKPOINT/{reward,kl}.json and, where evaluate.py judged one,
winrate.json (the win rate against the SFT model's samples), and writes, each whole or not at
all, WORKDIR/results.json, WORKDIR/results.md and WORKDIR/reward_vs_kl.png (the frontier, and
beside it the win rate against KL where there are win rates).
"""
import json
import math
import os
import tempfile

from utils.fileio import InputError, atomic_write_json


def collect(workdir, runs):
    """One row per (method, checkpoint) of `runs` ({method: [checkpoint, ...]}), in that order."""
    rows = []
    for method, checkpoints in runs.items():
        for checkpoint in checkpoints:
            directory = os.path.join(workdir, "eval", method, checkpoint)
            try:
                with open(os.path.join(directory, "reward.json")) as f:
                    reward = json.load(f)
                with open(os.path.join(directory, "kl.json")) as f:
                    kl = json.load(f)
            except OSError as err:
                raise InputError(f"{directory}: no evaluation ({err.strerror}); rerun its eval stage") from None
            row = {"method": method, "checkpoint": checkpoint, "reward": reward["mean"],
                   "reward_se": reward["std"] / math.sqrt(reward["n"]), "kl": kl["kl"], "n": reward["n"]}
            winrate_file = os.path.join(directory, "winrate.json")
            if os.path.exists(winrate_file):  # none for the SFT model itself, nor online rounds
                with open(winrate_file) as f:
                    winrate = json.load(f)
                row.update(win_rate=winrate["win_rate"], win_rate_ci=[winrate["ci_low"], winrate["ci_high"]])
            rows.append(row)
    return rows


def markdown_table(rows):
    lines = ["| method | checkpoint | oracle reward | KL(pi ‖ pi_sft) | win rate vs SFT (oracle) |", "|---|---|---|---|---|"]
    for row in rows:
        win = (f"{row['win_rate']:.3f} [{row['win_rate_ci'][0]:.2f}, {row['win_rate_ci'][1]:.2f}]"
               if "win_rate" in row else "—")
        lines.append(f"| {row['method']} | {row['checkpoint']} | {row['reward']:.3f} ± {row['reward_se']:.3f} "
                     f"| {row['kl']:.2f} | {win} |")
    return "\n".join(lines)


def plot(rows, path):
    """Oracle reward against KL(pi || pi_sft): each method's checkpoints in training order, from
    the SFT model at KL 0, as the paper's IMDB figure draws the frontier."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the SFT model against itself: a win rate of 1/2 at KL 0, where each win-rate line starts
    sft = [{**r, "win_rate": 0.5} for r in rows if r["method"] == "sft"]
    panels = [("reward", "oracle reward (VADER compound)", "Reward–KL frontier (quickstart)")]
    if any("win_rate" in r for r in rows):
        panels.append(("win_rate", "win rate vs SFT (oracle judge, both orders)", "Win rate vs KL"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (key, label, title) in zip(axes[0], panels):
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "sft"):
            points = sft + [r for r in rows if r["method"] == method and key in r]
            if len(points) > len(sft):
                ax.plot([p["kl"] for p in points], [p[key] for p in points], marker="o", label=method,
                        linestyle="-" if "exo" in method else "--")
        for row in sft:
            ax.plot(row["kl"], row[key], marker="*", markersize=14, color="black", linestyle="none", label="SFT")
        ax.set_xlabel("KL(π ‖ π_sft)")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path):
    """Write a matplotlib figure to `path` whole or not at all, and close it."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def write_report(workdir, runs, settings):
    rows = collect(workdir, runs)
    table = markdown_table(rows)
    atomic_write_json(os.path.join(workdir, "results.json"), {"rows": rows, "settings": settings})
    plot(rows, os.path.join(workdir, "reward_vs_kl.png"))
    text = (f"# Quickstart results\n\nOracle reward (VADER compound of prompt + completion, mean ± standard error) "
            f"and KL(pi ‖ pi_sft) (mean log-ratio, nats per completion) of each policy's samples on the "
            f"{rows[0]['n']} test completions; win rate against the SFT model's samples of the same prompts, "
            f"judged by the oracle in both orders (a tie when they disagree), with its 95% bootstrap interval "
            f"over prompts. Frontier plot: reward_vs_kl.png.\n\n{table}\n")
    fd, tmp = tempfile.mkstemp(dir=workdir, suffix=".md")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, os.path.join(workdir, "results.md"))
    return rows
