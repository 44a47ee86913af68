"""exo-align performance benchmark: one command, one table (printed and written as markdown).

    python exp/bench/bench.py                 # full run, ~10 minutes on 2 CPU cores
    python exp/bench/bench.py --quick         # toy sizes, to check that everything runs

Every measurement runs in its own process (exp/bench/worker.py), so peak RSS is per run; the
alignment runs of exo-align and TRL alternate in one session on the same model, data, batch,
precision (fp32) and number of optimizer steps. See exp/bench/README.md for what each figure means.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "src"))
sys.path.insert(0, HERE)

SIZES = {
    # model: Llama config; data: pairs; batch: pairs per step (2 sequences each)
    "full": dict(model=dict(vocab_size=8192, hidden_size=256, num_layers=6, num_heads=4),
                 num_train=96, num_test=8, batch_size=8, warmup=2, ratio_batches=4, ratio_repeats=2,
                 logprobs=dict(batch=8, length=512, vocab=50_000, repeats=3),
                 scaling=dict(ks=[2, 4, 8], groups=2, k_prompt_len=32, k_completion_len=96,
                              lengths=[64, 128, 256], length_rows=8, repeats=3),
                 # TL;DR-shaped: ~400-token prompts, <= 48 new tokens, K = 4, the sampling stage's default batch
                 sampling=dict(model=dict(vocab_size=8192, hidden_size=320, num_layers=7, num_heads=5),
                               num_prompts=16, prompt_tokens=[320, 440], batch_size=8, return_num=4,
                               max_new_tokens=48, max_length=512, rounds=2)),
    "quick": dict(model=dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4),
                  num_train=16, num_test=4, batch_size=4, warmup=1, ratio_batches=2, ratio_repeats=1,
                  logprobs=dict(batch=2, length=128, vocab=8_000, repeats=1),
                  scaling=dict(ks=[2, 4], groups=2, k_prompt_len=8, k_completion_len=24,
                               lengths=[32, 64], length_rows=4, repeats=1),
                  sampling=dict(model=dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=2),
                                num_prompts=4, prompt_tokens=[40, 60], batch_size=2, return_num=2,
                                max_new_tokens=8, max_length=96, rounds=1)),
}
HYPER = dict(beta=0.1, epsilon=1e-3, learning_rate=1e-5, seed=1234)
TARGETS = {  # name: (ratio, comparison, target)
    "tokens_vs_trl_default": (">=", 1.3),
    "epoch_vs_trl_fastest": (">=", 1.0),
    "rss_vs_trl_default": ("<=", 0.8),
    "tokens_gc_vs_trl_default": (">=", 1.3),
    "rss_gc_vs_trl_default": ("<=", 0.8),
    "align_over_sft": ("<=", 1.10),
    "logprobs_memory": ("<=", 0.25),
    "logprobs_time": ("<=", 1.0),
    "logprobs_api_memory": ("<=", 0.25),
    "logprobs_fwd_memory": ("<=", 0.25),
    "logprobs_fwd_time": ("<=", 1.0),
    "sampling_arithmetic": (">=", 0.4),
}


def run_worker(task, cfg, work_dir, name):
    cfg_path = os.path.join(work_dir, f"{name}.cfg.json")
    out_path = os.path.join(work_dir, f"{name}.out.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "src"), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    print(f"[bench] {name} ...", flush=True)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "worker.py"), task, cfg_path, out_path], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work_dir)
    with open(os.path.join(work_dir, f"{name}.log"), "w") as f:
        f.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"error: benchmark run {name} failed (exit {proc.returncode}); its output:\n"
                         + proc.stdout[-4000:])
    with open(out_path) as f:
        result = json.load(f)
    result["process_s"] = time.perf_counter() - started  # the whole process: start-up and imports too
    print(f"[bench] {name} done in {result['process_s']:.0f}s", flush=True)
    return result


def ours_argv(size, data, model, out_dir, cache_dir, ref_model=None, loss_type="exo-pref"):
    argv = ["--model_name_or_path", model, "--data_name_path", f"bench/pref:{data}", "--output_dir", out_dir,
            "--data_output_path", cache_dir, "--loss_type", loss_type, "--num_contrastive", "2",
            "--pref_epsilon", str(HYPER["epsilon"]), "--beta_pi", str(HYPER["beta"]),
            "--per_device_train_batch_size", str(size["batch_size"]),
            "--per_device_eval_batch_size", str(2 * size["batch_size"]),
            "--learning_rate", str(HYPER["learning_rate"]), "--seed", str(HYPER["seed"]),
            "--max_seq_len", "256", "--max_gen_len", "160", "--print_loss", "--report_to", "none"]
    return argv + (["--ref_name_or_path", ref_model] if ref_model else [])


def trl_cfg(size, data, model, out_dir, options, ref_model=None, num_train=None):
    return dict(model=model, ref_model=ref_model, data=data, output_dir=out_dir, batch_size=size["batch_size"],
                learning_rate=HYPER["learning_rate"], beta=HYPER["beta"], epsilon=HYPER["epsilon"],
                seed=HYPER["seed"], warmup=size["warmup"], options=options)


# exo-align's runs: its recommended flags, and the same with TRL's default activation policy
# (gradient checkpointing), which is what TRL's defaults trade speed for memory with
OURS_RUNS = {"ours": ["--group_by_length"], "ours_gc": ["--group_by_length", "--gradient_checkpointing"]}
TRL_FASTEST = dict(precompute_ref_log_probs=True, gradient_checkpointing=False, padding_free=True)


def check_data(built, size, work_dir):
    """The first batch of training pairs as a one-step data set: whatever order each trainer
    draws them in, its first step sees exactly these pairs, so the first losses must agree."""
    path = os.path.join(work_dir, "check_data")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(built["data"], "train.json")) as f:
        records = json.load(f)[:size["batch_size"]]
    for split, rows in (("train", records), ("test", records[:2])):
        with open(os.path.join(path, f"{split}.json"), "w") as f:
            json.dump(rows, f)
    return path


def versions():
    import deepspeed
    import torch
    import transformers
    try:
        import trl
    except ImportError:  # only the TRL comparisons need it; bench_prefix.py --shapes can run without
        trl = None
    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
             "deepspeed": deepspeed.__version__, "trl": trl.__version__ if trl else "not installed"}
    return ", ".join(f"{name} {version}" for name, version in found.items())


def machine(load_before):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, no GPU; load average before the run {load_before:.2f}"


def fmt(x, digits=2):
    return f"{x:.{digits}f}"


def bench_parser(doc, out_name):
    """The flags every benchmark script shares; a script adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks that every part runs, in minutes")
    parser.add_argument("--out", default=os.path.join(HERE, out_name), help="markdown file the table is written to")
    parser.add_argument("--work_dir", default=None, help="scratch directory (default: a fresh temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs of every run)")
    return parser


