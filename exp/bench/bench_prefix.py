"""Prefix sharing benchmark: train_exo, the reference pass and inference_rm scoring with each
group's prompt encoded once against once per candidate, and TRL's DPOTrainer at its fastest
settings, on TL;DR-shaped (prompt ~8x completion, K=4) and HH-shaped (prompt ~3x, K=2) data;
then train_exo with its defaults against --prefix_sharing off on TL;DR-shaped data whose
prompts are cut to fit and on IMDB-shaped data (prompt 8 tokens, completions 200).

    python exp/bench/bench_prefix.py            # ~5 minutes on 2 CPU cores
    python exp/bench/bench_prefix.py --quick    # toy sizes, to check that everything runs

Tokens are counted the same way for every run: the unshared token count (every candidate's
prompt + completion, no padding), whether or not the run encodes the prompt once. Every run is
its own process (exp/bench/worker.py), so peak RSS is per run. Writes a markdown table.
"""
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "src"))
sys.path.insert(0, HERE)

from bench import (HYPER, TRL_FASTEST, bench_parser, fmt, machine, run_worker, scratch_dir, trl_cfg,  # noqa: E402
                   versions, write_results)

# (prompt tokens range, completion tokens range, K, records, groups per batch); the sharing
# runs are `on` for the shapes whose prompts fit, the defaults (auto) for the two that test
# what auto does with prompts cut to fit and with short prompts
SHAPES = {
    "TL;DR": dict(prompt=(320, 440), completion=(32, 64), k=4, num_train=48, batch_size=2),
    "HH": dict(prompt=(96, 192), completion=(32, 64), k=2, num_train=96, batch_size=4),
    # prompts longer than max_seq_len - max_gen_len = 384: every group's prompt is cut to fit
    "TL;DR cut": dict(prompt=(420, 560), completion=(16, 40), k=4, num_train=32, batch_size=2,
                      max_seq_len=448, max_gen_len=64, sharing="defaults"),
    "IMDB": dict(prompt=(8, 8), completion=(195, 205), k=4, num_train=32, batch_size=2,
                 max_seq_len=256, max_gen_len=224, sharing="defaults"),
}
MODEL = dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4)
QUICK = dict(model=dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4), scale=4)
TARGETS = {"TL;DR": {"tokens": 2.0, "trl": 2.5, "rss": 0.7}, "HH": {"tokens": 1.3},
           "TL;DR cut": {"tokens": 2.0}, "IMDB": {"tokens": 0.95}}


