"""The listwise baselines of utils.loss (dpo-pl, nca-rw / nca-pref, lipo, ipo, simpo) against
references written from their papers' formulas one element at a time in float64, the pairwise
forms of TRL and of the authors' code at K = 2 (transcribed below from their published
formulas), invariance to the order of the candidates, and the analytic optima that exist."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from utils.loss import LOSS_TYPES, LOSSES, alignment_loss, label_error, win_rate_labels

NEW_LOSSES = ("dpo-pl", "nca-pref", "nca-rw", "lipo", "ipo", "simpo")
TOL = dict(rel=1e-12, abs=1e-12)


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _inputs(seed, g, k, ties=False):
    """policy / reference log-probs, rewards, completion lengths ([G, K], float64) and betas."""
    gen = torch.Generator().manual_seed(seed)
    pol = -5.0 * torch.rand(g, k, generator=gen, dtype=torch.float64) - 1.0
    ref = -5.0 * torch.rand(g, k, generator=gen, dtype=torch.float64) - 1.0
    rewards = (torch.randint(0, 3, (g, k), generator=gen).double() if ties
               else 2.0 * torch.rand(g, k, generator=gen, dtype=torch.float64))  # >= 0: lipo's gains
    lengths = torch.randint(1, 30, (g, k), generator=gen).double()
    beta_pi = 0.05 + 2.0 * torch.rand((), generator=gen, dtype=torch.float64).item()
    beta_r = 0.1 + 3.0 * torch.rand((), generator=gen, dtype=torch.float64).item()
    return pol, ref, rewards, lengths, beta_pi, beta_r


# --------------------------------------------------------------------------------------
# References, one group at a time, from the papers' formulas (python floats)
# --------------------------------------------------------------------------------------
def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _target(r, loss_type, beta_r, eps):
    if loss_type.endswith("-rw"):
        return _softmax([x / beta_r for x in r])
    k, w = len(r), r.index(max(r))
    return [1 - eps if i == w else eps / (k - 1) for i in range(k)]


def ref_dpo_pl(z, r):
    """Plackett-Luce: place the candidates best label first, each chosen by a softmax over the
    ones not yet placed; tied labels (Breslow) share one risk set: every candidate placed no
    earlier than the tie."""
    loss = 0.0
    for i in range(len(z)):
        risk = [z[j] for j in range(len(z)) if r[j] <= r[i]]
        m = max(risk)
        loss -= z[i] - (m + math.log(sum(math.exp(x - m) for x in risk)))
    return loss


def ref_dpo_pl_sequential(z, r):
    """Without ties: the sequential definition, one softmax per placement over what is left."""
    left = sorted(range(len(z)), key=lambda i: -r[i])
    loss = 0.0
    while left:
        q = _softmax([z[j] for j in left])
        loss -= math.log(q[0])
        left = left[1:]
    return loss


def ref_nca(z, p):
    return -sum(pi * _logsig(zi) for pi, zi in zip(p, z)) - sum(_logsig(-zi) for zi in z) / len(z)


def _ranked_pairs(r):
    return [(i, j) for i in range(len(r)) for j in range(len(r)) if r[i] > r[j]]


def ref_lipo_weights(z, r):
    """Delta_ij of LiPO-lambda, from the paper's definitions: ranks from 1 under the score, a
    tie in score to the worse label first, a tie in both shares its ranks' mean of 1/D."""
    k = len(z)
    order = sorted(range(k), key=lambda i: (-z[i], r[i]))
    rank = {c: pos + 1 for pos, c in enumerate(order)}
    inv = [sum(1 / math.log2(1 + rank[j]) for j in range(k) if (z[j], r[j]) == (z[i], r[i]))
           / sum((z[j], r[j]) == (z[i], r[i]) for j in range(k)) for i in range(k)]
    max_dcg = sum((2 ** g - 1) / math.log2(1 + pos) for pos, g in enumerate(sorted(r, reverse=True), start=1))
    gain = [(2 ** x - 1) / max_dcg for x in r]
    return {(i, j): abs(gain[i] - gain[j]) * abs(inv[i] - inv[j]) for i in range(k) for j in range(k)}