def run_header(script, args, load_before, started):
    """A results table's first lines: the command, when, the machine, how long; the versions."""
    return [f"Run: `python exp/bench/{script}{' --quick' if args.quick else ''}` on {time.strftime('%Y-%m-%d %H:%M')}; "
            f"{machine(load_before)}; load average after {os.getloadavg()[0]:.2f}; took "
            f"{time.perf_counter() - started:.0f} s.",
            f"Versions: {versions()}."]


def figure_rows(descr, figures, targets):
    """The `| figure | measured | ratio | target | met |` table of {name: (label, measured)},
    each ratio `figures[name]` checked against `targets[name]` = (">=" or "<=", target)."""
    rows = ["| figure | measured | ratio | target | met |", "|---|---|---|---|---|"]
    for name, (label, measured) in descr.items():
        op, target = targets[name]
        value = figures[name]
        met = value >= target if op == ">=" else value <= target
        rows.append(f"| {label} | {measured} | {fmt(value)} | {op} {target} | {'yes' if met else '**no**'} |")
    return rows


def scratch_dir(args, prefix):
    work_dir = args.work_dir or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(work_dir, exist_ok=True)
    return work_dir


def write_results(args, text, results, work_dir):
    """The table to `args.out` (atomically) and the raw figures beside it as JSON; then the
    scratch directory goes unless it was asked for or kept."""
    print("\n" + text)
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"[bench] wrote {args.out}")
    if not args.keep and not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)


