"""The statistics of a judged win rate: intervals over prompts, and AlpacaEval 2's length control.

Intervals. A win rate is the mean over n prompts of each prompt's score in [0, 1]. Its 95%
percentile-bootstrap interval resamples the prompts; it covers at about the nominal rate for
n of 30 and more, but below that it is too narrow, and at a win rate of exactly 0 or 1 every
resample has the same mean, so it is the single point [0, 0] or [1, 1]. There the Wilson
score interval is used:

    centre = (p + z^2 / 2n) / (1 + z^2 / n),  half = z / (1 + z^2 / n) sqrt(p (1 - p) / n + z^2 / 4n^2)

with p the win rate and z = 1.96. It is the score interval of a proportion: a prompt's score in
[0, 1] with mean p varies no more than a 0/1 outcome would (variance <= p (1 - p)), so it is no
narrower than for 0/1 prompt scores, where its coverage stays near 95% (tests/test_winrate.py
measures it by simulation: 90-98% at 10 and 20 prompts, the bootstrap's 40-96%).

Length control. `lc_minimal` is AlpacaEval 2's `length_controlled_minimal` estimator
(alpaca-eval 0.6.6, alpaca_eval/metrics/glm_winrate.py), fitted on the judged pairs:

    P(policy wins pair i) = sigmoid(w_len tanh(d_i / sd(d)) + w_0)

with d_i = len(baseline answer) - len(policy answer) in characters and sd the sample standard
deviation (n - 1) over the pairs, as AlpacaEval standardises them. Labels are the soft scores
s_i: each pair enters twice, as a win weighted s_i and a loss weighted 1 - s_i. The weights
are an L1-penalised logistic regression with no separate intercept (w_0 is the weight of a
constant feature, penalised as the other is), at the penalty among scikit-learn's 10 default
C = 10^-4 .. 10^4 with the lowest soft log loss in 5-fold cross-validation (the two copies of a
pair in one fold; liblinear, random_state 123), refitted on all pairs. The length-controlled
win rate is its prediction at zero length difference, sigmoid(w_0). The penalty often sets
w_len, and for a win rate near 1/2 w_0 too, to exactly zero: then LC is sigmoid(w_0) of the
constant alone, or exactly 0.5.

`lc_with_difficulty` is the same with AlpacaEval's `length_controlled_v1` features, for several
policies judged against one baseline on the same prompts: a per-prompt difficulty d_x enters
as a third feature. AlpacaEval's difficulties are fitted once on its own 805 instructions; here
they are fitted on the policies given, jointly:

    logit P(policy m wins on prompt x) = theta_m + phi_m tanh(d / sd_m) - d_x

(an L2-penalised logistic regression, C = 1, on the soft labels, difficulties centred to mean
0); each policy's LC is then the mean over its prompts of sigmoid(w_0 + w_diff d_x) from its
own L1 fit of [tanh(d / sd), d_x, 1], as above (AlpacaEval averages over its annotations, one
per instruction: the same where each prompt has one pair). AlpacaEval's v1 also regularises towards fits
of two length-gamed baselines whose judgments only it has; that part is left out, which makes
these the features of its `length_controlled_noreg`.

Neither removes quality that is itself correlated with length: if longer answers are better
answers, controlling for length takes part of the real difference away with the bias.
"""
import contextlib
import os
import sys
import warnings

import numpy as np

Z95 = 1.959963984540054
MIN_PROMPTS_FOR_BOOTSTRAP = 30
# AlpacaEval's settings of its GLM (glm_winrate.py: GLM_INFO and fit_LogisticRegressionCV)
FOLDS = 5
NUM_CS = 10
RANDOM_STATE = 123
LOG_LOSS_CLIP = 1e-15
DIFFICULTY_C = 1.0


# -- intervals ---------------------------------------------------------------------------------
def bootstrap_interval(per_prompt, resamples, seed):
    """95% percentile-bootstrap interval of the mean of `per_prompt`, resampling its entries."""
    rng = np.random.default_rng(seed)
    values = np.asarray(per_prompt, dtype=float)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def wilson_interval(mean, n, z=Z95):
    """The Wilson score interval (module docstring) of a mean in [0, 1] over n units."""
    shrink = 1 + z * z / n
    centre = (mean + z * z / (2 * n)) / shrink
    half = z / shrink * np.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
    # at a mean of exactly 0 or 1 that end is exactly 0 or 1; rounding would leave 1e-17 off it
    return (0.0 if mean == 0 else float(centre - half)), (1.0 if mean == 1 else float(centre + half))


