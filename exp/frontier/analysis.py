"""Reward–KL frontiers and their comparison at matched KL, with a bootstrap over seeds and prompts.

    python exp/frontier/analysis.py --workdir results/frontier            # results.md/json, frontier.png
    python exp/frontier/analysis.py --workdir results/frontier --write docs/frontier.md   # the docs page's section
    python exp/frontier/analysis.py --workdir results/frontier --check docs/frontier.md   # exit 1 if it is stale

The definitions, fixed before the sweep was run (docs/frontier.md):

- A *point* is one evaluated checkpoint: its oracle reward and KL(pi ‖ pi_sft), each the mean
  over the test prompts of the per-prompt mean over that prompt's sampled completions (a
  prompt repeated in the test set is one prompt). The SFT model is the point (0, its reward),
  evaluated with each seed's sampling seed.
- The *frontier* of a (method, seed) is the upper envelope of its points over the β grid and the
  checkpoints, SFT included: the points no other point beats with a KL as low, joined by straight
  lines, and flat after the last one (the best reward seen by then). A method's frontier is the
  mean of its seeds' frontiers.
- *Matched KL*: each method's frontier read at the KL grid values inside [0, K_common], where
  K_common is the smallest, over methods and seeds, of the largest KL a frontier reached; and the
  mean of the frontier over [0, K_common] (its area divided by K_common). The difference from
  the baseline of the same label type (`dpo-rw` for rw losses, `dpo-pref` for pref losses) has a
  95% percentile interval from a paired bootstrap: each replicate draws the seeds with
  replacement (one draw for every method, since seed s gives every method the same data order
  and sampling seeds) and the prompts with replacement (one draw for every point, since every
  policy is evaluated on the same prompts), and recomputes every point, frontier and difference.
  K_common and the grid stay fixed across replicates.
- *Online rounds* are compared with the offline run of the same loss, β and seed at the same
  number of optimizer steps, with the same bootstrap.
"""
import argparse
import json
import math
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

FRONTIER = Path(__file__).resolve().parent
REPO_ROOT = FRONTIER.parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(REPO_ROOT / "exp" / "quickstart"))

from utils.fileio import InputError, atomic_write_json, atomic_write_text, cli_main, read_json_records  # noqa: E402

BASELINES = {"rw": "dpo-rw", "pref": "dpo-pref"}
MARKER = ("<!-- frontier results -->", "<!-- /frontier results -->")
PAGE = "docs/frontier.md"  # the page whose section --write and --check keep; its figure goes to docs/imgs/


# -- reading the evaluations ----------------------------------------------------------------
def per_prompt(directory):
    """(prompts, reward, kl, rewards): per distinct prompt, the mean oracle reward and the mean
    log-ratio log pi - log pi_sft over its completions, from an evaluate.py output directory; and
    every completion's oracle reward."""
    directory = Path(directory)
    rewards = read_json_records(directory / "oracle" / "test.json")
    logratios = None
    if (directory / "logps_policy.json").exists():
        policy, sft = (read_json_records(directory / f"logps_{role}.json") for role in ("policy", "sft"))
        logratios = [[p - s for p, s in zip(a["logps"], b["logps"])] for a, b in zip(policy, sft)]
    groups = OrderedDict()
    for index, record in enumerate(rewards):
        entry = groups.setdefault(record["prompt"], ([], []))
        entry[0].extend(record["rewards"])
        entry[1].extend(logratios[index] if logratios is not None else [0.0] * len(record["rewards"]))
    prompts = list(groups)
    reward = np.array([np.mean(groups[p][0]) for p in prompts])
    kl = np.array([np.mean(groups[p][1]) for p in prompts])
    return prompts, reward, kl, [r for record in rewards for r in record["rewards"]]