def _pair_mean(values):
    return sum(values) / len(values) if values else 0.0


def ref_lipo(z, r):
    if not _ranked_pairs(r):
        return 0.0
    w = ref_lipo_weights(z, r)
    return _pair_mean([-w[i, j] * _logsig(z[i] - z[j]) for i, j in _ranked_pairs(r)])


def ref_ipo(u, r, beta):
    return _pair_mean([(u[i] - u[j] - 1 / (2 * beta)) ** 2 for i, j in _ranked_pairs(r)])


def ref_simpo(s, r, beta, gamma):
    return _pair_mean([-_logsig(beta * (s[i] - s[j]) - gamma) for i, j in _ranked_pairs(r)])


def ref_loss(pol, ref, rewards, lengths, loss_type, beta_pi, beta_r, eps=0.0, margin=0.5):
    """Mean over groups of the per-group reference."""
    out = []
    for pg, rg, r, n in zip(pol.tolist(), ref.tolist(), rewards.tolist(), lengths.tolist()):
        z = [beta_pi * (a - b) for a, b in zip(pg, rg)]
        if loss_type == "dpo-pl":
            out.append(ref_dpo_pl(z, r))
        elif loss_type.startswith("nca"):
            out.append(ref_nca(z, _target(r, loss_type, beta_r, eps)))
        elif loss_type == "lipo":
            out.append(ref_lipo(z, r))
        elif loss_type == "ipo":
            out.append(ref_ipo([(a - b) / m for a, b, m in zip(pg, rg, n)], r, beta_pi))
        else:
            out.append(ref_simpo([a / m for a, m in zip(pg, n)], r, beta_pi, margin))
    return sum(out) / len(out)


def _loss(pol, ref, rewards, lengths, loss_type, beta_pi, beta_r, **kw):
    return alignment_loss(pol, None if loss_type == "simpo" else ref, rewards, loss_type, beta_pi, beta_r,
                          lengths=lengths, **kw)


# --------------------------------------------------------------------------------------
# Values and gradients against the references
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [2, 3, 4, 7])
@pytest.mark.parametrize("loss_type", NEW_LOSSES)
def test_loss_matches_float64_reference(loss_type, k, ties):
    for trial in range(3):
        seed = 100 * k + 10 * trial + NEW_LOSSES.index(loss_type) + 5000 * ties
        pol, ref, rewards, lengths, beta_pi, beta_r = _inputs(seed, 1 + trial * 3, k, ties)
        if loss_type == "nca-pref":  # one winner per group: break ties by a tiny bonus
            rewards = rewards + 1e-3 * torch.arange(k, dtype=torch.float64)
        out = _loss(pol, ref, rewards, lengths, loss_type, beta_pi, beta_r)
        assert out.dim() == 0 and out.dtype == torch.float64
        expected = ref_loss(pol, ref, rewards, lengths, loss_type, beta_pi, beta_r)
        assert out.item() == pytest.approx(expected, **TOL)


@pytest.mark.parametrize("k", [2, 4, 6])
def test_plackett_luce_without_ties_is_the_sequential_likelihood(k):
    for seed in range(5):
        pol, ref, _, lengths, beta_pi, _ = _inputs(seed, 3, k)
        rewards = torch.stack([torch.randperm(k, generator=torch.Generator().manual_seed(seed + g)).double()
                               for g in range(3)])
        expected = sum(ref_dpo_pl_sequential([beta_pi * (a - b) for a, b in zip(pg, rg)], r)
                       for pg, rg, r in zip(pol.tolist(), ref.tolist(), rewards.tolist())) / 3
        assert alignment_loss(pol, ref, rewards, "dpo-pl", beta_pi, 1.0).item() == pytest.approx(expected, **TOL)


