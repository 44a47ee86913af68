"""The alignment losses over K candidates (README: The objective); the log-probs they read: utils/logprobs.py.

Notation, for one prompt x with K candidates y_1..y_K and labels r_1..r_K:

    h_i = log pi_theta^tau(y_i | x) - log pi_ref^tau(y_i | x)   (summed over completion tokens)
    q   = softmax(beta_pi * h)                                 (policy over the K candidates)
    p   = softmax(r / beta_r)                                  (rw labels)
        | p_winner = 1 - eps, p_other = eps / (K - 1)         (pref labels, winner = argmax r)

    EXO: KL(q || p) = sum_i q_i (log q_i - log p_i)            (reverse KL, mode-seeking)
    DPO: CE(p, q)   = -sum_i p_i log q_i                       (forward KL + const, mean-seeking)

and the listwise baselines, each one function below with its paper: dpo-pl (Plackett-Luce),
nca-rw / nca-pref (NCA), lipo (LiPO-lambda), ipo (IPO) and the reference-free simpo (SimPO).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossSpec(NamedTuple):
    """What a loss type needs. labels: "rw" (p = softmax(r / beta_r)), "pref" (the winner,
    argmax r, which must be unique), "ranking" (the order of r; ties allowed). reference: it
    uses pi_ref (h = log pi_theta - log pi_ref). lengths: it averages log-probs per token."""
    labels: str
    reference: bool = True
    lengths: bool = False
    checks_labels: bool = False  # label_error has something to say about its data


LOSSES = {
    "exo-pref": LossSpec("pref"),
    "exo-rw": LossSpec("rw"),
    "dpo-pref": LossSpec("pref"),
    "dpo-rw": LossSpec("rw"),
    "dpo-pl": LossSpec("ranking"),
    "nca-pref": LossSpec("pref"),
    "nca-rw": LossSpec("rw"),
    "lipo": LossSpec("ranking", checks_labels=True),
    "ipo": LossSpec("ranking", lengths=True),
    "simpo": LossSpec("ranking", reference=False, lengths=True),
}
LOSS_TYPES = tuple(LOSSES)
DEFAULT_PREF_EPSILON = {"exo": 1e-3, "dpo": 0.0, "nca": 0.0}
DEFAULT_SIMPO_MARGIN = 0.5


def resolve_pref_epsilon(loss_type, pref_epsilon=None):
    """--pref_epsilon default: 1e-3 for EXO (its KL needs p > 0), 0 (one-hot) for DPO and NCA."""
    if pref_epsilon is None:
        return DEFAULT_PREF_EPSILON.get(loss_type.split("-")[0], 0.0)
    return float(pref_epsilon)


def target_distribution(rewards, loss_type, beta_r, pref_epsilon=None):
    """Log of the label distribution p over the K candidates, [G, K].

    rw:   log p = log_softmax(r / beta_r)
    pref: p_winner = 1 - eps, every other candidate eps / (K - 1); winner = argmax r
          (the first one on ties). With eps = 0 the losers get log p = -inf.
    """
    if loss_type.endswith("-rw"):
        return F.log_softmax(rewards / beta_r, dim=-1)
    eps = resolve_pref_epsilon(loss_type, pref_epsilon)
    k = rewards.shape[-1]
    winner = F.one_hot(rewards.argmax(-1), k).bool()
    log_loser = torch.log(torch.tensor(eps / (k - 1), dtype=rewards.dtype, device=rewards.device))
    log_winner = torch.log1p(torch.tensor(-eps, dtype=rewards.dtype, device=rewards.device))
    return torch.where(winner, log_winner, log_loser)


# Every objective below returns one loss per group, [G]; alignment_loss averages them.

def exo(log_q, log_p):
    """EXO (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    arXiv:2402.00856): the reverse KL from the policy's distribution over the K candidates to
    the labels', mode-seeking,

        KL(q || p) = sum_i q_i (log q_i - log p_i),   q = softmax(beta_pi h).
    """
    if torch.isinf(log_p).any():
        raise ValueError("EXO needs pref_epsilon > 0: KL(q || p) is infinite where p = 0")
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def dpo(log_q, log_p):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290) over K candidates: the forward cross-entropy,
    mean-seeking,

        CE(p, q) = -sum_i p_i log q_i.

    With rw labels this is InfoNCA (Chen et al. 2024, arXiv:2402.05369, eq. 8), p = softmax(r / alpha)."""
    # xlogy-style: candidates with p = 0 contribute exactly 0, not 0 * log q
    return -(log_p.exp() * log_q).sum(-1)