def summary(values):
    """(mean, standard error) over completions, as the per-point columns of results.json."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def load_points(workdir, cells):
    """Every evaluated point. `cells`: [{method, beta_pi, seed, kind, checkpoints: {name: (dir,
    steps)}}], kind "offline", "online" or "sft". Returns (points, prompts, matrices) where
    matrices[i] = (per-prompt reward, per-prompt KL) of points[i]."""
    points, matrices, prompts = [], [], None
    for cell in cells:
        for checkpoint, (directory, steps) in cell["checkpoints"].items():
            names, reward, kl, rewards = per_prompt(directory)
            if prompts is None:
                prompts = names
            elif names != prompts:
                raise InputError(f"{directory}: evaluated on other test prompts than the other points; "
                                 "rerun its evaluation")
            kl_file = Path(directory) / "kl.json"
            with open(kl_file) as f:
                kl_record = json.load(f)
            points.append({"method": cell["method"], "kind": cell["kind"], "beta_pi": cell["beta_pi"],
                           "seed": cell["seed"], "checkpoint": checkpoint, "steps": steps,
                           **dict(zip(("reward", "reward_se"), summary(rewards))),
                           "kl": float(kl_record["kl"]), "kl_se": float(kl_record.get("se", 0.0)),
                           "n": len(rewards), "num_prompts": len(names)})
            matrices.append((reward, kl))
    return points, prompts, matrices


# -- the frontier -----------------------------------------------------------------------------
def frontier(kl, reward):
    """The upper envelope of points (kl[i], reward[i]): (xs, ys) of the points no other point
    beats with as low a KL, in increasing KL (reward rises along it)."""
    order = np.lexsort((-reward, kl))  # by KL, the higher reward first among equal KLs
    xs, ys, best = [], [], -np.inf
    for i in order:
        if reward[i] > best:
            if xs and kl[i] == xs[-1]:
                continue
            xs.append(kl[i])
            ys.append(reward[i])
            best = reward[i]
    return np.array(xs), np.array(ys)


def read_frontier(xs, ys, at):
    """The frontier (xs, ys) at KL values `at`: linear between its points, flat after the last;
    below its first point (a sampled KL can fall below 0), its first reward."""
    return np.interp(at, xs, ys)


def mean_over(xs, ys, upto):
    """The frontier's mean reward over KL in [0, upto]: its area divided by `upto`."""
    grid = np.linspace(0.0, upto, 401)
    values = read_frontier(xs, ys, grid)
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(grid)) / upto)