def sampling_run(size, work_dir, profile=False):
    """The sampling measurement (README: What is measured, 4) on a model and prompts of its own,
    and with `profile` its profile on the same ones: (measurement, profile or None)."""
    from setup_data import build_sampling
    cfg = size["sampling"]
    built = build_sampling(work_dir, cfg["model"], cfg["num_prompts"], cfg["prompt_tokens"], cfg["max_length"])
    task_cfg = dict(cfg, model=built["model"], prompts=built["prompts"])
    measured = run_worker("sampling", task_cfg, work_dir, "sampling")
    return measured, run_worker("sampling_profile", task_cfg, work_dir, "sampling_profile") if profile else None


def profile_lines(size, profile):
    """The profile's table: each mode's top ops by self-CPU time, share of the profiled call."""
    cfg = size["sampling"]
    lines = ["", f"Profile (`torch.profiler`, self-CPU time) of one `sample` call on {cfg['batch_size']} prompts, "
             f"K = {cfg['return_num']}, {cfg['max_new_tokens']} new tokens at most:", ""]
    for mode, result in profile["modes"].items():
        lines += [f"{mode} ({result['s']:.2f} s):", "", "| op | self s | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{op['op']}` | {op['self_s']:.2f} | {op['self_s'] / result['s']:.1%} | {op['calls']} |"
                  for op in result["ops"]]
        lines.append("")
    return lines


def sampling_lines(size, samp):
    """The sampling figure's table row (descr, value) and its table of modes and where their time goes."""
    cfg, once, growing, plain = (size["sampling"], samp["prefilled_once"], samp["prefilled_once_growing"],
                                 samp["plain_generate"])
    descr = ("sampling (TL;DR shape): model arithmetic per second over the cores' 1024^2 matmul FLOP/s",
             f"{once['model_flops'] / 1e9:.1f} vs {once['matmul_flops'] / 1e9:.0f} GFLOP/s")
    lines = ["", f"Sampling ({cfg['num_prompts']} prompts of {cfg['prompt_tokens'][0]}-{cfg['prompt_tokens'][1]} "
             f"tokens x {cfg['return_num']} completions, {cfg['max_new_tokens']} new tokens at most, batch "
             f"{cfg['batch_size']} prompts; Llama config, {samp['params'] / 1e6:.1f}M parameters, fp32; means of "
             f"{cfg['rounds']} interleaved rounds):", "",
             "| mode | s | prefill s | decode s | outside the model s | model GFLOP/s | matmul GFLOP/s | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in (("prompts prefilled once, preallocated cache (`inference_sft.sample`)", once),
                    ("prompts prefilled once, cache grown by concatenation", growing),
                    ("plain `generate(num_return_sequences=K)`", plain)):
        lines.append(f"| {name} | {r['s']:.1f} | {r['prefill_s']:.1f} | {r['decode_s']:.1f} | {r['outside_model_s']:.1f} "
                     f"| {r['model_flops'] / 1e9:.1f} | {r['matmul_flops'] / 1e9:.0f} | {r['ratio']:.2f} |")
    lines.append(f"\nSpeed-up over plain `generate`, same run: {plain['s'] / once['s']:.2f}x "
                 f"({plain['s'] / growing['s']:.2f}x with the growing cache).")
    return descr, lines


