"""Reference-free alignment benchmark: train_exo with the reference-free loss (simpo) against
dpo-rw with the reference's log-probs cached (one reference pass before training, the
default) and with the reference kept in memory and run every step (`--ref_logps online`).

    python exp/bench/bench_reffree.py            # ~5 minutes on 2 idle CPU cores
    python exp/bench/bench_reffree.py --quick    # toy sizes, one repeat: checks that every part runs

The main benchmark's model, data (pref pairs, K = 2), batch and steps (exp/bench/bench.py,
its `ours` flags). First, in one process (worker.py reference_cost), one epoch's steps of the
three, rotating batch by batch, and the cached mode's reference pass: the time ratios, robust
to a machine whose load changes. Then each run as a whole train_exo process of its own, with a
fresh data cache so that dpo-rw pays its reference pass as a first epoch does: stage and epoch
wall time and peak RSS; the runs alternate, their order rotating each repeat, and the table
gives the median and the best (least disturbed) of the repeats. Ratios are simpo's over
dpo-rw's, side by side in one session. See exp/bench/README.md (*Reference-free loss*).
"""
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "src"))
sys.path.insert(0, HERE)

from bench import (OURS_RUNS, SIZES, bench_parser, fmt, ours_argv, run_header, run_worker,  # noqa: E402
                   scratch_dir, write_results)

# name: (loss type, flags beyond the main benchmark's `ours` run)
RUNS = {"simpo": ("simpo", []), "dpo-rw": ("dpo-rw", []), "dpo-rw online": ("dpo-rw", ["--ref_logps", "online"])}
FIGURES = {  # result key: label
    "wall_s": "stage wall s (train_exo.main: tokenisation to saved model, reference pass included)",
    "process_s": "process wall s (start-up and imports too)",
    "reference_pass_s": "reference pass wall s (cached: load the reference, score train + test, write the cache)",
    "epoch_s": "training epoch wall s (baseline evaluation's end to the last step's end)",
    "steady_step_s": "steady step wall s (steps 3..)",
    "peak_rss_mib": "peak RSS MiB",
}
STATS = {"median": statistics.median, "best": min}  # over the repeats
BASES = ("dpo-rw", "dpo-rw online")  # simpo's ratios are over each


def table_head(spread=False):
    per_repeat = " per repeat |" if spread else ""
    return [f"| figure | simpo | dpo-rw (cached) | simpo / dpo-rw |{per_repeat} dpo-rw online | simpo / online |"
            f"{per_repeat}", "|---" * (6 + 2 * spread) + "|"]


def table_row(label, value, digits=2, spread=None):
    """A figure's row: {run: value}, simpo's ratio over each of BASES ('-' over nothing) and,
    given, each ratio's spread."""
    cells = [label, fmt(value["simpo"], digits)]
    for base in BASES:
        cells += [fmt(value[base], digits), fmt(value["simpo"] / value[base]) if value[base] else "-"]
        cells += [spread[base]] if spread else []
    return "| " + " | ".join(cells) + " |"


def figure_table(runs, stat):
    """Each figure's `stat` over the repeats for each run; with the median, also the range of
    the per-repeat ratios (each repeat's two runs side by side)."""
    lines = table_head(spread=stat == "median")
    for key, label in FIGURES.items():
        value = {name: STATS[stat]([r[key] for r in results]) for name, results in runs.items()}
        spread = None
        if stat == "median":
            each = {base: [s[key] / o[key] for s, o in zip(runs["simpo"], runs[base]) if o[key]] for base in BASES}
            spread = {base: f"{fmt(min(e))}-{fmt(max(e))}" if e else "-" for base, e in each.items()}
        lines.append(table_row(label, value, 0 if key == "peak_rss_mib" else 2, spread))
    return lines


def interleaved_table(cost):
    """The in-process measurement's table: one epoch's steps, the reference pass, their sum."""
    steps, ref = cost["steps_s"], cost["reference_pass_s"]
    return [*table_head(),
            table_row(f"the epoch's {cost['batches']} training steps, s", steps),
            table_row("reference pass over the training split, s", {"simpo": 0.0, "dpo-rw": ref, "dpo-rw online": 0.0}),
            table_row("epoch: steps + reference pass, s", {**steps, "dpo-rw": steps["dpo-rw"] + ref})]