def plackett_luce(scores, rewards):
    """Plackett-Luce DPO (Rafailov et al. 2023, arXiv:2305.18290, appendix A.3): the negative
    log-likelihood of the labels' ranking (best first) under softmax(beta_pi h) over the
    candidates not yet placed,

        -sum_i log( exp(s_i) / sum_{j : r_j <= r_i} exp(s_j) ),   s = beta_pi h.

    Without ties in r this is the Plackett-Luce likelihood exactly (the last-placed candidate's
    term is log 1 = 0). Tied candidates are not ordered among themselves: each keeps the others
    of its tie in its denominator (Breslow's rule for tied ranks), so the loss does not depend on
    the order the candidates come in, and a group whose rewards all tie pulls its candidates
    towards equal scores. At K = 2 it is dpo-pref with eps = 0.
    """
    not_above = rewards[..., None, :] <= rewards[..., :, None]  # [G, i, j]: j is placed no earlier than i
    log_denominator = torch.logsumexp(scores[..., None, :].masked_fill(~not_above, float("-inf")), dim=-1)
    return -(scores - log_denominator).sum(-1)


def nca(scores, log_p):
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards", arXiv:2402.05369): each candidate is classified as drawn from the labels' target
    rather than from the reference, s = beta_pi h,

        -sum_i p_i log sigmoid(s_i) - (1/K) sum_i log sigmoid(-s_i),

    with p the target of dpo-rw (p = softmax(r / alpha), alpha = --beta_r) or dpo-pref. Its
    optimum is s_i = log(K p_i). At K = 2 with pref labels it is TRL's `nca_pair`.
    """
    k = scores.shape[-1]
    return -(log_p.exp() * F.logsigmoid(scores)).sum(-1) - F.logsigmoid(-scores).sum(-1) / k


def _ranked_pair_mean(pair_losses, rewards):
    """Per group, the mean of pair_losses[g, i, j] over its ranked pairs (r_i > r_j); 0 for a
    group without one (all its rewards tie)."""
    ranked = (rewards[..., :, None] > rewards[..., None, :]).to(pair_losses.dtype)
    return (pair_losses * ranked).sum((-2, -1)) / ranked.sum((-2, -1)).clamp(min=1)


def _pair_differences(values):
    """[G, K] -> [G, K, K], values_i - values_j."""
    return values[..., :, None] - values[..., None, :]


LIPO_LABEL_ERROR = ("the ideal DCG sum_k (2^r_(k) - 1) / log2(1 + k) of these rewards is <= 0, and LiPO's gains "
                    "(2^r - 1) / maxDCG need it positive: shift the rewards up")


def _discounts(k, like):
    """log2(1 + rank) for ranks 1..K."""
    return torch.log2(torch.arange(2, k + 2, dtype=like.dtype, device=like.device))


def _ideal_dcg(rewards):
    """[G, 1]: sum_k (2^r_(k) - 1) / log2(1 + k), rewards sorted best first; 1 for a group whose
    rewards all tie (it has no pair to weigh)."""
    ideal = rewards.sort(dim=-1, descending=True).values
    max_dcg = ((torch.exp2(ideal) - 1) / _discounts(rewards.shape[-1], rewards)).sum(-1, keepdim=True)
    return torch.where(ideal[..., :1] > ideal[..., -1:], max_dcg, torch.ones_like(max_dcg))


def win_rate_labels(rewards):
    """[G, K] rewards -> each candidate's mean probability of beating the others of its group,
    psi_i = mean_{j != i} sigmoid(r_i - r_j), the Bradley-Terry win rate under a reward model.
    In (0, 1) whatever the rewards' scale, and in the same order as r: labels for lipo's gains
    from a reward model whose scores are negative (LiPO labels its lists from a pairwise
    preference model by such average win probabilities)."""
    k = rewards.shape[-1]
    beats = torch.sigmoid(_pair_differences(rewards))
    return (beats.sum(-1) - 0.5) / (k - 1)  # the diagonal adds sigmoid(0) = 1/2


def label_error(loss_type, group_rewards):
    """Why one group's rewards (a list) cannot train `loss_type`, or None: checked on the data
    before training, so that a run does not stop on them half-way."""
    if loss_type == "lipo" and _ideal_dcg(torch.tensor([group_rewards], dtype=torch.float64)).item() <= 0:
        return LIPO_LABEL_ERROR
    return None


def lipo(scores, rewards):
    """LiPO-lambda (Liu et al. 2024, "LiPO: Listwise Preference Optimization through
    Learning-to-Rank", arXiv:2402.01878): a lambda-weighted pairwise logistic loss, s = beta_pi h,

        mean over pairs with r_i > r_j of  -Delta_ij log sigmoid(s_i - s_j),
        Delta_ij = |G_i - G_j| |1/D_i - 1/D_j|,   G = (2^r - 1) / maxDCG,   D = log2(1 + rank under s),

    maxDCG = sum_k (2^r_(k) - 1) / log2(1 + k) over the rewards sorted best first, and the
    weights Delta are not differentiated. The labels are the gains' exponents as given (LiPO's
    psi): a negative reward has a gain in (-1/maxDCG, 0), still below every larger reward's, but
    groups of mostly negative rewards have maxDCG <= 0, which has no meaning as a normaliser:
    such groups are refused (shift the rewards; a group whose rewards all tie has no pair and
    contributes 0). Ranks count from 1 (the highest score). A tie in score ranks the
    worse-labelled candidate first, so the weights are not all 0 at the start, when h = 0 for
    every candidate; candidates tied in both score and label share the mean of their 1/D. So
    nothing depends on the order the candidates come in.
    """
    with torch.no_grad():
        max_dcg = _ideal_dcg(rewards)
        if (max_dcg <= 0).any():
            raise ValueError(f"lipo: {LIPO_LABEL_ERROR}")
        gains = (torch.exp2(rewards) - 1) / max_dcg
        discount_of_rank = _discounts(scores.shape[-1], scores)
        worse_label_first = rewards.argsort(dim=-1, stable=True)
        order = worse_label_first.gather(-1, (-scores.gather(-1, worse_label_first)).argsort(dim=-1, stable=True))
        inverse_discount = torch.empty_like(scores).scatter_(-1, order, 1 / discount_of_rank.expand_as(scores))
        # candidates equal in score and label are interchangeable: they share their ranks' mean
        same = (_pair_differences(scores) == 0) & (_pair_differences(rewards) == 0)
        inverse_discount = (same * inverse_discount[..., None, :]).sum(-1) / same.sum(-1)
        weights = _pair_differences(gains).abs() * _pair_differences(inverse_discount).abs()
    return _ranked_pair_mean(-weights * F.logsigmoid(_pair_differences(scores)), rewards)


def ipo(avg_h, rewards, beta_pi):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv:2310.12036) on per-token average log-ratios u = h / |y|, as TRL computes it,

        mean over pairs with r_w > r_l of  (u_w - u_l - 1 / (2 beta_pi))^2.

    At K = 2 it is TRL's `ipo`; its optimum puts every ranked pair's u_w - u_l at 1 / (2 beta_pi)
    at K = 2 (for K > 2 the least-squares compromise between the pairs)."""
    return _ranked_pair_mean((_pair_differences(avg_h) - 1 / (2 * beta_pi)) ** 2, rewards)