@pytest.mark.parametrize("margin", [0.0, 0.3, 1.7])
def test_simpo_margin_enters_as_gamma(margin):
    pol, _, rewards, lengths, beta_pi, _ = _inputs(3, 5, 4)
    out = alignment_loss(pol, None, rewards, "simpo", beta_pi, 1.0, lengths=lengths, margin=margin)
    assert out.item() == pytest.approx(ref_loss(pol, pol, rewards, lengths, "simpo", beta_pi, 1.0, margin=margin),
                                       **TOL)


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3])
def test_nca_pref_smoothing(eps):
    pol, ref, rewards, lengths, beta_pi, beta_r = _inputs(11, 4, 4)
    out = alignment_loss(pol, ref, rewards, "nca-pref", beta_pi, beta_r, pref_epsilon=eps)
    assert out.item() == pytest.approx(ref_loss(pol, ref, rewards, lengths, "nca-pref", beta_pi, beta_r, eps), **TOL)


def _torch_reference(pol, ref, rewards, lengths, loss_type, beta_pi, beta_r):
    """The same references on autograd scalars (for gradients); lipo's weights are constants."""
    total = 0
    for g in range(pol.shape[0]):
        r = rewards[g].tolist()
        h = pol[g] - ref[g]
        z = beta_pi * h
        pairs = _ranked_pairs(r)
        if loss_type == "dpo-pl":
            group = -sum(z[i] - torch.logsumexp(torch.stack([z[j] for j in range(len(r)) if r[j] <= r[i]]), 0)
                         for i in range(len(r)))
        elif loss_type.startswith("nca"):
            p = _target(r, loss_type, beta_r, 0.0)
            group = (-sum(p[i] * F.logsigmoid(z[i]) for i in range(len(r)))
                     - sum(F.logsigmoid(-z[i]) for i in range(len(r))) / len(r))
        elif loss_type == "lipo":
            w = ref_lipo_weights(z.tolist(), r)
            group = sum(-w[i, j] * F.logsigmoid(z[i] - z[j]) for i, j in pairs) / max(1, len(pairs))
        elif loss_type == "ipo":
            u = h / lengths[g]
            group = sum((u[i] - u[j] - 1 / (2 * beta_pi)) ** 2 for i, j in pairs) / max(1, len(pairs))
        else:
            s = pol[g] / lengths[g]
            group = sum(-F.logsigmoid(beta_pi * (s[i] - s[j]) - 0.5) for i, j in pairs) / max(1, len(pairs))
        total = total + group
    return total / pol.shape[0]


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("loss_type", NEW_LOSSES)
def test_gradient_matches_reference_autograd(loss_type, k):
    pol, ref, rewards, lengths, beta_pi, beta_r = _inputs(700 + k, 4, k)
    grads = []
    for fn in (_loss, _torch_reference):
        a, b = pol.clone().requires_grad_(True), ref.clone().requires_grad_(True)
        fn(a, b, rewards, lengths, loss_type, beta_pi, beta_r).backward()
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-12)
    if loss_type != "simpo":
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)
    assert grads[0][0].abs().sum() > 0