class Sweep:
    """The points of a sweep and everything the report computes from them."""

    def __init__(self, points, matrices, kl_grid, labels, n_boot=2000, seed=0):
        self.points, self.kl_grid, self.labels = points, list(kl_grid), labels
        self.rewards = np.stack([m[0] for m in matrices])   # points x prompts
        self.kls = np.stack([m[1] for m in matrices])
        self.num_prompts = self.rewards.shape[1]
        self.seeds = sorted({p["seed"] for p in points})
        self.methods = list(dict.fromkeys(p["method"] for p in points if p["kind"] == "offline"))
        self.n_boot, self.rng = n_boot, np.random.default_rng(seed)

    def index(self, **match):
        return [i for i, p in enumerate(self.points) if all(p[k] == v for k, v in match.items())]

    def frontier_points(self, method, seed):
        """Indices of the points of (method, seed)'s frontier: its offline checkpoints and SFT."""
        return self.index(method=method, seed=seed, kind="offline") + self.index(kind="sft", seed=seed)

    def curves(self, reward, kl, seeds, at):
        """{method: mean over `seeds` of the (method, seed) frontier at KLs `at`, and its mean over
        [0, K_common]}, from point values `reward`, `kl`."""
        out = {}
        for method in self.methods:
            values, areas = [], []
            for seed in seeds:
                idx = self.frontier_points(method, seed)
                xs, ys = frontier(kl[idx], reward[idx])
                values.append(read_frontier(xs, ys, at))
                areas.append(mean_over(xs, ys, self.k_common))
            out[method] = (np.mean(values, axis=0), float(np.mean(areas)))
        return out

    def replicate_values(self):
        """Yield (reward, kl, seeds) of the point values: first as observed, then n_boot bootstrap
        replicates (prompts and seeds drawn with replacement, one draw for everything)."""
        yield self.rewards.mean(axis=1), self.kls.mean(axis=1), self.seeds
        for _ in range(self.n_boot):
            weights = np.bincount(self.rng.integers(0, self.num_prompts, self.num_prompts),
                                  minlength=self.num_prompts) / self.num_prompts
            seeds = list(self.rng.choice(self.seeds, len(self.seeds), replace=True))
            yield self.rewards @ weights, self.kls @ weights, seeds

    def compare(self):
        """The matched-KL tables (see the module docstring), and the online rounds' comparison."""
        reward, kl = self.rewards.mean(axis=1), self.kls.mean(axis=1)
        self.k_max = {}
        for method in self.methods:
            for seed in self.seeds:
                idx = self.frontier_points(method, seed)
                self.k_max[(method, seed)] = float(np.max(kl[idx]))
        self.k_common = min(self.k_max.values())
        if self.k_common <= 0:
            raise InputError(f"some method's frontier never leaves KL 0 ({self.k_max}): no common KL range to compare "
                             "on; train longer or with a larger learning rate")
        at = np.array([k for k in self.kl_grid if k < self.k_common] + [self.k_common])
        online = self.online_pairs()
        draws = []
        for r, k, seeds in self.replicate_values():
            curves = self.curves(r, k, seeds, at)
            online_diffs = [weighted_mean([r[a] - r[b] for a, b in pairs],
                                          [seeds.count(self.points[a]["seed"]) for a, _ in pairs])
                            for pairs in online.values()]
            draws.append((curves, online_diffs))
        observed, boot = draws[0], draws[1:]
        rows = []
        for method in self.methods:
            baseline = BASELINES[self.labels[method]]
            row = {"method": method, "baseline": baseline, "kl": at.tolist(),
                   "reward": observed[0][method][0].tolist(), "mean_reward": observed[0][method][1]}
            if baseline in observed[0] and baseline != method:
                diff = observed[0][method][0] - observed[0][baseline][0]
                boot_diff = np.array([c[method][0] - c[baseline][0] for c, _ in boot])
                area = observed[0][method][1] - observed[0][baseline][1]
                boot_area = np.array([c[method][1] - c[baseline][1] for c, _ in boot])
                row.update(diff=diff.tolist(), diff_ci=np.percentile(boot_diff, [2.5, 97.5], axis=0).T.tolist(),
                           mean_reward_diff=area, mean_reward_diff_ci=np.percentile(boot_area, [2.5, 97.5]).tolist())
            rows.append(row)
        online_rows = []
        for j, (key, pairs) in enumerate(online.items()):
            values = np.array([d[j] for _, d in boot])
            values = values[np.isfinite(values)]
            online_rows.append({"method": key[0], "offline": key[1], "steps": key[2], "beta_pi": key[3],
                                "reward": float(np.mean([reward[a] for a, _ in pairs])),
                                "other_reward": float(np.mean([reward[b] for _, b in pairs])),
                                "kl": float(np.mean([kl[a] for a, _ in pairs])),
                                "other_kl": float(np.mean([kl[b] for _, b in pairs])),
                                "diff": observed[1][j], "diff_ci": np.percentile(values, [2.5, 97.5]).tolist(),
                                "pairs": len(pairs)})
        return {"k_common": self.k_common, "k_max": {f"{m} seed {s}": v for (m, s), v in self.k_max.items()},
                "matched": rows, "online": online_rows}

    def online_pairs(self):
        """{(online method, compared with, steps, beta): [(online point, other point), ...]}: each
        online round beside the offline checkpoint of the same loss, beta, seed and step count, and
        a restarting variant's round beside the continuing one's (online-exo-rw-restart against
        online-exo-rw) of the same seed and step."""
        pairs = OrderedDict()
        for i, p in enumerate(self.points):
            if p["kind"] != "online":
                continue
            offline = p["method"].removeprefix("online-").removesuffix("-restart")
            match = self.index(kind="offline", method=offline, beta_pi=p["beta_pi"], seed=p["seed"], steps=p["steps"])
            if match:
                pairs.setdefault((p["method"], offline, p["steps"], p["beta_pi"]), []).append((i, match[0]))
        for i, p in enumerate(self.points):
            if p["kind"] == "online" and p["method"].endswith("-restart"):
                match = self.index(kind="online", method=p["method"].removesuffix("-restart"), seed=p["seed"],
                                   steps=p["steps"], beta_pi=p["beta_pi"])
                if match:  # continuing minus restarting
                    pairs.setdefault((self.points[match[0]]["method"], p["method"], p["steps"], p["beta_pi"]),
                                     []).append((match[0], i))
        return pairs


def weighted_mean(values, weights):
    """The mean of `values` weighted by how often a bootstrap replicate drew each one's seed (NaN
    when it drew none of them)."""
    total = sum(weights)
    return float(np.dot(values, weights) / total) if total else float("nan")


# -- the report -------------------------------------------------------------------------------
def interval_words(low, high):
    if low > 0:
        return "above"
    if high < 0:
        return "below"
    return "inside"


