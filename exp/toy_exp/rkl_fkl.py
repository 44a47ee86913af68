"""EXO is mode-seeking, DPO mean-seeking: a 1-D toy that regenerates imgs/rkl_fkl.png.

    python exp/toy_exp/rkl_fkl.py                   # writes imgs/rkl_fkl.png, prints J and KL

A "completion" is a point y of a grid. pi_sft is a broad bump over the grid and the reward r(y)
has two separated peaks of different height, so the policy that maximises the RLHF objective

    J(pi) = E_pi[r] - beta KL(pi || pi_sft),   maximised by   pi*(y) ∝ pi_sft(y) exp(r(y) / beta),

is bimodal. Both methods train on what the real pipeline trains on: groups of K candidates
sampled from pi_sft, labelled with their rewards, scored by the policy and the reference, and
fed to the project's `alignment_loss` (exo-rw and dpo-rw, beta_pi = 1 and beta_r = beta, so
that the optimum of both losses is pi*; docs/objective.md). The policy is either

  unimodal  a discretised Gaussian (mean and log-width): it cannot represent pi*. EXO's reverse KL
            settles on one mode; DPO's forward KL stretches across both and puts mass in the
            valley between them, where the reward is low, so it scores a lower J;
  tabular   free logits per grid point: full capacity, and both methods reach pi*.

J(pi) and KL(pi || pi*) are computed exactly over the grid; note J(pi) = beta (log Z - KL(pi || pi*)),
so the method with the smaller reverse KL to pi* has the higher J.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "src"))

from utils.loss import alignment_loss  # noqa: E402

GRID = torch.linspace(-1.0, 1.0, 81, dtype=torch.float64)
BETA = 0.1
METHODS = {"EXO": "exo-rw", "DPO": "dpo-rw"}


def gaussian_logits(mean, log_std):
    return -0.5 * ((GRID - mean) / log_std.exp()) ** 2


def reward(y):
    """Two peaks: a higher one at 0.5 and a lower one at -0.5, low reward between them."""
    return torch.exp(-0.5 * ((y - 0.5) / 0.12) ** 2) + 0.8 * torch.exp(-0.5 * ((y + 0.5) / 0.12) ** 2)


def log_pi_sft():
    return torch.log_softmax(gaussian_logits(torch.tensor(0.0, dtype=torch.float64),
                                             torch.tensor(0.6, dtype=torch.float64).log()), -1)


def log_pi_star(beta=BETA):
    return torch.log_softmax(log_pi_sft() + reward(GRID) / beta, -1)


def objective(log_pi, beta=BETA):
    """J(pi) = E_pi[r] - beta KL(pi || pi_sft), exactly."""
    pi = log_pi.exp()
    return float((pi * reward(GRID)).sum() - beta * (pi * (log_pi - log_pi_sft())).sum())


def kl_to_optimum(log_pi, beta=BETA):
    """KL(pi || pi*), exactly."""
    return float((log_pi.exp() * (log_pi - log_pi_star(beta))).sum())


class UnimodalPolicy(torch.nn.Module):
    """A Gaussian over the grid: limited capacity. Starts at pi_sft, as alignment starts from SFT."""

    def __init__(self):
        super().__init__()
        self.mean = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
        self.log_std = torch.nn.Parameter(torch.tensor(0.6, dtype=torch.float64).log())

    def forward(self):
        return torch.log_softmax(gaussian_logits(self.mean, self.log_std), -1)


class TabularPolicy(torch.nn.Module):
    """A free logit per grid point: full capacity. Starts at pi_sft."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(log_pi_sft().clone())

    def forward(self):
        return torch.log_softmax(self.logits, -1)


def train(loss_type, family, steps=800, groups=16, k=32, lr=0.05, beta=BETA, seed=0):
    """Fit a `family` ("unimodal" or "tabular") policy with `loss_type`; return its log-probs over the grid.

    Every step draws `groups` x `k` fresh candidates from pi_sft, as the pipeline samples its
    alignment data from the SFT model; the learning rate decays linearly to 0 so the last
    iterates average out the sampling noise."""
    generator = torch.Generator().manual_seed(seed)
    policy = UnimodalPolicy() if family == "unimodal" else TabularPolicy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    ref = log_pi_sft()
    for _ in range(steps):
        candidates = torch.multinomial(ref.exp(), groups * k, replacement=True, generator=generator).view(groups, k)
        log_pi = policy()
        loss = alignment_loss(log_pi[candidates], ref[candidates], reward(GRID[candidates]), loss_type,
                              beta_pi=1.0, beta_r=beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        return policy()


def run(steps=800, seed=0):
    """{family: {method: log-probs over the grid}} for both families and both methods."""
    return {family: {method: train(loss_type, family, steps=steps, seed=seed) for method, loss_type in METHODS.items()}
            for family in ("unimodal", "tabular")}


def plot(fits, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = GRID.numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    titles = {"unimodal": "unimodal policy (limited capacity)", "tabular": "tabular policy (full capacity)"}
    for ax, (family, by_method) in zip(axes, fits.items()):
        ax.fill_between(x, log_pi_star().exp().numpy(), color="0.8", label="π* ∝ π_sft·exp(r/β)")
        ax.plot(x, log_pi_sft().exp().numpy(), color="0.4", linestyle=":", label="π_sft")
        for (method, log_pi), style in zip(by_method.items(), ("-", "--")):
            ax.plot(x, log_pi.exp().numpy(), linestyle=style, linewidth=2,
                    label=f"{method} ({'reverse' if method == 'EXO' else 'forward'} KL)")
        ax.set_title(titles[family])
        ax.set_xlabel("y")
    axes[0].set_ylabel("probability")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.png"
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(REPO_ROOT / "imgs" / "rkl_fkl.png"), help="where to write the figure")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per fit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the candidate sampling")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # thousands of tiny steps: threads would only add overhead
    fits = run(args.steps, args.seed)
    print(f"beta = {BETA}; the optimum pi* has J = {objective(log_pi_star()):.4f}")
    print(f"{'policy':<10} {'method':<6} {'J(pi)':>8} {'KL(pi||pi*)':>12}")
    for family, by_method in fits.items():
        for method, log_pi in by_method.items():
            print(f"{family:<10} {method:<6} {objective(log_pi):>8.4f} {kl_to_optimum(log_pi):>12.4f}")
    plot(fits, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