@pytest.mark.parametrize("loss_type", NEW_LOSSES)
def test_gradcheck(loss_type):
    pol, ref, rewards, lengths, beta_pi, beta_r = _inputs(31, 3, 4)
    # lipo's weights change with the ranks only: away from score ties they are constant nearby
    fn = (lambda a: _loss(a, ref, rewards, lengths, loss_type, beta_pi, beta_r))
    assert torch.autograd.gradcheck(fn, (pol.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------
# K = 2: the pairwise forms of TRL and the authors' code
# --------------------------------------------------------------------------------------
def _pairs(seed, g=16):
    """K = 2 pref groups (chosen first, rewards (1, 0)) with completion lengths."""
    pol, ref, _, lengths, beta_pi, beta_r = _inputs(seed, g, 2)
    return pol, ref, torch.tensor([[1.0, 0.0]] * g, dtype=torch.float64), lengths, beta_pi, beta_r


def trl_nca_pair(pc, pr, rc, rr, beta):
    """TRL DPOTrainer, loss_type "nca_pair"."""
    chosen, rejected = (pc - rc) * beta, (pr - rr) * beta
    return (-F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)).mean()


def trl_ipo(pc, pr, rc, rr, beta, len_c, len_r):
    """TRL DPOTrainer, loss_type "ipo": log-probs averaged over completion tokens, then
    (logratios - ref_logratios - 1 / (2 beta))^2."""
    pc, rc, pr, rr = pc / len_c, rc / len_c, pr / len_r, rr / len_r
    return (((pc - pr) - (rc - rr)) - 1 / (2 * beta)).pow(2).mean()


def simpo_authors_loss(pc, pr, beta, gamma_beta_ratio, len_c, len_r):
    """The SimPO authors' simpo_loss (sigmoid, label_smoothing 0) on average log-probs."""
    logits = (pc / len_c - pr / len_r) - gamma_beta_ratio
    return (-F.logsigmoid(beta * logits)).mean()


@pytest.mark.parametrize("seed", range(4))
def test_k2_reductions(seed):
    pol, ref, rewards, lengths, beta_pi, beta_r = _pairs(seed)
    pc, pr, rc, rr, lc, lr = pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], lengths[:, 0], lengths[:, 1]
    loss = lambda t, **kw: alignment_loss(pol, ref, rewards, t, beta_pi, beta_r, lengths=lengths, **kw).item()
    assert loss("dpo-pl") == pytest.approx(loss("dpo-pref", pref_epsilon=0.0), **TOL)
    assert loss("nca-pref") == pytest.approx(trl_nca_pair(pc, pr, rc, rr, beta_pi).item(), **TOL)
    assert loss("ipo") == pytest.approx(trl_ipo(pc, pr, rc, rr, beta_pi, lc, lr).item(), **TOL)
    gamma = 0.8
    assert (alignment_loss(pol, None, rewards, "simpo", beta_pi, beta_r, lengths=lengths, margin=gamma).item()
            == pytest.approx(simpo_authors_loss(pc, pr, beta_pi, gamma / beta_pi, lc, lr).item(), **TOL))
    # LiPO-lambda on one pair is DPO weighted by |G_w - G_l| |1/D_1 - 1/D_2| = 1 - 1/log2(3)
    assert loss("lipo") == pytest.approx((1 - 1 / math.log2(3)) * loss("dpo-pref"), **TOL)


def nca_authors_k4(policy, reference, scores, beta, temperature_alpha):
    """The NCA authors' K = 4 reward-data loss (their trainer's nca_loss, loss_type "NCA"), with
    the +0.01 their code adds to the first candidate's score left out: it only breaks ties."""
    model_rewards = (policy - reference) * beta
    softlabel = (scores / temperature_alpha).softmax(dim=-1)
    return -F.logsigmoid(-model_rewards).mean() - (softlabel * F.logsigmoid(model_rewards)).sum(dim=-1).mean()


def test_nca_rw_is_the_authors_k4_loss():
    pol, ref, rewards, _, beta_pi, beta_r = _inputs(5, 8, 4)
    expected = nca_authors_k4(pol, ref, rewards, beta_pi, beta_r)
    assert alignment_loss(pol, ref, rewards, "nca-rw", beta_pi, beta_r).item() == pytest.approx(expected.item(), **TOL)


# --------------------------------------------------------------------------------------
# The order of the candidates does not matter
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("loss_type", NEW_LOSSES)
def test_invariant_to_the_order_of_the_candidates(loss_type, ties):
    k = 5
    pol, ref, rewards, lengths, beta_pi, beta_r = _inputs(77, 6, k, ties)
    if loss_type == "nca-pref":
        rewards = rewards + 1e-3 * torch.arange(k, dtype=torch.float64)
    if loss_type == "lipo":  # ties in score too, where the rank's tie rule matters
        pol = ref.clone()
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(3))
    out, grad = [], []
    for p in (torch.arange(k), perm):
        a = pol[:, p].clone().requires_grad_(True)
        value = _loss(a, ref[:, p], rewards[:, p], lengths[:, p], loss_type, beta_pi, beta_r)
        value.backward()
        out.append(value.item())
        grad.append(a.grad)
    assert out[1] == pytest.approx(out[0], **TOL)
    torch.testing.assert_close(grad[1], grad[0][:, perm], rtol=1e-10, atol=1e-13)