def tables(result, settings):
    """The report's Markdown: the matched-KL table, the mean-reward table and the online table."""
    lines = []
    matched = result["matched"]
    at = matched[0]["kl"]
    head = "| method | " + " | ".join(f"KL {k:.2f}" for k in at) + " |"
    lines += ["Oracle reward on each method's frontier (mean of its seeds' frontiers) at matched KL; "
              "under it, the difference from the baseline of the same labels with its 95% bootstrap interval "
              f"(seeds and prompts). K_common = {result['k_common']:.2f} (the last column).", "",
              head, "|---" * (len(at) + 1) + "|"]
    for row in matched:
        lines.append(f"| {row['method']} | " + " | ".join(f"{v:.3f}" for v in row["reward"]) + " |")
        if "diff" in row:
            cells = [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, (lo, hi) in zip(row["diff"], row["diff_ci"])]
            lines.append(f"| − {row['baseline']} | " + " | ".join(cells) + " |")
    lines += ["", f"Mean oracle reward over each frontier on KL ∈ [0, {result['k_common']:.2f}] (area / range):", "",
              "| method | mean reward | − baseline [95% interval] | the interval |", "|---|---|---|---|"]
    for row in matched:
        if "mean_reward_diff" in row:
            lo, hi = row["mean_reward_diff_ci"]
            lines.append(f"| {row['method']} | {row['mean_reward']:.3f} | {row['mean_reward_diff']:+.3f} "
                         f"[{lo:+.3f}, {hi:+.3f}] vs {row['baseline']} | {interval_words(lo, hi)} 0 |")
        else:
            lines.append(f"| {row['method']} | {row['mean_reward']:.3f} | (baseline) | |")
    if result["online"]:
        lines += ["", "Online rounds against the offline run of the same loss, β and seed at the same optimizer step, "
                  "and rounds that continue AdamW and the data order against rounds that restart them (oracle "
                  "reward and KL, means over seeds; the difference with its 95% bootstrap interval):", "",
                  "| rounds | against | β | steps | reward | KL | reward − against's [95%] | the interval |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in result["online"]:
            lo, hi = row["diff_ci"]
            lines.append(f"| {row['method']} | {row['offline']} | {row['beta_pi']} | {row['steps']} | "
                         f"{row['reward']:.3f} vs {row['other_reward']:.3f} | {row['kl']:.2f} vs {row['other_kl']:.2f} | "
                         f"{row['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {interval_words(lo, hi)} 0 |")
    return "\n".join(lines)


def words(result):
    """One sentence per comparison: where each difference lies against its interval."""
    out = []
    for row in result["matched"]:
        if "diff" not in row:
            continue
        where = [interval_words(lo, hi) for lo, hi in row["diff_ci"]]
        at = [f"{k:.2f}" for k in row["kl"]]
        groups = {w: [k for k, x in zip(at, where) if x == w] for w in ("above", "below", "inside")}
        parts = [f"above 0 at KL {', '.join(groups['above'])}" if groups["above"] else "",
                 f"below 0 at KL {', '.join(groups['below'])}" if groups["below"] else "",
                 f"0 inside its interval at KL {', '.join(groups['inside'])}" if groups["inside"] else ""]
        lo, hi = row["mean_reward_diff_ci"]
        out.append(f"- {row['method']} − {row['baseline']}: " + "; ".join(p for p in parts if p)
                   + f". Over the whole range: {row['mean_reward_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}], "
                   + ("so no difference is shown." if lo <= 0 <= hi else
                      f"so {row['method']} is {'above' if lo > 0 else 'below'} {row['baseline']}."))
    return "\n".join(out)


def plot(sweep, result, path):
    """Every point, and each method's frontier (the mean of its seeds') with a band from the
    lowest to the highest seed's frontier; online rounds as their own markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from report import save_figure

    import warnings
    warnings.filterwarnings("ignore", "(Mean of empty slice|All-NaN slice)", RuntimeWarning)  # past every seed's end
    reward, kl = sweep.rewards.mean(axis=1), sweep.kls.mean(axis=1)
    x_max = max(p["kl"] for p in sweep.points)
    grid = np.linspace(0.0, x_max, 200)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, method in enumerate(sweep.methods):
        color = colors[c % len(colors)]
        idx = sweep.index(method=method, kind="offline")
        ax.scatter(kl[idx], reward[idx], s=10, alpha=0.35, color=color)
        curves = []
        for seed in sweep.seeds:
            xs, ys = frontier(*(a[sweep.frontier_points(method, seed)] for a in (kl, reward)))
            upto = grid <= sweep.k_max[(method, seed)]
            curves.append(np.where(upto, read_frontier(xs, ys, grid), np.nan))
        curves = np.array(curves)
        # the mean where every seed's frontier reaches, the band as far as any does
        ax.plot(grid, np.where(np.isnan(curves).any(axis=0), np.nan, np.nanmean(curves, axis=0)), color=color,
                label=method, linestyle="-" if method.startswith("exo") else "--")
        ax.fill_between(grid, np.nanmin(curves, axis=0), np.nanmax(curves, axis=0), color=color, alpha=0.15)
    online = sweep.index(kind="online")
    for method in dict.fromkeys(sweep.points[i]["method"] for i in online):
        idx = sweep.index(kind="online", method=method)
        ax.scatter(kl[idx], reward[idx], marker="+" if method.endswith("-restart") else "x", s=40,
                   color="grey" if method.endswith("-restart") else "black", label=method)
    sft = sweep.index(kind="sft")
    ax.scatter(kl[sft], reward[sft], marker="*", s=120, color="black", label="SFT", zorder=3)
    ax.axvline(result["k_common"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("KL(π ‖ π_sft), nats per completion")
    ax.set_ylabel("oracle reward")
    ax.set_title("Reward–KL frontiers (band: lowest to highest seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def analyse(workdir, n_boot=None):
    """Read WORKDIR/cells.json (written by frontier.py), write results.json, results.md and
    frontier.png; return (markdown, result)."""
    workdir = Path(workdir)
    try:
        with open(workdir / "cells.json") as f:
            manifest = json.load(f)
    except OSError as err:
        raise InputError(f"{workdir}/cells.json: {err.strerror}; run exp/frontier/run.sh first") from None
    cells = manifest["cells"]
    settings = manifest["settings"]
    points, _, matrices = load_points(workdir, cells)
    sweep = Sweep(points, matrices, settings["kl_grid"], manifest["labels"],
                  n_boot=n_boot or settings["bootstrap"], seed=settings["bootstrap_seed"])
    result = sweep.compare()
    markdown = (f"{tables(result, settings)}\n\nIn words (95% intervals):\n\n{words(result)}\n")
    atomic_write_json(workdir / "results.json", {"points": points, **result, "settings": settings,
                                                 "command": manifest["command"]})
    plot(sweep, result, workdir / "frontier.png")
    atomic_write_text(workdir / "results.md", (
        f"# Reward–KL frontiers\n\nCommand: `{manifest['command']}`\n\n"
        f"Grid: methods {', '.join(settings['methods'])}; beta_pi = beta_r in {settings['betas']}; seeds "
        f"{settings['seeds']}; {settings['align_steps']} steps, {settings['num_checkpoints']} checkpoints each; "
        f"{points[0]['num_prompts']} test prompts, {points[0]['n']} completions per point. Figure: frontier.png; "
        f"every point: results.json.\n\n{markdown}"))
    return markdown, result


def readme_section(markdown, command, elapsed):
    return (f"{MARKER[0]}\nWhat `{command}` wrote (it took {elapsed / 60:.0f} min on 2 idle CPU cores; "
            f"`python exp/frontier/analysis.py --workdir results/frontier --write {PAGE}` puts a sweep's "
            f"results here and `--check` fails while they are not this one's):\n\n"
            f"![reward-KL frontiers](imgs/frontier.png)\n\n{markdown}{MARKER[1]}")


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="results/frontier", help="the sweep's directory (frontier.py --workdir)")
    parser.add_argument("--write", metavar="PAGE", nargs="?", const=PAGE,
                        help=f"also put the results between the markers of PAGE (default {PAGE}) and copy "
                        "frontier.png to imgs/frontier.png beside it")
    parser.add_argument("--check", metavar="PAGE", nargs="?", const=PAGE,
                        help=f"exit 1 if PAGE's section (default {PAGE}) is not this sweep's")
    args = parser.parse_args(argv)
    markdown, _ = analyse(args.workdir)
    with open(Path(args.workdir) / "timing.json") as f:
        timing = json.load(f)
    section = readme_section(markdown, timing["command"].strip(), timing["seconds"])
    for target in filter(None, (args.write, args.check)):
        text = Path(target).read_text(encoding="utf-8")
        start, end = text.find(MARKER[0]), text.find(MARKER[1])
        if start < 0 or end < 0:
            raise InputError(f"{target}: no {MARKER[0]} ... {MARKER[1]} section")
        new = text[:start] + section + text[end + len(MARKER[1]):]
        if args.check:
            if new != text:
                print(f"{target}: the frontier section is not this sweep's; run with --write", file=sys.stderr)
                sys.exit(1)
            print(f"{target}: the frontier section is this sweep's")
        else:
            atomic_write_text(target, new)
            shutil.copyfile(Path(args.workdir) / "frontier.png", Path(target).resolve().parent / "imgs" / "frontier.png")
            print(f"wrote the frontier section of {target} and imgs/frontier.png")
    if not (args.write or args.check):
        print((Path(args.workdir) / "results.md").read_text())


if __name__ == "__main__":
    main()
