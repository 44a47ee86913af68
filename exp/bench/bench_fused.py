"""The fused LM head's benchmark: one command, one table (printed and written as markdown).

    python exp/bench/bench_fused.py            # minutes on 2 idle CPU cores (24 min on a loaded box)
    python exp/bench/bench_fused.py --quick    # toy sizes, checks that every part runs

With a 128k-vocabulary model of tiny hidden size (where the LM head and its logits are most of
a step): peak RSS and time per step of train_exo fused (`--fused_logprobs`, the default) and
unfused (`--no-fused_logprobs`), and peak RSS against TRL's DPOTrainer at its defaults. On the
main benchmark's model (vocabulary 8192): peak RSS of train_exo without activation
checkpointing against TRL's defaults. Every run is a process of its own (worker.py), one after
the other in one session; see exp/bench/README.md.
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "src"))
sys.path.insert(0, HERE)

from bench import (HYPER, SIZES, bench_parser, figure_rows, ours_argv, run_header, run_worker,  # noqa: E402
                   scratch_dir, trl_cfg, write_results)

BIG_VOCAB = 128_256  # Llama 3's
SIZES_FUSED = {
    "full": dict(big=dict(model=dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4),
                          num_train=32, num_test=2, batch_size=8, warmup=1),
                 main=SIZES["full"]),
    "quick": dict(big=dict(model=dict(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2),
                           num_train=8, num_test=2, batch_size=2, warmup=1, vocab=16_000),
                  main=SIZES["quick"]),
}
TARGETS = {"rss_fused_vs_unfused": ("<=", 0.5), "rss_fused_vs_trl": ("<=", 0.5),
           "step_fused_vs_unfused": ("<=", 1.05), "rss_main_vs_trl": ("<=", 0.8)}


def widen_vocab(model_dir, vocab, seed=0):
    """The model at `model_dir` rebuilt with a `vocab`-row embedding and head (fresh weights,
    same seed). The tokenizer keeps its own small vocabulary: rows past it are never labels,
    but every logit row still spans the whole vocabulary, as with a real 128k tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.vocab_size = vocab
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())


def main():
    args = bench_parser(__doc__, "results_fused.md").parse_args()
    sizes = SIZES_FUSED["quick" if args.quick else "full"]
    big, main_size = sizes["big"], sizes["main"]
    work_dir = scratch_dir(args, "exo_bench_fused_")
    load_before, started = os.getloadavg()[0], time.perf_counter()

    from setup_data import build
    built = build(os.path.join(work_dir, "big"), big["model"], big["num_train"], big["num_test"])
    vocab = big.get("vocab", BIG_VOCAB)
    big_params = widen_vocab(built["model"], vocab)
    steps = -(-big["num_train"] // big["batch_size"])

    def ours(name, size, data, flags):
        argv = ours_argv(size, data["data"], data["model"], f"{work_dir}/{name}", f"{work_dir}/{name}_cache") + flags
        return run_worker("ours_align", dict(argv=argv, warmup=size["warmup"],
                                             total_steps=-(-size["num_train"] // size["batch_size"])),
                          work_dir, name)

    runs = {}
    # fused and unfused alternate twice, so that a drift in the machine's load hits both alike
    for rep in range(2):
        for name, flag in (("fused", "--fused_logprobs"), ("unfused", "--no-fused_logprobs")):
            runs[f"{name}_{rep}"] = ours(f"big_{name}_{rep}", big, built, ["--group_by_length", flag])
    runs["trl_default"] = run_worker("trl_align", trl_cfg(big, built["data"], built["model"], f"{work_dir}/big_trl", {}),
                                     work_dir, "big_trl_default")
    main_built = build(os.path.join(work_dir, "main"), main_size["model"], main_size["num_train"], main_size["num_test"])
    runs["main_fused"] = ours("main_fused", main_size, main_built, ["--group_by_length"])
    runs["main_unfused"] = ours("main_unfused", main_size, main_built, ["--group_by_length", "--no-fused_logprobs"])
    runs["main_trl_default"] = run_worker("trl_align", trl_cfg(main_size, main_built["data"], main_built["model"],
                                                               f"{work_dir}/main_trl", {}), work_dir, "main_trl_default")

    def best(name, key):  # peak RSS: the same in both repeats up to noise; step time: the faster
        return min(runs[f"{name}_{rep}"][key] for rep in range(2))

    rss_f, rss_u, rss_t = best("fused", "peak_rss_mib"), best("unfused", "peak_rss_mib"), runs["trl_default"]["peak_rss_mib"]
    step_f, step_u = best("fused", "steady_step_s"), best("unfused", "steady_step_s")
    main_f, main_t = runs["main_fused"]["peak_rss_mib"], runs["main_trl_default"]["peak_rss_mib"]
    figures = {"rss_fused_vs_unfused": rss_f / rss_u, "rss_fused_vs_trl": rss_f / rss_t,
               "step_fused_vs_unfused": step_f / step_u, "rss_main_vs_trl": main_f / main_t}
    descr = {
        "rss_fused_vs_unfused": (f"vocab {vocab}: peak RSS, fused vs unfused", f"{rss_f:.0f} vs {rss_u:.0f} MiB"),
        "rss_fused_vs_trl": (f"vocab {vocab}: peak RSS, fused vs TRL defaults", f"{rss_f:.0f} vs {rss_t:.0f} MiB"),
        "step_fused_vs_unfused": (f"vocab {vocab}: steady step time, fused vs unfused",
                                  f"{step_f:.2f} s vs {step_u:.2f} s"),
        "rss_main_vs_trl": ("main bench model (vocab 8192), no activation checkpointing: peak RSS vs TRL defaults",
                            f"{main_f:.0f} vs {main_t:.0f} MiB"),
    }

    lines = [*run_header("bench_fused.py", args, load_before, started),
             f"Vocab-{vocab} model: Llama config, hidden {big['model']['hidden_size']}, {big['model']['num_layers']} "
             f"layers, {big_params / 1e6:.1f}M parameters, fp32; {big['num_train']} pairs, batch {big['batch_size']} "
             f"pairs ({2 * big['batch_size']} rows), {steps} optimizer steps; token lengths min/mean/max: prompt "
             f"{'/'.join(f'{x:.0f}' for x in built['lengths']['prompt'])}, completion "
             f"{'/'.join(f'{x:.0f}' for x in built['lengths']['completion'])}. Main model: "
             f"{main_built['params'] / 1e6:.1f}M parameters, vocab {main_built['vocab']} (exp/bench/bench.py's).", "",
             *figure_rows(descr, figures, TARGETS)]
    lines += ["", "Runs (train_exo: `--group_by_length`, cached reference, no activation checkpointing; TRL: "
              "DPOTrainer defaults, activation checkpointing on, reference run every step):", "",
              "| run | steady step s | steady tok/s | epoch wall s | peak RSS MiB | first-step loss |", "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['steady_step_s']:.2f} | {r['steady_tokens_per_s']:.0f} | {r['wall_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['first_loss']:.6f} |")
    write_results(args, "\n".join(lines) + "\n",
                  {"figures": figures, "runs": runs, "hyper": HYPER, "load_before": load_before}, work_dir)


if __name__ == "__main__":
    main()