def test_lipo_weights_are_not_zero_at_the_start():
    """At step 0 h = 0 for every candidate: ranks follow the tie rule, and the loss has a gradient."""
    _, ref, rewards, _, beta_pi, _ = _inputs(9, 4, 4)
    pol = ref.clone().requires_grad_(True)
    alignment_loss(pol, ref, rewards, "lipo", beta_pi, 1.0).backward()
    assert pol.grad.abs().sum() > 0
    # and it moves the better-labelled candidates up
    best = rewards.argmax(-1, keepdim=True)
    assert (pol.grad.gather(-1, best) < 0).all()


# --------------------------------------------------------------------------------------
# Analytic optima
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,eps", [("nca-rw", None), ("nca-pref", 0.1), ("nca-pref", 0.4)])
@pytest.mark.parametrize("k", [2, 4, 6])
def test_nca_optimum_is_beta_h_equal_log_k_p(loss_type, eps, k):
    """d/ds [-p log sig(s) - log sig(-s) / K] = 0 at s = log(K p): the gradient vanishes there and
    every perturbation raises the loss."""
    _, ref, rewards, _, beta_pi, beta_r = _inputs(20 + k, 3, k)
    p = torch.tensor([_target(r, loss_type, beta_r, eps) for r in rewards.tolist()], dtype=torch.float64)
    pol = (ref + torch.log(k * p) / beta_pi).requires_grad_(True)
    at_opt = alignment_loss(pol, ref, rewards, loss_type, beta_pi, beta_r, pref_epsilon=eps)
    at_opt.backward()
    assert pol.grad.abs().max().item() < 1e-12
    gen = torch.Generator().manual_seed(k)
    for _ in range(20):
        moved = pol.detach() + 0.05 * torch.randn(pol.shape, generator=gen, dtype=torch.float64)
        assert alignment_loss(moved, ref, rewards, loss_type, beta_pi, beta_r, pref_epsilon=eps) > at_opt


def test_ipo_optimum():
    """K = 2: zero loss at u_w - u_l = 1/(2 beta); K = 3 with r_1 > r_2 > r_3: the least-squares
    optimum puts both neighbouring gaps at (2/3) / (2 beta), where the gradient vanishes."""
    beta = 0.7
    ref = torch.tensor([[-3.0, -4.0]], dtype=torch.float64)
    lengths = torch.tensor([[5.0, 9.0]], dtype=torch.float64)
    u = torch.tensor([[0.2, 0.2 - 1 / (2 * beta)]], dtype=torch.float64)
    out = alignment_loss(ref + u * lengths, ref, torch.tensor([[1.0, 0.0]]), "ipo", beta, 1.0, lengths=lengths)
    assert out.item() == pytest.approx(0.0, abs=1e-14)

    gap = (2 / 3) / (2 * beta)
    ref3 = torch.tensor([[-3.0, -4.0, -2.0]], dtype=torch.float64)
    lengths3 = torch.tensor([[4.0, 7.0, 2.0]], dtype=torch.float64)
    u3 = torch.tensor([[0.1 + 2 * gap, 0.1 + gap, 0.1]], dtype=torch.float64)
    pol = (ref3 + u3 * lengths3).requires_grad_(True)
    alignment_loss(pol, ref3, torch.tensor([[2.0, 1.0, 0.0]]), "ipo", beta, 1.0, lengths=lengths3).backward()
    assert pol.grad.abs().max().item() < 1e-12


