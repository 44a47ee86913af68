"""Synthetic judgments with a known true length-controlled win rate, and what alpaca-eval 0.6.6
computes from them: the fixtures tests/test_winrate.py holds utils/winrate_stats.py to.

    python -m venv --system-site-packages /tmp/ae
    /tmp/ae/bin/pip install alpaca-eval==0.6.6 scikit-learn
    /tmp/ae/bin/python tests/winrate_fixtures/make_alpaca_eval_fixtures.py   # writes alpaca_eval_lc.json beside it

Each case draws, from its seed, a length for every baseline and policy answer and a judgment
of every pair from a known model, P(policy wins) = sigmoid(theta + phi tanh(d / sd(d)) - diff_x)
with d the policy's length minus the baseline's: `hard` judgments are 0/1 draws, `soft` ones
the probability itself (a reward-model judge), `ties` a 0.5 (orders that disagree) with
probability t, else a 0/1 draw. The truth is the expected score at zero length difference,
averaged over the prompts. The judgments are stored, so the tests need neither this script
nor alpaca-eval.

alpaca-eval's `get_length_controlled_winrate` downloads `df_gamed.csv` (AlpacaEval's own
instructions' difficulties and its gamed baselines' judgments) whatever the GLM; its
`length_controlled_minimal` formula reads nothing from it, so it is handed a local file of
zero difficulties. For the joint case, `length_controlled_noreg` (v1's features without v1's
regularisation to the gamed baselines) is handed the difficulties that
utils/winrate_stats.prompt_difficulties fits on the case's policies: the per-policy step of
our joint fit is checked against alpaca-eval's own code, the difficulty step against its
stored output.
"""
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from utils import winrate_stats  # noqa: E402

CASES = [
    # name, seed, prompts, policies, theta per policy, phi, policy length shift (log), judgment kind, ties, diff sd
    ("no length effect, policy better", 1, 400, 1, [1.0], 0.0, 0.0, "hard", 0.0, 0.0),
    ("length-biased judge, equal quality, policy longer", 2, 400, 1, [0.0], 2.0, 0.5, "hard", 0.0, 0.0),
    ("reward-model judge, policy worse but longer", 3, 300, 1, [-0.6], 1.5, 0.4, "soft", 0.0, 0.0),
    ("ties from position disagreement", 4, 400, 1, [0.5], 1.0, 0.2, "ties", 0.3, 0.0),
    ("true LC 0.5, length bias, few prompts", 5, 60, 1, [0.0], 1.0, 0.3, "hard", 0.0, 0.0),
    ("three policies, prompt difficulty varies", 6, 200, 3, [-0.5, 0.3, 1.0], 1.0, 0.3, "soft", 0.0, 1.5),
]


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def draw(seed, prompts, policies, thetas, phi, shift, kind, ties, diff_sd):
    """One case's judgments: per policy (prompt ids, scores, policy lengths, baseline lengths) and the truths."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, diff_sd, prompts) if diff_sd else np.zeros(prompts)
    baseline = np.round(np.exp(rng.normal(5, 0.6, prompts))).astype(int) + 1
    names = [f"prompt{x:04d}" for x in range(prompts)]
    out, truths = [], []
    for m in range(policies):
        # longer answers on easier prompts: the length difference carries part of the difficulty
        policy = np.round(baseline * np.exp(shift - 0.2 * difficulty + rng.normal(0, 0.5, prompts))).astype(int) + 1
        d = policy - baseline
        p = sigmoid(thetas[m] + phi * np.tanh(d / d.std(ddof=1)) - difficulty)
        if kind == "soft":
            scores = np.round(p, 6)
        else:
            scores = (rng.random(prompts) < p).astype(float)
            if kind == "ties":
                scores[rng.random(prompts) < ties] = 0.5
        truth = sigmoid(thetas[m] - difficulty)
        truths.append(float((ties * 0.5 + (1 - ties) * truth).mean()))
        out.append({"prompts": names, "scores": scores.tolist(), "length_policy": policy.tolist(),
                    "length_baseline": baseline.tolist()})
    return out, truths


def alpaca_eval_lc(policy, glm, difficulty=None):
    """alpaca-eval's own length-controlled win rate of one policy's judgments."""
    from alpaca_eval.metrics import glm_winrate

    n = len(policy["scores"])
    values = np.zeros(n) if difficulty is None else np.array([difficulty[x] for x in policy["prompts"]])
    with tempfile.TemporaryDirectory() as tmp:
        gamed = Path(tmp) / "df_gamed.csv"
        pd.DataFrame({"model": "none", "index": range(n), "instruction_difficulty": values}).to_csv(gamed, index=False)
        glm_winrate.hf_hub_download = lambda **kwargs: str(gamed)  # no network: the file above
        annotations = pd.DataFrame({
            "instruction": policy["prompts"], "index": range(n), "annotator": "synthetic",
            "generator_1": "baseline", "output_1": ["b" * k for k in policy["length_baseline"]],
            "generator_2": "policy", "output_2": ["p" * k for k in policy["length_policy"]],
            "preference": 1 + np.asarray(policy["scores"])})  # AlpacaEval: 1 the baseline's win, 2 the policy's
        metrics = glm_winrate.get_length_controlled_winrate(annotations, glm_name=glm, save_weights_dir=None,
                                                            is_warn_extreme_changes=False)
    return metrics["length_controlled_winrate"] / 100


def main():
    import alpaca_eval
    import sklearn

    warnings.filterwarnings("ignore", category=FutureWarning)  # scikit-learn 1.8+ on alpaca-eval's penalty="l1"
    cases = []
    for name, seed, prompts, policies, thetas, phi, shift, kind, ties, diff_sd in CASES:
        judged, truths = draw(seed, prompts, policies, thetas, phi, shift, kind, ties, diff_sd)
        case = {"name": name, "seed": seed, "kind": kind, "truth_lc": truths, "policies": judged,
                "alpaca_eval_minimal": [alpaca_eval_lc(p, "length_controlled_minimal") for p in judged]}
        if policies > 1:
            as_tuples = [(p["prompts"], p["scores"], p["length_policy"], p["length_baseline"]) for p in judged]
            difficulty = winrate_stats.prompt_difficulties(as_tuples)
            case["difficulty"] = difficulty
            case["alpaca_eval_noreg"] = [alpaca_eval_lc(p, "length_controlled_noreg", difficulty) for p in judged]
        cases.append(case)
        print(name, "truth", np.round(truths, 4), "alpaca-eval minimal", np.round(case["alpaca_eval_minimal"], 4),
              "noreg", np.round(case.get("alpaca_eval_noreg", []), 4))
    versions = {"alpaca_eval": alpaca_eval.__version__, "scikit-learn": sklearn.__version__,
                "numpy": np.__version__, "pandas": pd.__version__}
    out = Path(__file__).with_name("alpaca_eval_lc.json")
    out.write_text(json.dumps({"made_by": "tests/winrate_fixtures/make_alpaca_eval_fixtures.py", "versions": versions,
                               "cases": cases}) + "\n")
    print(f"wrote {out} ({versions})")


if __name__ == "__main__":
    main()