def main():
    parser = bench_parser(__doc__, "results.md")
    parser.add_argument("--sampling_only", action="store_true",
                        help="only the sampling figure, written to results_sampling.md unless --out says otherwise")
    parser.add_argument("--profile", action="store_true",
                        help="with --sampling_only: also profile one sampling call in each mode (torch.profiler)")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    work_dir = scratch_dir(args, "exo_bench_")
    load_before, started = os.getloadavg()[0], time.perf_counter()
    if args.sampling_only:
        if args.out == os.path.join(HERE, "results.md"):
            args.out = os.path.join(HERE, "results_sampling.md")
        samp, profile = sampling_run(size, work_dir, profile=args.profile)
        descr, lines = sampling_lines(size, samp)
        figures = {"sampling_arithmetic": samp["prefilled_once"]["ratio"]}
        text = [*run_header("bench.py --sampling_only" + " --profile" * args.profile, args, load_before, started), "",
                *figure_rows({"sampling_arithmetic": descr}, figures, TARGETS), *lines,
                *(profile_lines(size, profile) if profile else [])]
        write_results(args, "\n".join(text) + "\n",
                      {"figures": figures, "sampling": samp, "profile": profile, "load_before": load_before}, work_dir)
        return

    from setup_data import build
    built = build(work_dir, size["model"], size["num_train"], size["num_test"])
    print(f"[bench] model {built['params'] / 1e6:.1f}M parameters, vocab {built['vocab']}; token lengths "
          f"(min, mean, max): {built['lengths']}", flush=True)
    steps = -(-size["num_train"] // size["batch_size"])

    # 1. same math: one step on the same pairs, a reference that differs from the policy
    check = check_data(built, size, work_dir)
    check_ours = run_worker("ours_align", dict(argv=ours_argv(size, check, built["model"], f"{work_dir}/chk_ours",
                                                              f"{work_dir}/chk_cache", built["ref_model"]),
                                               warmup=0, total_steps=1), work_dir, "check_ours")
    check_trl = run_worker("trl_align", trl_cfg(size, check, built["model"], f"{work_dir}/chk_trl", {},
                                                ref_model=built["ref_model"]) | {"warmup": 0}, work_dir, "check_trl")

    # 1. alignment epoch: exo-align, TRL defaults, TRL fastest, back to back
    align = {}
    for name, flags in OURS_RUNS.items():
        align[name] = run_worker("ours_align", dict(argv=ours_argv(size, built["data"], built["model"],
                                                                   f"{work_dir}/{name}", f"{work_dir}/{name}_cache") + flags,
                                                    warmup=size["warmup"], total_steps=steps), work_dir, f"align_{name}")
    align["trl_default"] = run_worker("trl_align", trl_cfg(size, built["data"], built["model"], f"{work_dir}/trl_d", {}),
                                      work_dir, "align_trl_default")
    align["trl_fastest"] = run_worker("trl_align", trl_cfg(size, built["data"], built["model"], f"{work_dir}/trl_f",
                                                           TRL_FASTEST | {"precompute_ref_batch_size": 2 * size["batch_size"]}),
                                      work_dir, "align_trl_fastest")

    # 2. alignment step / SFT step on identical batches
    ratio = run_worker("step_ratio", dict(argv=ours_argv(size, built["data"], built["model"], f"{work_dir}/ratio",
                                                         f"{work_dir}/ratio_cache"),
                                          num_batches=size["ratio_batches"], repeats=size["ratio_repeats"]),
                       work_dir, "step_ratio")
    # 3. lean log-probs, each variant in its own process
    lp = {f"{v}_{m}": run_worker("logprobs", dict(size["logprobs"], variant=v, mode=m), work_dir, f"logprobs_{v}_{m}")
          for m in ("fwd", "fwd_bwd") for v in ("naive", "lean")}
    # the mode training runs (model_sequence_logprobs): the gradient is built inside the logits
    lp["lean_overwrite_fwd_bwd"] = run_worker("logprobs", dict(size["logprobs"], variant="lean_overwrite", mode="fwd_bwd"),
                                              work_dir, "logprobs_lean_overwrite_fwd_bwd")
    # 4. sampling
    samp, _ = sampling_run(size, work_dir)
    sampling_descr, sampling_table = sampling_lines(size, samp)
    # 5. scaling
    scal = run_worker("scaling", dict(size["scaling"], argv=ours_argv(size, built["data"], built["model"],
                                                                      f"{work_dir}/scal", f"{work_dir}/scal_cache")),
                      work_dir, "scaling")

    ours, ours_gc, trl_d, trl_f = align["ours"], align["ours_gc"], align["trl_default"], align["trl_fastest"]
    figures = {
        "tokens_vs_trl_default": ours["steady_tokens_per_s"] / trl_d["steady_tokens_per_s"],
        "epoch_vs_trl_fastest": trl_f["wall_s"] / ours["wall_s"],
        "rss_vs_trl_default": ours["peak_rss_mib"] / trl_d["peak_rss_mib"],
        "rss_gc_vs_trl_default": ours_gc["peak_rss_mib"] / trl_d["peak_rss_mib"],
        "tokens_gc_vs_trl_default": ours_gc["steady_tokens_per_s"] / trl_d["steady_tokens_per_s"],
        "align_over_sft": ratio["ratio"],
        # toy sizes can stay inside memory the allocator already holds: no measurable peak
        "logprobs_memory": (lp["lean_overwrite_fwd_bwd"]["peak_extra_mib"] / lp["naive_fwd_bwd"]["peak_extra_mib"]
                            if lp["naive_fwd_bwd"]["peak_extra_mib"] > 0 else float("nan")),
        "logprobs_time": lp["lean_overwrite_fwd_bwd"]["s"] / lp["naive_fwd_bwd"]["s"],
        "logprobs_api_memory": (lp["lean_fwd_bwd"]["peak_extra_mib"] / lp["naive_fwd_bwd"]["peak_extra_mib"]
                                if lp["naive_fwd_bwd"]["peak_extra_mib"] > 0 else float("nan")),
        "logprobs_fwd_memory": (lp["lean_fwd"]["peak_extra_mib"] / lp["naive_fwd"]["peak_extra_mib"]
                                if lp["naive_fwd"]["peak_extra_mib"] > 0 else float("nan")),
        "logprobs_fwd_time": lp["lean_fwd"]["s"] / lp["naive_fwd"]["s"],
        "sampling_arithmetic": samp["prefilled_once"]["ratio"],
    }
    loss_diff = abs(check_ours["first_loss"] - check_trl["first_loss"])
    same_math = loss_diff <= 1e-4 * max(1.0, abs(check_trl["first_loss"]))

    descr = {
        "tokens_vs_trl_default": ("steady-state alignment tokens/s vs TRL defaults",
                                  f"{ours['steady_tokens_per_s']:.0f} vs {trl_d['steady_tokens_per_s']:.0f} tok/s"),
        "epoch_vs_trl_fastest": ("one epoch, reference pass included, vs TRL's fastest settings (speed-up)",
                                 f"{ours['wall_s']:.1f} s vs {trl_f['wall_s']:.1f} s"),
        "rss_vs_trl_default": ("peak RSS vs TRL defaults", f"{ours['peak_rss_mib']:.0f} vs {trl_d['peak_rss_mib']:.0f} MiB"),
        "tokens_gc_vs_trl_default": ("both activation-checkpointed (`--gradient_checkpointing`, TRL's default): "
                                     "steady tokens/s vs TRL defaults",
                                     f"{ours_gc['steady_tokens_per_s']:.0f} vs {trl_d['steady_tokens_per_s']:.0f} tok/s"),
        "rss_gc_vs_trl_default": ("both activation-checkpointed: peak RSS vs TRL defaults",
                                  f"{ours_gc['peak_rss_mib']:.0f} vs {trl_d['peak_rss_mib']:.0f} MiB"),
        "align_over_sft": ("alignment step / SFT step, same tokens",
                           f"{ratio['exo_total_s']:.2f} s vs {ratio['sft_total_s']:.2f} s"),
        "logprobs_memory": ("`sequence_logprobs` peak memory vs naive, forward + backward (above the logits; "
                            "gradient built in the logits, as training runs it)",
                            f"{lp['lean_overwrite_fwd_bwd']['peak_extra_mib']:.0f} vs "
                            f"{lp['naive_fwd_bwd']['peak_extra_mib']:.0f} MiB"),
        "logprobs_time": ("`sequence_logprobs` time vs naive, forward + backward (as training runs it)",
                          f"{lp['lean_overwrite_fwd_bwd']['s']:.2f} s vs {lp['naive_fwd_bwd']['s']:.2f} s"),
        "logprobs_api_memory": ("the same with a separate gradient buffer (`overwrite_logits=False`, for callers "
                                "that reuse their logits)",
                                f"{lp['lean_fwd_bwd']['peak_extra_mib']:.0f} vs "
                                f"{lp['naive_fwd_bwd']['peak_extra_mib']:.0f} MiB"),
        "logprobs_fwd_memory": ("`sequence_logprobs` peak memory vs naive, forward (reference pass)",
                                f"{lp['lean_fwd']['peak_extra_mib']:.0f} vs {lp['naive_fwd']['peak_extra_mib']:.0f} MiB"),
        "logprobs_fwd_time": ("`sequence_logprobs` time vs naive, forward",
                              f"{lp['lean_fwd']['s']:.2f} s vs {lp['naive_fwd']['s']:.2f} s"),
        "sampling_arithmetic": sampling_descr,
    }
    lines = [*run_header("bench.py", args, load_before, started),
             f"Model: Llama config, {built['params'] / 1e6:.1f}M parameters, vocab {built['vocab']}, fp32. Data: "
             f"{size['num_train']} pairs (+{size['num_test']} test); token lengths min/mean/max: prompt "
             f"{'/'.join(fmt(x, 0) for x in built['lengths']['prompt'])}, completion incl. EOS "
             f"{'/'.join(fmt(x, 0) for x in built['lengths']['completion'])}. Batch {size['batch_size']} pairs, "
             f"{steps} optimizer steps per epoch.", "", *figure_rows(descr, figures, TARGETS)]
    lines.append(f"| same math: first-step loss, exo-align vs TRL exo_pair (distinct reference) | "
                 f"{check_ours['first_loss']:.6f} vs {check_trl['first_loss']:.6f} | diff {loss_diff:.1e} | "
                 f"equal | {'yes' if same_math else '**no**'} |")
    lines += ["", "Alignment runs (one epoch each, same data and steps):", "",
              "| run | steady tok/s | steady step s | epoch wall s | peak RSS MiB | first-step loss | train tokens |",
              "|---|---|---|---|---|---|---|"]
    for name, r in align.items():
        lines.append(f"| {name} | {r['steady_tokens_per_s']:.0f} | {r['steady_step_s']:.2f} | {r['wall_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['first_loss']:.6f} | {r['train_tokens']} |")
    lines += ["", f"Lean log-probs: [{size['logprobs']['batch']}, {size['logprobs']['length']}, "
              f"{size['logprobs']['vocab']}] fp32 logits ({lp['lean_fwd']['logits_mib']:.0f} MiB); forward + backward "
              "must also return their gradient, as large again: a fresh buffer unless it is built inside the "
              "logits (`overwrite_logits=True`, what training uses):", "",
              "| variant | fwd s | fwd peak extra MiB | fwd+bwd s | fwd+bwd peak extra MiB |", "|---|---|---|---|---|"]
    for v, label in (("naive", "log_softmax + gather"), ("lean", "sequence_logprobs")):
        lines.append(f"| {label} | {lp[v + '_fwd']['s']:.2f} | {lp[v + '_fwd']['peak_extra_mib']:.0f} | "
                     f"{lp[v + '_fwd_bwd']['s']:.2f} | {lp[v + '_fwd_bwd']['peak_extra_mib']:.0f} |")
    ow = lp["lean_overwrite_fwd_bwd"]
    lines.append(f"| sequence_logprobs, overwrite_logits | (same) | (same) | {ow['s']:.2f} | {ow['peak_extra_mib']:.0f} |")
    lines += sampling_table
    lines += ["", "Scaling of the exo step (cached reference; unpadded batches):", "",
              "| vary | K | seq len | rows | step s | tok/s |", "|---|---|---|---|---|---|"]
    for vary in ("k", "length"):
        for r in scal[vary]:
            lines.append(f"| {vary} | {r['k']} | {r['seq_len']} | {r['rows']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} |")
    write_results(args, "\n".join(lines) + "\n",
                  {"figures": figures, "align": align, "check": [check_ours, check_trl], "ratio": ratio,
                   "logprobs": lp, "sampling": samp, "scaling": scal, "load_before": load_before}, work_dir)


if __name__ == "__main__":
    main()