# --------------------------------------------------------------------------------------
# What the entry point refuses
# --------------------------------------------------------------------------------------
def test_every_loss_type_is_declared():
    assert set(NEW_LOSSES) <= set(LOSS_TYPES) and set(LOSSES) == set(LOSS_TYPES)
    assert [t for t in LOSS_TYPES if not LOSSES[t].reference] == ["simpo"]
    assert {t for t in LOSS_TYPES if LOSSES[t].lengths} == {"ipo", "simpo"}


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if LOSSES[t].reference])
def test_a_reference_loss_without_reference_logps_raises(loss_type):
    pol, _, rewards, lengths, beta_pi, beta_r = _inputs(1, 2, 2)
    with pytest.raises(ValueError, match="reference"):
        alignment_loss(pol, None, rewards, loss_type, beta_pi, beta_r, lengths=lengths)


@pytest.mark.parametrize("loss_type", ["ipo", "simpo"])
def test_a_per_token_loss_without_lengths_raises(loss_type):
    pol, ref, rewards, _, beta_pi, beta_r = _inputs(1, 2, 2)
    with pytest.raises(ValueError, match="lengths"):
        alignment_loss(pol, ref, rewards, loss_type, beta_pi, beta_r)


def test_lipo_refuses_groups_whose_ideal_dcg_is_not_positive():
    pol, ref, _, _, beta_pi, _ = _inputs(1, 2, 3)
    rewards = torch.tensor([[1.0, 0.5, 0.0], [-1.0, -2.0, -3.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="ideal DCG"):
        alignment_loss(pol, ref, rewards, "lipo", beta_pi, 1.0)


def test_groups_without_a_ranked_pair_contribute_zero():
    pol, ref, _, lengths, beta_pi, beta_r = _inputs(2, 2, 3)
    tied = torch.ones(2, 3, dtype=torch.float64)
    for loss_type in ("lipo", "ipo", "simpo"):
        a = pol.clone().requires_grad_(True)
        out = _loss(a, ref, tied, lengths, loss_type, beta_pi, beta_r)
        out.backward()
        assert out.item() == 0.0 and a.grad.abs().sum() == 0


def test_float32_inputs_stay_float32():
    pol, ref, rewards, lengths, beta_pi, beta_r = (x.float() if torch.is_tensor(x) else x for x in _inputs(4, 3, 4))
    for loss_type in NEW_LOSSES:
        assert _loss(pol, ref, rewards, lengths, loss_type, beta_pi, beta_r).dtype == torch.float32


def test_every_order_of_three_candidates_gives_one_value():
    """dpo-pl, nca, lipo, ipo and simpo are symmetric under all 3! orders at once."""
    pol, ref, rewards, lengths, beta_pi, beta_r = _inputs(8, 2, 3)
    for loss_type in NEW_LOSSES:
        values = {round(_loss(pol[:, list(p)], ref[:, list(p)], rewards[:, list(p)], lengths[:, list(p)], loss_type,
                              beta_pi, beta_r).item(), 12) for p in itertools.permutations(range(3))}
        assert len(values) == 1, (loss_type, values)


def test_win_rate_labels_are_mean_bradley_terry_win_probabilities():
    """psi_i = mean over j != i of sigmoid(r_i - r_j): in (0, 1), in r's order, and always usable
    as LiPO's gains, where the raw rewards (negative here) are refused."""
    rewards = torch.tensor([[-3.0, -1.0, -2.5, -7.0], [2.0, 2.0, 0.0, -1.0]], dtype=torch.float64)
    psi = win_rate_labels(rewards)
    for g, r in enumerate(rewards.tolist()):
        for i in range(4):
            expected = sum(1 / (1 + math.exp(r[j] - r[i])) for j in range(4) if j != i) / 3
            assert psi[g, i].item() == pytest.approx(expected, **TOL)
        assert sorted(range(4), key=lambda i: r[i]) == sorted(range(4), key=lambda i: psi[g, i].item())
    assert ((psi > 0) & (psi < 1)).all() and psi.mean(-1).tolist() == pytest.approx([0.5, 0.5], **TOL)
    assert label_error("lipo", rewards[0].tolist()) and label_error("lipo", psi[0].tolist()) is None
    pol, ref, _, _, beta_pi, _ = _inputs(3, 2, 4)
    assert torch.isfinite(alignment_loss(pol, ref, psi, "lipo", beta_pi, 1.0))