def simpo(avg_logps, rewards, beta_pi, margin):
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", arXiv:2405.14734), no reference model: s = log pi_theta(y | x) / |y|, gamma = margin,

        mean over pairs with r_w > r_l of  -log sigmoid(beta_pi (s_w - s_l) - gamma).

    At K = 2 it is the SimPO authors' `simpo_loss` (sigmoid, no label smoothing) with their
    gamma_beta_ratio = gamma / beta_pi."""
    return _ranked_pair_mean(-F.logsigmoid(beta_pi * _pair_differences(avg_logps) - margin), rewards)


def alignment_loss(policy_logps, ref_logps, rewards, loss_type, beta_pi, beta_r, pref_epsilon=None,
                   lengths=None, margin=None):
    """The `loss_type` objective over G groups of K candidates, averaged over groups.

    policy_logps, ref_logps, rewards, lengths: [G, K]. h = policy_logps - ref_logps; `ref_logps`
    may be None for a reference-free loss (simpo); `lengths` (completion tokens) is needed by the
    per-token losses (ipo, simpo); `margin` is SimPO's gamma (default DEFAULT_SIMPO_MARGIN).
    With log q = log_softmax(beta_pi * h) and log p = target_distribution(rewards, ...):

        exo-*:    KL(q || p)                       dpo-*:    CE(p, q)
        dpo-pl:   Plackett-Luce NLL of r's order   nca-*:    NCA against p
        lipo:     LiPO-lambda                      ipo:      IPO on u = h / |y|
        simpo:    SimPO on log pi_theta / |y|, no reference

    For K = 2, dpo-pref reduces to -logsigmoid(beta_pi (h_w - h_l)) and exo-pref to
    s(z)(logsig(z) - log(1-eps)) + s(-z)(logsig(-z) - log eps), z = beta_pi (h_w - h_l).
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    spec = LOSSES[loss_type]
    if spec.reference and ref_logps is None:
        raise ValueError(f"{loss_type} needs the reference's log-probs (ref_logps)")
    if spec.lengths and lengths is None:
        raise ValueError(f"{loss_type} averages log-probs per token: it needs the completion lengths")
    if loss_type == "simpo":
        margin = DEFAULT_SIMPO_MARGIN if margin is None else margin
        avg_logps = policy_logps / lengths.to(policy_logps.dtype)
        return simpo(avg_logps, rewards.to(avg_logps.dtype), beta_pi, margin).mean()
    h = policy_logps - ref_logps
    rewards = rewards.to(h.dtype)
    if loss_type == "ipo":
        return ipo(h / lengths.to(h.dtype), rewards, beta_pi).mean()
    if loss_type == "dpo-pl":
        return plackett_luce(beta_pi * h, rewards).mean()
    if loss_type == "lipo":
        return lipo(beta_pi * h, rewards).mean()
    log_p = target_distribution(rewards, loss_type, beta_r, pref_epsilon)
    if loss_type.startswith("nca"):
        return nca(beta_pi * h, log_p).mean()
    log_q = F.log_softmax(beta_pi * h, dim=-1)
    return (exo(log_q, log_p) if loss_type.startswith("exo") else dpo(log_q, log_p)).mean()