def build(work_dir, model_size, scale, names):
    """A Llama-config model and, per shape, rw data (K completions with rewards) for
    train_exo and the scorers, and pref pairs of the same prompts (the first two completions)
    for TRL."""
    from setup_data import text_of_tokens, word_pool
    from utils.tiny_model import make_tiny_model
    from transformers import AutoTokenizer

    rng = random.Random(0)
    words = word_pool(rng, 8000)
    model_dir = os.path.join(work_dir, "model")
    make_tiny_model(model_dir, [" ".join(rng.choice(words) for _ in range(30)) for _ in range(3000)], arch="llama",
                    max_positions=1024, seed=0, **model_size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = {}
    for name, shape in SHAPES.items():
        if name not in names:
            continue
        def tokens(lo_hi):
            return max(4, rng.randint(*lo_hi) // scale)

        rw, pref = [], []
        for _ in range(shape["num_train"] + 2):
            prompt = text_of_tokens(tokenizer, words, rng, tokens(shape["prompt"]), False)
            completions = [text_of_tokens(tokenizer, words, rng, tokens(shape["completion"]), True)
                           for _ in range(shape["k"])]
            rw.append({"prompt": prompt, "completions": completions, "rewards": [rng.random() for _ in completions]})
            pref.append({"prompt": prompt, "chosen": completions[0], "rejected": completions[1]})
        for kind, records in (("rw", rw), ("pref", pref)):
            path = os.path.join(work_dir, f"{name.replace(';', '')}_{kind}")
            os.makedirs(path, exist_ok=True)
            for split, rows in (("train", records[:shape["num_train"]]), ("test", records[shape["num_train"]:])):
                with open(os.path.join(path, f"{split}.json"), "w") as f:
                    json.dump(rows, f)
            data[name, kind] = path
    return model_dir, data


def ours_argv(model, data, shape, out_dir, cache_dir, sharing):
    """train_exo's flags for one run; sharing "defaults" passes no --prefix_sharing."""
    return ["--model_name_or_path", model, "--data_name_path", f"bench/rw:{data}", "--output_dir", out_dir,
            "--data_output_path", cache_dir, "--loss_type", "exo-rw", "--num_contrastive", str(shape["k"]),
            "--beta_pi", str(HYPER["beta"]), "--per_device_train_batch_size", str(shape["batch_size"]),
            "--per_device_eval_batch_size", str(shape["batch_size"]), "--learning_rate", str(HYPER["learning_rate"]),
            "--seed", str(HYPER["seed"]), "--max_seq_len", str(shape.get("max_seq_len", 512)),
            "--max_gen_len", str(shape.get("max_gen_len", 80)), "--group_by_length",
            *([] if sharing == "defaults" else ["--prefix_sharing", sharing])]


def packed_of(tally):
    return f"{tally.get('shared', 0)} of {tally.get('shared', 0) + tally.get('unshared', 0)}"


def defaults_table(name, runs, shape, target):
    """The table of a shape run with the defaults against --prefix_sharing off: train_exo's
    runs (unless --scoring_only) and the interleaved in-process measurements."""
    lines = [f"{name}: prompts {shape['prompt'][0]}-{shape['prompt'][1]} tokens, completions "
             f"{shape['completion'][0]}-{shape['completion'][1]}, K = {shape['k']}, {shape['num_train']} records, "
             f"{shape['batch_size']} groups per step, --max_seq_len {shape['max_seq_len']} --max_gen_len "
             f"{shape['max_gen_len']}.", "",
             "| figure | defaults (auto) | --prefix_sharing off | ratio | target | met |", "|---|---|---|---|---|---|"]
    if "defaults" in runs:
        on, off = runs["defaults"], runs["off"]
        speed = on["steady_tokens_per_s"] / off["steady_tokens_per_s"]
        lines += [f"| train_exo steady tokens/s | {on['steady_tokens_per_s']:.0f} | {off['steady_tokens_per_s']:.0f} | "
                  f"{fmt(speed)}x | >= {target['tokens']}x | {'yes' if speed >= target['tokens'] else '**no**'} |",
                  f"| train_exo steady step, s | {on['steady_step_s']:.2f} | {off['steady_step_s']:.2f} | - | - | |",
                  f"| train_exo peak RSS, MiB | {on['peak_rss_mib']:.0f} | {off['peak_rss_mib']:.0f} | "
                  f"{fmt(on['peak_rss_mib'] / off['peak_rss_mib'])}x | - | |",
                  f"| train_exo batches auto packed (reference pass, training, evaluation) | "
                  f"{packed_of(on['sharing_tally'])} | - | - | - | |",
                  f"| train_exo first-step loss | {on['first_loss']:.6f} | {off['first_loss']:.6f} | - | equal | |"]
    scoring = runs["scoring"]
    step = scoring["policy_fwd_bwd"]
    speed = step["unshared_s"] / step["shared_s"]
    lines.append(f"| policy forward + backward, interleaved, 2 batches ({step['tokens']} tokens), s | "
                 f"{step['shared_s']:.2f} | {step['unshared_s']:.2f} | {fmt(speed)}x faster | "
                 f">= {target['tokens']}x | {'yes' if speed >= target['tokens'] else '**no**'} |")
    for scorer, label in (("reference", "reference pass (log-probs), s"), ("inference_rm", "inference_rm scoring, s")):
        s = scoring[scorer]
        lines.append(f"| {label} | {s['shared_s']:.2f} | {s['unshared_s']:.2f} | "
                     f"{fmt(s['unshared_s'] / s['shared_s'])}x faster (max diff {s['max_abs_diff']:.1e}) | - | |")
    lines.append(f"| batches auto packed (all passes of the interleaved measurements) | "
                 f"{packed_of(scoring['sharing_tally'])} | - | - | - | |")
    return lines + [""]


def main():
    parser = bench_parser(__doc__, "results_prefix.md")
    parser.add_argument("--scoring_only", action="store_true",
                        help="skip the train_exo and TRL runs: only the in-process, interleaved measurements")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated data shapes to run, of {', '.join(SHAPES)} (default: all)")
    args = parser.parse_args()
    chosen = args.shapes.split(",")
    unknown = [name for name in chosen if name not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    work_dir = scratch_dir(args, "exo_bench_prefix_")
    load_before, started = os.getloadavg()[0], time.perf_counter()
    model, data = build(work_dir, QUICK["model"] if args.quick else MODEL, QUICK["scale"] if args.quick else 1, chosen)

    rows, tables = {}, []
    for name, shape in SHAPES.items():
        if name not in chosen:
            continue
        tag = name.replace(";", "").replace(" ", "_")
        steps = shape["num_train"] // shape["batch_size"]
        runs = {}
        if shape.get("sharing") == "defaults":  # train_exo as a user runs it against off, side by side
            for sharing in () if args.scoring_only else ("defaults", "off"):
                runs[sharing] = run_worker("ours_align", dict(
                    argv=ours_argv(model, data[name, "rw"], shape, f"{work_dir}/{tag}_{sharing}",
                                   f"{work_dir}/{tag}_{sharing}_cache", sharing), warmup=2, total_steps=steps),
                    work_dir, f"{tag}_align_{sharing}")
            # the same interleaved in one process, robust to a machine whose load changes: the
            # policy's forward + backward on the first training batches and the scorers
            runs["scoring"] = run_worker("prefix_scoring", dict(
                model=model, data=data[name, "rw"], batch_size=shape["batch_size"], max_seq_len=shape["max_seq_len"],
                max_gen_len=shape["max_gen_len"], repeats=2, step_batches=2, sharing="auto",
                num_records=4 * shape["batch_size"]), work_dir, f"{tag}_scoring")
            tables += defaults_table(name, runs, shape, TARGETS[name])
            continue
        for sharing in () if args.scoring_only else ("on", "off"):  # alternated per shape, same model, data and batches
            runs[sharing] = run_worker("ours_align", dict(
                argv=ours_argv(model, data[name, "rw"], shape, f"{work_dir}/{tag}_{sharing}",
                               f"{work_dir}/{tag}_{sharing}_cache", sharing), warmup=2, total_steps=steps),
                work_dir, f"{tag}_align_{sharing}")
        if name in ("TL;DR",) and not args.scoring_only:
            runs["trl"] = run_worker("trl_align", trl_cfg(dict(batch_size=shape["batch_size"] * shape["k"] // 2, warmup=2),
                                                          data[name, "pref"], model, f"{work_dir}/{tag}_trl",
                                                          TRL_FASTEST | {"precompute_ref_batch_size": 8}),
                                     work_dir, f"{tag}_trl_fastest")
        runs["scoring"] = run_worker("prefix_scoring", dict(model=model, data=data[name, "rw"], batch_size=4,
                                                            max_seq_len=512, max_gen_len=80, repeats=2,
                                                            step_batches=2),
                                     work_dir, f"{tag}_scoring")
        rows[name] = runs

    lines = ["| shape | figure | sharing on | sharing off | ratio | target |", "|---|---|---|---|---|---|"] if rows else []
    for name, runs in rows.items():
        target = TARGETS[name]
        step = runs["scoring"]["policy_fwd_bwd"]
        lines.append(f"| {name} | policy forward + backward, interleaved, s ({step['tokens']} tokens) | "
                     f"{step['shared_s']:.2f} | {step['unshared_s']:.2f} | {fmt(step['unshared_s'] / step['shared_s'])}x "
                     f"faster | - |")
        if not args.scoring_only:
            on, off = runs["on"], runs["off"]
            speed = on["steady_tokens_per_s"] / off["steady_tokens_per_s"]
            lines.append(f"| {name} | train_exo steady tokens/s | {on['steady_tokens_per_s']:.0f} | "
                         f"{off['steady_tokens_per_s']:.0f} | {fmt(speed)}x | >= {target['tokens']}x |")
            if "trl" in runs:
                trl = runs["trl"]["steady_tokens_per_s"]
                lines.append(f"| {name} | train_exo (sharing on) vs TRL DPOTrainer fastest, tokens/s | "
                             f"{on['steady_tokens_per_s']:.0f} | TRL {trl:.0f} | "
                             f"{fmt(on['steady_tokens_per_s'] / trl)}x | >= {target['trl']}x |")
            rss = on["peak_rss_mib"] / off["peak_rss_mib"]
            lines.append(f"| {name} | train_exo peak RSS, MiB | {on['peak_rss_mib']:.0f} | {off['peak_rss_mib']:.0f} | "
                         f"{fmt(rss)}x | {'<= ' + str(target['rss']) + 'x' if 'rss' in target else '-'} |")
        for scorer, label in (("reference", "reference pass (log-probs), s"), ("inference_rm", "inference_rm scoring, s")):
            s = runs["scoring"][scorer]
            lines.append(f"| {name} | {label} | {s['shared_s']:.2f} | {s['unshared_s']:.2f} | "
                         f"{fmt(s['unshared_s'] / s['shared_s'])}x faster (max diff {s['max_abs_diff']:.1e}) | - |")
    lines = tables + lines
    flags = "".join(f" --{f}" for f in ("quick", "scoring_only") if getattr(args, f))
    flags += f" --shapes '{args.shapes}'" if chosen != list(SHAPES) else ""
    header = [f"Command: `python exp/bench/bench_prefix.py{flags}`; "
              f"{machine(load_before)}; versions: {versions()}; total {time.perf_counter() - started:.0f}s.",
              "Tokens = the unshared token count (every candidate's prompt + completion, no padding) for every run.",
              ""]
    write_results(args, "\n".join(header + lines) + "\n", {"rows": rows, "load_before": load_before}, work_dir)


if __name__ == "__main__":
    main()
