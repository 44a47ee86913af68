"""exp/frontier: the frontier, matched-KL and bootstrap arithmetic on synthetic sweeps whose
answer is known, and the driver end to end on its --quick grid (on the quickstart test's models)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exp" / "frontier"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exp" / "quickstart"))

from analysis import Sweep, frontier, mean_over, read_frontier  # noqa: E402


def test_frontier_is_the_upper_envelope():
    kl = np.array([0.0, 0.5, 0.4, 1.0, 2.0, 1.5, 3.0])
    reward = np.array([0.2, 0.5, 0.6, 0.55, 0.8, 0.9, 0.85])
    xs, ys = frontier(kl, reward)
    # (0.5, 0.5) is beaten by (0.4, 0.6); (1.0, .55) by (0.4, .6); (2.0, .8) by (1.5, .9); (3, .85) by (1.5, .9)
    assert xs.tolist() == [0.0, 0.4, 1.5] and ys.tolist() == [0.2, 0.6, 0.9]
    assert read_frontier(xs, ys, [0.2, 0.95, 1.5, 5.0]).tolist() == pytest.approx([0.4, 0.75, 0.9, 0.9])
    # area of a straight line from (0, 0) to (2, 1), flat after: mean over [0, 2] is 0.5, over [0, 4] 0.75
    xs, ys = np.array([0.0, 2.0]), np.array([0.0, 1.0])
    assert mean_over(xs, ys, 2.0) == pytest.approx(0.5)
    assert mean_over(xs, ys, 4.0) == pytest.approx(0.75)


def synthetic(shift, noise, num_prompts=60, seeds=(0, 1, 2), rng=None):
    """Two methods on one frontier shape r(k) = 1 - exp(-k), `method` above `baseline` by `shift`
    at every point, with per-prompt noise; checkpoints at KL 0.5 .. 3."""
    rng = rng or np.random.default_rng(0)
    points, matrices = [], []
    for seed in seeds:
        points.append({"method": "sft", "kind": "sft", "beta_pi": None, "seed": seed, "steps": 0})
        matrices.append((rng.normal(0.0, noise, num_prompts), np.zeros(num_prompts)))
        for method, offset in (("exo-rw", shift), ("dpo-rw", 0.0)):
            for step, k in enumerate([0.5, 1.0, 2.0, 3.0], 1):
                points.append({"method": method, "kind": "offline", "beta_pi": 1.0, "seed": seed, "steps": step})
                matrices.append((1 - np.exp(-k) + offset + rng.normal(0.0, noise, num_prompts),
                                 k + rng.normal(0.0, noise, num_prompts)))
    return points, matrices


def test_a_known_difference_is_found_and_none_where_there_is_none():
    labels = {"exo-rw": "rw", "dpo-rw": "rw"}
    result = Sweep(*synthetic(0.1, 0.05), [0.5, 1.0, 2.0], labels, n_boot=300).compare()
    exo = next(r for r in result["matched"] if r["method"] == "exo-rw")
    assert exo["baseline"] == "dpo-rw" and result["k_common"] == pytest.approx(3.0, abs=0.05)
    # at KL 0.25 (on the line from SFT) the shift is halved; at the checkpoints it is 0.1
    for k, diff, (low, high) in zip(exo["kl"], exo["diff"], exo["diff_ci"]):
        assert low > 0 and diff == pytest.approx(0.1, abs=0.03) and low < diff < high, k
    assert exo["mean_reward_diff_ci"][0] > 0

    same = Sweep(*synthetic(0.0, 0.05, rng=np.random.default_rng(1)), [0.5, 1.0, 2.0], labels, n_boot=300).compare()
    exo = next(r for r in same["matched"] if r["method"] == "exo-rw")
    low, high = exo["mean_reward_diff_ci"]
    assert low < exo["mean_reward_diff"] < high and low < 0 < high


def test_the_bootstrap_is_paired_over_prompts_and_seeds():
    # exo-rw's points are dpo-rw's exactly: every replicate's difference is 0 (to BLAS's rounding, which
    # differs between the rows of one product), so the interval is [0, 0]
    points, matrices = synthetic(0.0, 0.1)
    dpo = [(p, m) for p, m in zip(points, matrices) if p["method"] == "dpo-rw"]
    for (p, _), (q, m) in zip([(p, m) for p, m in zip(points, matrices) if p["method"] == "exo-rw"], dpo):
        matrices[points.index(p)] = m
    result = Sweep(points, matrices, [1.0], {"exo-rw": "rw", "dpo-rw": "rw"}, n_boot=100).compare()
    exo = next(r for r in result["matched"] if r["method"] == "exo-rw")
    assert np.abs(exo["diff"]).max() < 1e-12 and np.abs(exo["diff_ci"]).max() < 1e-12


def test_online_rounds_are_paired_with_the_offline_checkpoint_of_their_step():
    points, matrices = synthetic(0.0, 0.05)
    for seed in (0, 1, 2):
        for r, step in ((1, 2), (2, 4)):  # rounds ending at the offline run's steps 2 and 4
            points.append({"method": "online-exo-rw", "kind": "online", "beta_pi": 1.0, "seed": seed, "steps": step})
            offline = next(m for p, m in zip(points, matrices)
                           if p["method"] == "exo-rw" and p["seed"] == seed and p["steps"] == step)
            matrices.append((offline[0] - 0.2, offline[1]))
            # rounds that restart AdamW every round, 0.1 below those that continue it
            points.append({**points[-1], "method": "online-exo-rw-restart"})
            matrices.append((offline[0] - 0.3, offline[1]))
    result = Sweep(points, matrices, [1.0], {"exo-rw": "rw", "dpo-rw": "rw"}, n_boot=100).compare()
    rows = {(r["method"], r["offline"], r["steps"]): r for r in result["online"]}
    expected = {("online-exo-rw", "exo-rw"): -0.2, ("online-exo-rw-restart", "exo-rw"): -0.3,
                ("online-exo-rw", "online-exo-rw-restart"): 0.1}
    assert set(rows) == {(*pair, steps) for pair in expected for steps in (2, 4)}
    for (method, against, steps), row in rows.items():
        diff = expected[(method, against)]
        assert row["pairs"] == 3 and row["diff"] == pytest.approx(diff) and row["diff_ci"] == pytest.approx([diff, diff])


def test_reseed_shared_gives_every_seed_its_own_miniature(tmp_path):
    """--reseed_shared wires each seed's runs to that seed's own corpus, models and samples (the
    pipeline as built; the stages themselves are the --quick grid's, run in test_quickstart)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exp" / "online_exp"))
    import frontier

    pipe = frontier.build(frontier.parse_args(["--quick", "--workdir", str(tmp_path), "--reseed_shared"]))
    stages = {s["name"]: s for s in pipe.stages}
    for stage in pipe.stages:  # every dependency is a stage added before it
        assert all(list(stages).index(d) < list(stages).index(stage["name"]) for d in stage["deps"]), stage["name"]
    for seed in (0, 1):
        assert stages[f"s{seed}_corpus"]["settings"]["seed"] == seed
        assert stages[f"s{seed}_align_exo-rw_b1_s{seed}"]["deps"] == [f"s{seed}_rm_label"]
        assert stages[f"s{seed}_eval_sft_s{seed}"]["deps"] == [f"s{seed}_sft"]
    online = [s for s in pipe.stages if "online" in s["name"]]
    # the rounds (seed 0 only in --quick) read seed 0's miniature, and their own earlier stages
    assert online and all(d.startswith(("s0_", "online-exo-rw_b1_s0_")) for s in online for d in s["deps"])
    assert {d for s in online for d in s["deps"] if d.startswith("s0_")} == {"s0_sft", "s0_rm_label"}