def bootstrap_under_covers(per_prompt):
    """Why the percentile bootstrap interval of this mean under-covers, in a few words (fewer
    than 30 prompts, a mean of exactly 0 or 1); None where it covers."""
    mean = float(np.mean(per_prompt))
    if len(per_prompt) < MIN_PROMPTS_FOR_BOOTSTRAP:
        return f"fewer than {MIN_PROMPTS_FOR_BOOTSTRAP} prompts"
    if mean in (0.0, 1.0):
        return f"a win rate of exactly {mean:.0f}"
    return None


# -- AlpacaEval's GLM --------------------------------------------------------------------------
def soft_log_loss(y, q, soft):
    """AlpacaEval's held-out score: the mean log loss of the soft labels `soft` under the
    predicted P(win) `q` (each pair's two copies carry its one soft label). `y` (the 0/1 copy
    labels) is what scikit-learn passes; the soft label is what the loss is of."""
    q = np.clip(q, LOG_LOSS_CLIP, 1 - LOG_LOSS_CLIP)
    return -float(np.mean(soft * np.log(q) + (1 - soft) * np.log(1 - q)))


def fit_soft_l1(features, soft):
    """Weights (one per column of `features`, no intercept) of AlpacaEval's L1 logistic
    regression of the soft labels `soft`, with its 5-fold cross-validated penalty; and the C."""
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold

    n = len(soft)
    x = np.concatenate([features, features])
    y = np.concatenate([np.ones(n), np.zeros(n)])
    weight = np.concatenate([soft, 1 - soft])  # a win weighted s, a loss weighted 1 - s
    groups, cv = np.concatenate([np.arange(n)] * 2), GroupKFold(n_splits=FOLDS)  # a pair's copies in one fold
    # liblinear writes "class label 1 specified in weight is not found" to fd 2 for each fit whose
    # wins (or losses) all weigh 0, as on a fold the policy loses every pair of; the fit is the same
    one_sided = any(min(weight[train][y[train] == 1].sum(), weight[train][y[train] == 0].sum()) == 0
                    for train, _ in cv.split(x, y, groups))
    with sklearn.config_context(enable_metadata_routing=True), _quiet_fd2(one_sided), warnings.catch_warnings():
        # liblinear stops at AlpacaEval's iteration limit on a nearly separable fold at large C, and
        # says so once per fit; the number is still the one AlpacaEval computes, which is the claim
        warnings.simplefilter("ignore", ConvergenceWarning)
        scorer = make_scorer(soft_log_loss, response_method="predict_proba", greater_is_better=False)
        model = LogisticRegressionCV(Cs=NUM_CS, cv=cv, scoring=scorer.set_score_request(soft=True),
                                     solver="liblinear", fit_intercept=False, random_state=RANDOM_STATE,
                                     **_l1_penalty())
        model.set_fit_request(sample_weight=True)  # the soft labels reach the scorer, the weights the fit
        model.fit(x, y, sample_weight=weight, groups=groups, soft=np.concatenate([soft, soft]))
    return model.coef_[0].astype(float), float(np.atleast_1d(model.C_)[0])


@contextlib.contextmanager
def _quiet_fd2(quiet):
    """File descriptor 2 (where C code writes) sent to /dev/null inside, when `quiet`."""
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _l1_penalty():
    """The L1 penalty as this scikit-learn spells it: l1_ratios=(1,) where penalty= is deprecated
    (1.8 on; it goes in 1.10), penalty="l1" before; and the fitted attributes' new layout where
    there is one, so that no FutureWarning is printed."""
    from sklearn.linear_model import LogisticRegressionCV

    params = LogisticRegressionCV().get_params()
    if params.get("penalty") != "deprecated":
        return {"penalty": "l1"}
    return {"l1_ratios": (1.0,), **({"use_legacy_attributes": False} if "use_legacy_attributes" in params else {})}