def main():
    parser = bench_parser(__doc__, "results_reffree.md")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of the three runs (default 3; --quick 1)")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    repeats = args.repeats or (1 if args.quick else 3)
    work_dir = scratch_dir(args, "exo_bench_reffree_")
    load_before, started = os.getloadavg()[0], time.perf_counter()

    from setup_data import build
    built = build(work_dir, size["model"], size["num_train"], size["num_test"])
    steps = -(-size["num_train"] // size["batch_size"])
    # the time figures a loaded machine leaves meaningful: all three in one process, interleaved
    passes = 1 if args.quick else 3
    cost = run_worker("reference_cost", dict(argv=ours_argv(size, built["data"], built["model"], f"{work_dir}/cost",
                                                            f"{work_dir}/cost_cache", loss_type="dpo-rw")
                                             + OURS_RUNS["ours"], repeats=passes), work_dir, "reference_cost")
    runs, orders = {name: [] for name in RUNS}, []
    for rep in range(repeats):
        orders.append(list(RUNS)[rep % len(RUNS):] + list(RUNS)[:rep % len(RUNS)])  # each run first once in 3
        for name in orders[-1]:
            loss_type, flags = RUNS[name]
            tag = f"{name.replace(' ', '_')}_{rep}"
            argv = ours_argv(size, built["data"], built["model"], f"{work_dir}/{tag}", f"{work_dir}/{tag}_cache",
                             loss_type=loss_type) + OURS_RUNS["ours"] + flags
            runs[name].append(run_worker("ours_align", dict(argv=argv, warmup=size["warmup"], total_steps=steps),
                                         work_dir, tag))

    command = "bench_reffree.py" + (f" --repeats {args.repeats}" if args.repeats else "")
    lines = [*run_header(command, args, load_before, started),
             f"Model: Llama config, {built['params'] / 1e6:.1f}M parameters, vocab {built['vocab']}, fp32 (exp/bench/"
             f"bench.py's; the reference's weights: {built['params'] * 4 / 2**20:.0f} MiB). Data: {size['num_train']} "
             f"pairs (+{size['num_test']} test), K = 2; batch {size['batch_size']} pairs, {steps} optimizer steps, "
             f"`--group_by_length`. {repeats} repeat(s), the runs alternating; a fresh data cache per run.", "",
             f"In one process, interleaved (robust to a change of load during the run): one epoch's batches "
             f"({cost['tokens']} tokens), the three steps rotating batch by batch, and the cached mode's reference "
             f"pass; per batch and for the pass, the best of {passes} pass(es) after an untimed one:", "",
             *interleaved_table(cost), "",
             "Each run a process of its own (`train_exo.main`, as `python src/train_exo.py` runs it):", "",
             f"Median of the {repeats} repeats:", "", *figure_table(runs, "median"), "",
             f"Best of the {repeats} repeats (the least disturbed run of each; on a machine loaded by other work, "
             "the nearest to an idle machine's figure):", "", *figure_table(runs, "best"), "",
             "Runs, in the order they ran within each repeat:", "",
             "| run | repeat | stage s | process s | reference pass s | epoch s | steady step s | peak RSS MiB "
             "| first-step loss |", "|---" * 9 + "|"]
    for rep, order in enumerate(orders):
        for name in order:
            r = runs[name][rep]
            lines.append(f"| {name} | {rep} | {r['wall_s']:.1f} | {r['process_s']:.1f} | {r['reference_pass_s']:.1f} "
                         f"| {r['epoch_s']:.1f} | {r['steady_step_s']:.2f} | {r['peak_rss_mib']:.0f} "
                         f"| {r['first_loss']:.6f} |")
    write_results(args, "\n".join(lines) + "\n",
                  {"interleaved": cost, "runs": runs, "orders": orders, "repeats": repeats, "load_before": load_before},
                  work_dir)


if __name__ == "__main__":
    main()
