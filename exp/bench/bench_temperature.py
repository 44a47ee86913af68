"""Scoring at a sampling temperature: `utils.logprobs.sequence_logprobs` (no grad, the reference
pass and calc_logprobs) against `log_softmax(logits / T)` + gather, at T = 1 and T = 0.8 (the
recipes' value), side by side in one process (best of `--reps`, the two alternating).

    python exp/bench/bench_temperature.py            # [8, 256, 32000] fp32 logits, ~1 min
    python exp/bench/bench_temperature.py --quick    # toy sizes, checks that it runs
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "src"))

import torch  # noqa: E402

from utils.logprobs import sequence_logprobs  # noqa: E402


def naive(logits, labels, mask, temperature):
    token_logps = (logits[:, :-1] / temperature).log_softmax(-1).gather(-1, labels[:, 1:, None]).squeeze(-1)
    return (token_logps * mask[:, 1:]).sum(-1)


def best_of(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks that it runs")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each variant (best is kept)")
    args = parser.parse_args()
    n, t, v = (2, 32, 1000) if args.quick else (8, 256, 32000)
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(n, t, v, generator=gen)
    labels = torch.randint(0, v, (n, t), generator=gen)
    mask = torch.ones(n, t)
    mask[:, : t // 4] = 0  # the prompt
    print(f"[{n}, {t}, {v}] fp32 logits, no grad, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| temperature | sequence_logprobs s | log_softmax(logits / T) + gather s | ratio | max abs diff |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for temperature in (1.0, 0.8):
            ours, theirs = [], []
            for _ in range(2):  # alternate, so that a drift in the machine's load hits both alike
                ours.append(best_of(lambda: sequence_logprobs(logits, labels, mask, temperature), args.reps))
                theirs.append(best_of(lambda: naive(logits, labels, mask, temperature), args.reps))
            diff = (sequence_logprobs(logits, labels, mask, temperature) - naive(logits, labels, mask, temperature))
            print(f"| {temperature} | {min(ours):.3f} | {min(theirs):.3f} | {min(ours) / min(theirs):.2f} | "
                  f"{float(diff.abs().max()):.1e} |")


if __name__ == "__main__":
    main()