def standardised_tanh(policy_lengths, baseline_lengths):
    """tanh(d / sd(d)), d = baseline - policy length, sd with n - 1 (AlpacaEval's feature); zeros
    where sd is 0 or undefined (no length varies: the constant alone is fitted)."""
    d = np.asarray(baseline_lengths, dtype=float) - np.asarray(policy_lengths, dtype=float)
    sd = d.std(ddof=1) if len(d) > 1 else 0.0
    return np.tanh(d / sd) if sd > 0 else np.zeros_like(d)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def too_few_pairs(n):
    """Why the cross-validated fit cannot be made on n pairs; None when it can."""
    return f"{FOLDS}-fold cross-validation needs {FOLDS} pairs, got {n}" if n < FOLDS else None


def lc_minimal(scores, policy_lengths, baseline_lengths):
    """AlpacaEval 2's length_controlled_minimal win rate of judged pairs (module docstring):
    {"lc_win_rate", "length_weight", "C"}, or {"lc_unavailable": why} below 5 pairs. The length
    weight is reported as that of tanh((policy - baseline length) / sd), -w_len: positive when
    the judge prefers the longer answer."""
    soft = np.asarray(scores, dtype=float)
    if too_few_pairs(len(soft)):
        return {"lc_unavailable": too_few_pairs(len(soft))}
    features = np.stack([standardised_tanh(policy_lengths, baseline_lengths), np.ones(len(soft))], axis=1)
    (w_len, w_0), c = fit_soft_l1(features, soft)
    return {"lc_win_rate": float(_sigmoid(w_0)), "length_weight": float(0.0 - w_len), "C": c}  # 0.0 -: no -0.0


def prompt_difficulties(policies):
    """{prompt: d_x} fitted jointly on several policies' judged pairs (module docstring);
    `policies` is a list of (prompts, scores, policy_lengths, baseline_lengths), one per policy."""
    from sklearn.linear_model import LogisticRegression

    prompts = sorted({x for p in policies for x in p[0]})
    column = {x: i for i, x in enumerate(prompts)}
    m, rows, soft = len(policies), [], []
    for k, (names, scores, lp, lb) in enumerate(policies):
        block = np.zeros((len(names), 2 * m + len(prompts)))
        block[:, k] = 1  # theta_k
        block[:, m + k] = standardised_tanh(lp, lb)  # phi_k
        block[np.arange(len(names)), [2 * m + column[x] for x in names]] = 1  # the prompt's effect, -d_x
        rows.append(block)
        soft.append(np.asarray(scores, dtype=float))
    x, soft = np.concatenate(rows), np.concatenate(soft)
    model = LogisticRegression(C=DIFFICULTY_C, fit_intercept=False, max_iter=1000)
    model.fit(np.concatenate([x, x]), np.r_[np.ones(len(soft)), np.zeros(len(soft))],
              sample_weight=np.concatenate([soft, 1 - soft]))
    effect = model.coef_[0][2 * m:]
    return dict(zip(prompts, (effect.mean() - effect).tolist()))


def lc_with_difficulty(policies):
    """Each policy's LC win rate with AlpacaEval's v1 features and difficulties fitted on these
    policies (module docstring): a list of {"lc_win_rate", "length_weight", "difficulty_weight",
    "C"} (the length weight signed as lc_minimal's), in the order of `policies` (as for
    prompt_difficulties), and the difficulties. Each policy needs 5 pairs or more."""
    difficulty = prompt_difficulties(policies)
    results = []
    for names, scores, lp, lb in policies:
        d = np.array([difficulty[x] for x in names])
        features = np.stack([standardised_tanh(lp, lb), d, np.ones(len(d))], axis=1)
        (w_len, w_diff, w_0), c = fit_soft_l1(features, np.asarray(scores, dtype=float))
        unique = np.array([difficulty[x] for x in sorted(set(names))])  # each prompt once
        results.append({"lc_win_rate": float(_sigmoid(w_0 + w_diff * unique).mean()), "length_weight": float(0.0 - w_len),
                        "difficulty_weight": float(w_diff), "C": c})
    return results, difficulty
