"""vLLM against HF sampling on the same prompts: inference_sft's two backends, side by side.

    python exp/bench/bench_vllm.py            # needs vllm (README: Install); minutes on 2 CPU cores
    python exp/bench/bench_vllm.py --quick    # toy sizes, checks that every part runs

TL;DR-shaped: prompts of ~400 tokens, K = 4 completions of 48 new tokens each (a random model
rarely draws EOS, so nearly all run to the end), on a small local Llama. Both backends run in
this one process, one after the other, through the functions the sampling stage calls per
batch (utils.sampling.sample for hf, VllmSampler.sample for vllm), each timed after a warm-up
batch, so that start-up (loading, the engine's set-up) is not counted. Reported: new tokens
per second of each and their ratio (no target on CPU: there vLLM is for correctness; its speed
is a GPU figure).
"""
import argparse
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO_ROOT, "src"))
sys.path.insert(0, HERE)

from bench import bench_parser, fmt, machine, scratch_dir, write_results  # noqa: E402

SIZES = {"full": dict(model=dict(hidden_size=256, num_layers=4, num_heads=8, vocab_size=2048), prompt_len=400,
                      max_new_tokens=48, return_num=4, batch_size=8, batches=2),
         "quick": dict(model=dict(hidden_size=64, num_layers=1, num_heads=2, vocab_size=512), prompt_len=40,
                       max_new_tokens=8, return_num=2, batch_size=2, batches=1)}


def timed(draw, batches):
    """(seconds, new tokens) of draw(prompts, first_index) over `batches` after one warm-up batch."""
    draw(*batches[0])
    started, tokens = time.perf_counter(), 0
    for prompt_ids, first in batches[1:]:
        ids = draw(prompt_ids, first)[0]
        tokens += sum(len(row) for rows in ids for row in rows)
    return time.perf_counter() - started, tokens


def main():
    parser = bench_parser(__doc__, "results_vllm.md")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    work_dir = scratch_dir(args, "exo_bench_vllm_")
    load_before, started = os.getloadavg()[0], time.perf_counter()

    import numpy as np
    import torch
    import transformers
    import vllm
    from utils.sampling import batch_seed, sample, sampling_config
    from utils.tiny_model import builtin_corpus, count_saved_parameters, make_tiny_model
    from utils.distributed import init_distributed
    from utils.model_utils import load_causal_lm, load_tokenizer
    from utils.vllm_sampling import VllmSampler

    m = size["model"]
    model_dir = make_tiny_model(os.path.join(work_dir, "llama"), builtin_corpus(), arch="llama",
                                vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], num_layers=m["num_layers"],
                                num_heads=m["num_heads"], max_positions=512, seed=0)
    sampling = argparse.Namespace(model_name_or_path=model_dir, temp=0.8, top_k=0, top_p=1.0,
                                  max_new_tokens=size["max_new_tokens"], return_num=size["return_num"],
                                  max_length=size["prompt_len"] + size["max_new_tokens"], seed=1234, dtype="fp32",
                                  save_logps=False, trust_remote_code=False, vllm_tensor_parallel_size=1,
                                  vllm_gpu_memory_utilization=0.9, vllm_enforce_eager=True, dist_timeout_min=10)
    device = init_distributed(sampling)
    tokenizer = load_tokenizer(model_dir)
    rng = np.random.default_rng(0)
    low = tokenizer.eos_token_id + 1  # prompts of ordinary tokens
    n = size["batch_size"]
    batches = [([rng.integers(low, len(tokenizer), size["prompt_len"]).tolist() for _ in range(n)], b * n)
               for b in range(size["batches"] + 1)]
    stop_ids = [tokenizer.eos_token_id]

    model = load_causal_lm(model_dir, tokenizer, "fp32", disable_dropout=True).to(device).eval()
    config = sampling_config(sampling, tokenizer, stop_ids)
    hf_s, hf_tokens = timed(lambda ids, first: sample(model, tokenizer, ids, config, batch_seed(1234, first)), batches)
    model = None  # its memory back before vLLM loads its own copy
    sampler = VllmSampler(sampling, tokenizer, stop_ids, device)
    vllm_s, vllm_tokens = timed(sampler.sample, batches)
    sampler.close()

    results = {"hf": {"seconds": hf_s, "new_tokens": hf_tokens, "tokens_per_s": hf_tokens / hf_s},
               "vllm": {"seconds": vllm_s, "new_tokens": vllm_tokens, "tokens_per_s": vllm_tokens / vllm_s},
               "parameters": count_saved_parameters(model_dir), "size": size, "load_before": load_before}
    ratio = results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    results["vllm_vs_hf"] = ratio
    timed_prompts = n * size["batches"]
    lines = [f"Run: `python exp/bench/bench_vllm.py{' --quick' if args.quick else ''}` on "
             f"{time.strftime('%Y-%m-%d %H:%M')}; {machine(load_before)}; load average after {os.getloadavg()[0]:.2f}; "
             f"took {time.perf_counter() - started:.0f} s.",
             f"Versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, vllm {vllm.__version__}.", "",
             f"{results['parameters'] / 1e6:.1f}M-parameter Llama (fp32), {timed_prompts} prompts of "
             f"{size['prompt_len']} tokens x K = {size['return_num']}, {size['max_new_tokens']} new tokens at most, "
             f"batch {n}, after one warm-up batch:", "",
             "| backend | seconds | new tokens | tokens/s |", "|---|---|---|---|"]
    for name in ("hf", "vllm"):
        r = results[name]
        lines.append(f"| {name} | {fmt(r['seconds'])} | {r['new_tokens']} | {fmt(r['tokens_per_s'], 1)} |")
    lines += ["", f"vLLM / HF tokens/s: **{fmt(ratio)}** (reported, no target on CPU)."]
    write_results(args, "\n".join(lines) + "\n", results, work_dir)


if __name__ == "__main__":
    main()
