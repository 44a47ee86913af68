"""Tests for utils.loss (EXO / DPO alignment losses) and utils.logprobs' chunked sequence log-probabilities.

Every reference below is written from the mathematical contract only (plain python floats /
explicit per-element formulas), not from the implementation's code.
"""
import itertools
import math

import numpy as np
import pytest
import torch

import utils.logprobs as logprobs_mod
from utils.logprobs import sequence_logprobs
from utils.loss import (
    LOSS_TYPES,
    alignment_loss,
    resolve_pref_epsilon,
    target_distribution,
)

F64_TOL = dict(rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# Independent float64 references (python math, one element at a time)
# --------------------------------------------------------------------------------------
def _ref_log_softmax(xs):
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def _ref_eps(loss_type, pref_epsilon):
    if pref_epsilon is None:
        return 1e-3 if loss_type.startswith("exo") else 0.0
    return float(pref_epsilon)


def _ref_target(rewards, loss_type, beta_r, pref_epsilon):
    """Label distribution p over one group, as a list of python floats."""
    k = len(rewards)
    if loss_type.endswith("-rw"):
        return [math.exp(v) for v in _ref_log_softmax([r / beta_r for r in rewards])]
    eps = _ref_eps(loss_type, pref_epsilon)
    best = max(rewards)
    winner = next(i for i, r in enumerate(rewards) if r == best)  # first on ties
    return [1.0 - eps if i == winner else eps / (k - 1) for i in range(k)]


def _ref_group_loss(pol, ref, rewards, loss_type, beta_pi, beta_r, pref_epsilon):
    """Loss of a single group of K candidates, in python floats."""
    h = [a - b for a, b in zip(pol, ref)]
    log_q = _ref_log_softmax([beta_pi * x for x in h])
    p = _ref_target(rewards, loss_type, beta_r, pref_epsilon)
    if loss_type.startswith("exo"):
        return sum(math.exp(lq) * (lq - math.log(pi)) for lq, pi in zip(log_q, p))
    return -sum(pi * lq for lq, pi in zip(log_q, p) if pi > 0.0)


def _ref_loss(pol, ref, rewards, loss_type, beta_pi, beta_r, pref_epsilon=None):
    """Mean over groups of the per-group loss; inputs are [G, K] tensors or arrays."""
    pol, ref, rewards = (np.asarray(torch.as_tensor(x).double()).tolist() for x in (pol, ref, rewards))
    groups = [
        _ref_group_loss(a, b, c, loss_type, beta_pi, beta_r, pref_epsilon)
        for a, b, c in zip(pol, ref, rewards)
    ]
    return sum(groups) / len(groups)


def _ref_loss_torch(pol, ref, rewards, loss_type, beta_pi, beta_r, pref_epsilon=None):
    """Same loss written with elementary torch ops (per group, per candidate) for autograd."""
    rewards_list = rewards.double().tolist()
    total = 0.0
    for g in range(pol.shape[0]):
        z = [beta_pi * (pol[g, i] - ref[g, i]) for i in range(pol.shape[1])]
        m = max(float(v.detach()) for v in z)
        denom = sum(torch.exp(v - m) for v in z)
        log_q = [v - m - torch.log(denom) for v in z]
        p = _ref_target(rewards_list[g], loss_type, beta_r, pref_epsilon)
        if loss_type.startswith("exo"):
            total = total + sum(torch.exp(lq) * (lq - math.log(pi)) for lq, pi in zip(log_q, p))
        else:
            total = total - sum(pi * lq for lq, pi in zip(log_q, p) if pi > 0.0)
    return total / pol.shape[0]


def _random_inputs(seed, g, k, ties=False):
    gen = torch.Generator().manual_seed(seed)
    pol = -5.0 * torch.rand(g, k, generator=gen, dtype=torch.float64) - 1.0
    ref = -5.0 * torch.rand(g, k, generator=gen, dtype=torch.float64) - 1.0
    if ties:
        rewards = torch.randint(0, 3, (g, k), generator=gen).double()
    else:
        rewards = 3.0 * torch.randn(g, k, generator=gen, dtype=torch.float64)
    beta_pi = 0.05 + 2.0 * torch.rand((), generator=gen, dtype=torch.float64).item()
    beta_r = 0.1 + 3.0 * torch.rand((), generator=gen, dtype=torch.float64).item()
    return pol, ref, rewards, beta_pi, beta_r


_LOSS_CASES = (
    [("exo-rw", None), ("dpo-rw", None)]
    + [("exo-pref", eps) for eps in (None, 1e-3, 0.05, 0.3)]
    + [("dpo-pref", eps) for eps in (None, 0.0, 0.1)]
)


# --------------------------------------------------------------------------------------
# 1. Loss values against the float64 reference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [2, 3, 4, 8])
@pytest.mark.parametrize("loss_type,pref_epsilon", _LOSS_CASES)
def test_loss_matches_float64_reference(loss_type, pref_epsilon, k, ties):
    """alignment_loss equals the per-element float64 reference for every loss type and K."""
    for trial in range(3):
        seed = 1000 * k + 17 * trial + 7 * LOSS_TYPES.index(loss_type) + int(ties)
        g = int(torch.randint(1, 9, (), generator=torch.Generator().manual_seed(seed)))
        pol, ref, rewards, beta_pi, beta_r = _random_inputs(seed, g, k, ties=ties)
        out = alignment_loss(pol, ref, rewards, loss_type, beta_pi, beta_r, pref_epsilon)
        assert out.dim() == 0 and out.dtype == torch.float64
        expected = _ref_loss(pol, ref, rewards, loss_type, beta_pi, beta_r, pref_epsilon)
        assert math.isfinite(expected)
        assert out.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("loss_type,pref_epsilon", _LOSS_CASES)
def test_target_distribution_matches_reference(loss_type, pref_epsilon, k):
    """target_distribution returns log p with p softmax(r/beta_r) or the eps-smoothed one-hot."""
    pol, ref, rewards, beta_pi, beta_r = _random_inputs(31 * k, 6, k, ties=True)
    log_p = target_distribution(rewards, loss_type, beta_r, pref_epsilon)
    assert log_p.shape == rewards.shape
    for row, r in zip(log_p.tolist(), rewards.tolist()):
        p_ref = _ref_target(r, loss_type, beta_r, pref_epsilon)
        for lp, pr in zip(row, p_ref):
            if pr == 0.0:
                assert lp == -math.inf
            else:
                assert lp == pytest.approx(math.log(pr), rel=1e-12, abs=1e-12)
        assert sum(math.exp(v) for v in row) == pytest.approx(1.0, abs=1e-12)


def test_pref_winner_is_first_argmax_on_ties():
    """With tied top rewards the first maximal candidate gets 1 - eps."""
    rewards = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    p = target_distribution(rewards, "exo-pref", 1.0, 0.3).exp()
    expected = torch.tensor([[0.1, 0.7, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(p, expected, **F64_TOL)


def test_unknown_loss_type_raises():
    """An unknown loss_type raises ValueError."""
    pol, ref, rewards, _, _ = _random_inputs(0, 2, 3)
    with pytest.raises(ValueError):
        alignment_loss(pol, ref, rewards, "ipo", 1.0, 1.0)
    with pytest.raises(ValueError):
        alignment_loss(pol, ref, rewards, "exo", 1.0, 1.0)


def test_exo_pref_with_zero_epsilon_raises():
    """exo-pref with pref_epsilon=0 (infinite reverse KL) raises ValueError."""
    pol, ref, rewards, _, _ = _random_inputs(1, 3, 4)
    with pytest.raises(ValueError):
        alignment_loss(pol, ref, rewards, "exo-pref", 1.0, 1.0, pref_epsilon=0.0)


# --------------------------------------------------------------------------------------
# 2. K = 2 closed forms
# --------------------------------------------------------------------------------------
def _k2_inputs(seed, g=16):
    gen = torch.Generator().manual_seed(seed)
    pol = -10.0 * torch.rand(g, 2, generator=gen, dtype=torch.float64)
    ref = -10.0 * torch.rand(g, 2, generator=gen, dtype=torch.float64)
    rewards = torch.randn(g, 2, generator=gen, dtype=torch.float64)
    return pol, ref, rewards


@pytest.mark.parametrize("beta_pi", [0.1, 0.5, 2.0])
def test_dpo_pref_k2_is_minus_logsigmoid(beta_pi):
    """dpo-pref with K=2 (eps=0) equals mean -log sigmoid(beta_pi (h_w - h_l))."""
    pol, ref, rewards = _k2_inputs(int(beta_pi * 100))
    out = alignment_loss(pol, ref, rewards, "dpo-pref", beta_pi, 0.7)
    vals = []
    for (pw, pl), (rw, rl), (r0, r1) in zip(pol.tolist(), ref.tolist(), rewards.tolist()):
        if r1 > r0:  # candidate 1 wins; ties go to candidate 0
            pw, pl, rw, rl = pl, pw, rl, rw
        z = beta_pi * ((pw - rw) - (pl - rl))
        vals.append(math.log1p(math.exp(-z)))  # -log sigmoid(z)
    assert out.item() == pytest.approx(sum(vals) / len(vals), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("eps", [1e-3, 0.1])
@pytest.mark.parametrize("beta_pi", [0.1, 0.5, 2.0])
def test_exo_pref_k2_closed_form(eps, beta_pi):
    """exo-pref with K=2 equals s(z)(logsig(z)-log(1-eps)) + s(-z)(logsig(-z)-log eps)."""
    pol, ref, rewards = _k2_inputs(int(beta_pi * 100) + 1)
    out = alignment_loss(pol, ref, rewards, "exo-pref", beta_pi, 0.7, pref_epsilon=eps)
    vals = []
    for (pw, pl), (rw, rl), (r0, r1) in zip(pol.tolist(), ref.tolist(), rewards.tolist()):
        if r1 > r0:
            pw, pl, rw, rl = pl, pw, rl, rw
        z = beta_pi * ((pw - rw) - (pl - rl))
        s_pos, s_neg = 1.0 / (1.0 + math.exp(-z)), 1.0 / (1.0 + math.exp(z))
        vals.append(
            s_pos * (math.log(s_pos) - math.log(1.0 - eps)) + s_neg * (math.log(s_neg) - math.log(eps))
        )
    assert out.item() == pytest.approx(sum(vals) / len(vals), rel=1e-12, abs=1e-12)


# --------------------------------------------------------------------------------------
# 3. Gradients
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("loss_type,pref_epsilon", _LOSS_CASES)
def test_grad_matches_reference_autograd(loss_type, pref_epsilon, k):
    """d loss / d policy_logps (and d/d ref_logps) match autograd through the torch reference."""
    pol, ref, rewards, beta_pi, beta_r = _random_inputs(500 + k, 4, k, ties=True)
    pol_a = pol.clone().requires_grad_(True)
    ref_a = ref.clone().requires_grad_(True)
    out = alignment_loss(pol_a, ref_a, rewards, loss_type, beta_pi, beta_r, pref_epsilon)
    g_pol, g_ref = torch.autograd.grad(out, (pol_a, ref_a))

    pol_b = pol.clone().requires_grad_(True)
    ref_b = ref.clone().requires_grad_(True)
    expected = _ref_loss_torch(pol_b, ref_b, rewards, loss_type, beta_pi, beta_r, pref_epsilon)
    e_pol, e_ref = torch.autograd.grad(expected, (pol_b, ref_b))

    assert out.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(g_pol, e_pol, **F64_TOL)
    torch.testing.assert_close(g_ref, e_ref, **F64_TOL)
    torch.testing.assert_close(g_ref, -g_pol, **F64_TOL)


@pytest.mark.parametrize("loss_type,pref_epsilon", _LOSS_CASES)
def test_alignment_loss_gradcheck(loss_type, pref_epsilon):
    """torch.autograd.gradcheck passes on alignment_loss w.r.t. policy and reference logps."""
    pol, ref, rewards, beta_pi, beta_r = _random_inputs(77, 3, 4)
    pol.requires_grad_(True)
    ref.requires_grad_(True)
    fn = lambda a, b: alignment_loss(a, b, rewards, loss_type, beta_pi, beta_r, pref_epsilon)
    assert torch.autograd.gradcheck(fn, (pol, ref), eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------------------
# 4. Analytic facts: optimum at q = p
# --------------------------------------------------------------------------------------
_OPT_CASES = [("exo-rw", None), ("exo-pref", 1e-3), ("exo-pref", 0.2), ("dpo-rw", None), ("dpo-pref", 0.1)]


def _h_at_optimum(rewards, loss_type, beta_pi, beta_r, eps, gen):
    """h = log p / beta_pi + per-group constant, so that softmax(beta_pi h) = p."""
    rows = []
    for r in rewards.tolist():
        p = _ref_target(r, loss_type, beta_r, eps)
        c = 10.0 * torch.randn((), generator=gen, dtype=torch.float64).item()
        rows.append([math.log(pi) / beta_pi + c for pi in p])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("k", [2, 3, 6])
@pytest.mark.parametrize("loss_type,pref_epsilon", _OPT_CASES)
def test_loss_minimum_at_q_equals_p(loss_type, pref_epsilon, k):
    """EXO is >= 0 and 0 at q = p; DPO's minimum is H(p), reached at q = p; zero grad there."""
    pol0, ref, rewards, beta_pi, beta_r = _random_inputs(900 + k, 5, k)
    gen = torch.Generator().manual_seed(k)
    h_star = _h_at_optimum(rewards, loss_type, beta_pi, beta_r, pref_epsilon, gen)
    pol_star = (ref + h_star).requires_grad_(True)
    at_opt = alignment_loss(pol_star, ref, rewards, loss_type, beta_pi, beta_r, pref_epsilon)
    (grad,) = torch.autograd.grad(at_opt, pol_star)

    if loss_type.startswith("exo"):
        optimum = 0.0
    else:  # mean entropy of p
        ent = [
            -sum(pi * math.log(pi) for pi in _ref_target(r, loss_type, beta_r, pref_epsilon) if pi > 0)
            for r in rewards.tolist()
        ]
        optimum = sum(ent) / len(ent)
    assert at_opt.item() == pytest.approx(optimum, abs=1e-12)
    assert grad.abs().max().item() < 1e-12

    # Any other h (random, or the optimum perturbed) gives a strictly larger loss.
    for trial in range(20):
        scale = 10.0 ** (-3 + trial % 4)
        noise = scale * torch.randn(pol0.shape, generator=gen, dtype=torch.float64)
        for pol in (pol0 + noise, pol_star.detach() + noise):
            val = alignment_loss(pol, ref, rewards, loss_type, beta_pi, beta_r, pref_epsilon).item()
            assert val > optimum
            assert val >= 0.0


def test_exo_nonnegative_on_random_inputs():
    """EXO loss (a KL) is non-negative per group on many random inputs."""
    for seed in range(50):
        for loss_type, eps in [("exo-rw", None), ("exo-pref", None), ("exo-pref", 0.4)]:
            pol, ref, rewards, beta_pi, beta_r = _random_inputs(seed, 1, 2 + seed % 7)
            assert alignment_loss(pol, ref, rewards, loss_type, beta_pi, beta_r, eps).item() >= 0.0


# --------------------------------------------------------------------------------------
# 5. sequence_logprobs
# --------------------------------------------------------------------------------------
def _seq_inputs(seed, n=3, t=9, v=11, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(n, t, v, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, v, (n, t), generator=gen)
    mask = (torch.rand(n, t, generator=gen) < 0.6).to(torch.float64)
    mask[:, 0] = 1.0  # position 0 has no prediction and must be ignored by the shift
    mask[0, -1] = 1.0  # the last label is predicted by the second-to-last logits
    return logits, labels, mask


def _naive_loop(logits, labels, mask, temperature):
    """Per-element python reference: sum_{t>=1} mask_t * log softmax(logits_{t-1}/tau)[labels_t]."""
    lg, lb, mk = logits.double().tolist(), labels.tolist(), mask.double().tolist()
    out = []
    for n in range(len(lg)):
        total = 0.0
        for t in range(1, len(lb[n])):
            if mk[n][t] == 0.0:
                continue
            logp = _ref_log_softmax([x / temperature for x in lg[n][t - 1]])
            total += mk[n][t] * logp[lb[n][t]]
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def _naive_torch(logits, labels, mask, temperature):
    """Full-vocabulary log_softmax + gather in the logits' own dtype (differentiable)."""
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    token_logps = logp.gather(-1, labels[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask[:, 1:].to(token_logps.dtype)).sum(-1)


@pytest.mark.parametrize("chunk_steps", [None, 1, 2, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_matches_naive(monkeypatch, temperature, chunk_steps):
    """sequence_logprobs equals the shifted log_softmax+gather reference, single- and multi-chunk."""
    n, t, v = 3, 9, 11
    logits, labels, mask = _seq_inputs(int(temperature * 10) + (chunk_steps or 0), n, t, v)
    if chunk_steps is not None:
        monkeypatch.setattr(logprobs_mod, "_TIME_CHUNK_ELEMENTS", v * n * chunk_steps)
        mask[:, 3:5] = 0.0  # with 2 steps per chunk, the chunk predicting labels 3..4 is empty
    out = sequence_logprobs(logits, labels, mask, temperature=temperature)
    assert out.shape == (n,) and out.dtype == torch.float64
    torch.testing.assert_close(out, _naive_loop(logits, labels, mask, temperature), **F64_TOL)


@pytest.mark.parametrize("chunk_steps", [None, 2])
def test_sequence_logprobs_ignores_masked_positions(monkeypatch, chunk_steps):
    """Labels and logits at masked-out positions (and at position 0's label) do not matter."""
    n, t, v = 3, 9, 11
    if chunk_steps is not None:
        monkeypatch.setattr(logprobs_mod, "_TIME_CHUNK_ELEMENTS", v * n * chunk_steps)
    logits, labels, mask = _seq_inputs(3, n, t, v)
    base = sequence_logprobs(logits, labels, mask)
    gen = torch.Generator().manual_seed(4)
    labels2, logits2 = labels.clone(), logits.clone()
    off = mask == 0
    labels2[off] = torch.randint(0, v, (int(off.sum()),), generator=gen)
    labels2[:, 0] = (labels[:, 0] + 1) % v
    # logits at t-1 only feed label t: scramble those whose next label is masked, and the last step
    off_prev = torch.zeros_like(off)
    off_prev[:, :-1] = off[:, 1:]
    off_prev[:, -1] = True
    logits2[off_prev] = 100.0 * torch.randn(int(off_prev.sum()), v, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(sequence_logprobs(logits2, labels2, mask), base, **F64_TOL)
    # an all-zero mask gives exactly zero
    zero = sequence_logprobs(logits, labels, torch.zeros_like(mask))
    assert torch.equal(zero, torch.zeros(n, dtype=torch.float64))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float32])
def test_sequence_logprobs_mask_dtypes(mask_dtype):
    """A bool / integer / float32 loss mask gives the same result as the float64 one."""
    logits, labels, mask = _seq_inputs(5)
    out = sequence_logprobs(logits, labels, mask.to(mask_dtype))
    torch.testing.assert_close(out, _naive_loop(logits, labels, mask, 1.0), **F64_TOL)


@pytest.mark.parametrize("overwrite_logits", [False, True])
@pytest.mark.parametrize("chunk_steps", [None, 1, 2, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_grad_matches_naive(monkeypatch, temperature, chunk_steps, overwrite_logits):
    """The custom backward equals autograd through the naive float64 log_softmax+gather, also
    when it builds the gradient inside the logits (positions it skips must come out 0)."""
    n, t, v = 3, 9, 11
    logits, labels, mask = _seq_inputs(40 + (chunk_steps or 0), n, t, v)
    if chunk_steps is not None:
        monkeypatch.setattr(logprobs_mod, "_TIME_CHUNK_ELEMENTS", v * n * chunk_steps)
        mask[:, 3:5] = 0.0
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    a = logits.clone().requires_grad_(True)
    # a fresh non-leaf, as a model's output is: only those may be overwritten
    out = sequence_logprobs(a * 1.0, labels, mask, temperature, overwrite_logits=overwrite_logits)
    (g_impl,) = torch.autograd.grad((out * upstream).sum(), a)
    b = logits.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((_naive_torch(b, labels, mask, temperature) * upstream).sum(), b)

    assert g_impl.dtype == torch.float64 and g_impl.shape == logits.shape
    torch.testing.assert_close(g_impl, g_ref, **F64_TOL)
    assert torch.all(g_impl[:, -1] == 0)  # the last position predicts nothing


@pytest.mark.parametrize("chunk_steps", [None, 1, 2])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_gradcheck(monkeypatch, temperature, chunk_steps):
    """torch.autograd.gradcheck passes on a tiny float64 sequence_logprobs case."""
    n, t, v = 2, 6, 5
    if chunk_steps is not None:
        monkeypatch.setattr(logprobs_mod, "_TIME_CHUNK_ELEMENTS", v * n * chunk_steps)
    logits, labels, mask = _seq_inputs(60, n, t, v)
    mask[:, 2:4] = 0.0
    logits.requires_grad_(True)
    fn = lambda x: sequence_logprobs(x, labels, mask, temperature)
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_overwriting_logits_that_another_op_saved_fails_loudly():
    """exp saves its output for its own backward: overwriting it must raise, never corrupt."""
    logits, labels, mask = _seq_inputs(50)
    x = logits.clone().requires_grad_(True)
    out = sequence_logprobs(torch.exp(x), labels, mask, overwrite_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_sequence_logprobs_float32_dtype():
    """float32 logits give a float32 result matching the float64 reference to float32 precision."""
    logits, labels, mask = _seq_inputs(70, dtype=torch.float32)
    out = sequence_logprobs(logits, labels, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _naive_loop(logits, labels, mask, 1.0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk_steps", [None, 2])
def test_sequence_logprobs_bf16(monkeypatch, chunk_steps):
    """bf16 logits give a float32 result (and a bf16 gradient) close to the float32 naive one."""
    n, t, v = 3, 9, 11
    if chunk_steps is not None:
        monkeypatch.setattr(logprobs_mod, "_TIME_CHUNK_ELEMENTS", v * n * chunk_steps)
    logits64, labels, mask = _seq_inputs(80, n, t, v)
    logits32 = logits64.float()
    logits_bf16 = logits32.bfloat16().requires_grad_(True)
    out = sequence_logprobs(logits_bf16, labels, mask, temperature=0.7)
    assert out.dtype == torch.float32
    # same bf16-rounded values reduced in float32: tight agreement
    same_vals = _naive_torch(logits_bf16.detach().float(), labels, mask, 0.7)
    torch.testing.assert_close(out, same_vals, rtol=1e-5, atol=1e-4)
    # against the unrounded float32 logits: only bf16 rounding (rel ~4e-3 per logit) separates them
    torch.testing.assert_close(out, _naive_torch(logits32, labels, mask, 0.7), rtol=0.05, atol=0.5)

    (g,) = torch.autograd.grad(out.sum(), logits_bf16)
    assert g.dtype == torch.bfloat16 and g.shape == logits_bf16.shape
    b = logits_bf16.detach().float().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(_naive_torch(b, labels, mask, 0.7).sum(), b)
    torch.testing.assert_close(g.float(), g_ref, rtol=2e-2, atol=2e-2)
    # built inside the bf16 logits instead: the same float32 chunks, the same bf16 rounding
    x = logits_bf16.detach().clone().requires_grad_(True)
    out_ow = sequence_logprobs(x * 1.0, labels, mask, temperature=0.7, overwrite_logits=True)
    (g_ow,) = torch.autograd.grad(out_ow.sum(), x)
    assert torch.equal(g_ow, g)


def test_model_sequence_logprobs_grad_matches_full_log_softmax(tiny_model):
    """Through a real model (float64, shared prompt prefix trimmed with logits_to_keep, logits
    overwritten by their gradient): weight gradients equal those of a full log_softmax."""
    from transformers import AutoModelForCausalLM

    from utils.logprobs import model_sequence_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=gen)
    loss_mask = torch.zeros(3, 12)
    loss_mask[0, 5:] = loss_mask[1, 7:11] = loss_mask[2, 4:9] = 1
    attention = torch.ones(3, 12, dtype=torch.long)
    attention[1, 11:] = 0
    batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}
    upstream = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)

    def grads(logps):
        model.zero_grad()
        (logps * upstream).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    ours = grads(model_sequence_logprobs(model, batch, temperature=0.7))
    logits = model(input_ids=ids, attention_mask=attention).logits
    reference = grads(_naive_torch(logits, ids, loss_mask, 0.7))
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], **F64_TOL, msg=name)


def test_sequence_logprobs_single_position():
    """A length-1 sequence has nothing to predict: zero log-prob and zero gradient."""
    logits = torch.randn(2, 1, 4, dtype=torch.float64, requires_grad=True)
    out = sequence_logprobs(logits, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    assert torch.equal(out.detach(), torch.zeros(2, dtype=torch.float64))
    (g,) = torch.autograd.grad(out.sum(), logits)
    assert torch.equal(g, torch.zeros_like(logits))


# --------------------------------------------------------------------------------------
# 6. pref_epsilon defaults
# --------------------------------------------------------------------------------------
def test_resolve_pref_epsilon_defaults():
    """None resolves to 1e-3 for EXO and 0 for DPO; explicit values pass through as floats."""
    assert resolve_pref_epsilon("exo-pref") == 1e-3
    assert resolve_pref_epsilon("exo-pref", None) == 1e-3
    assert resolve_pref_epsilon("exo-rw") == 1e-3
    assert resolve_pref_epsilon("dpo-pref") == 0.0
    assert resolve_pref_epsilon("dpo-rw") == 0.0
    for lt in LOSS_TYPES:
        for eps in (0.0, 0.05, 0.25, 1e-6):
            got = resolve_pref_epsilon(lt, eps)
            assert got == eps and isinstance(got, float)
    assert resolve_pref_epsilon("dpo-pref", 0) == 0.0


@pytest.mark.parametrize("loss_type", ["exo-pref", "dpo-pref"])
def test_pref_epsilon_none_equals_default(loss_type):
    """alignment_loss(pref_epsilon=None) equals an explicit 1e-3 (EXO) / 0.0 (DPO)."""
    pol, ref, rewards, beta_pi, beta_r = _random_inputs(3, 5, 4)
    default = 1e-3 if loss_type.startswith("exo") else 0.0
    a = alignment_loss(pol, ref, rewards, loss_type, beta_pi, beta_r)
    b = alignment_loss(pol, ref, rewards, loss_type, beta_pi, beta_r, default)
    assert a.item() == b.item()
    c = alignment_loss(pol, ref, rewards, loss_type, beta_pi, beta_r, 0.2)
    assert c.item() != a.item()


# --------------------------------------------------------------------------------------
# 7. Tabular convergence of exo-rw to pi* ∝ pi_ref exp(r / beta)
# --------------------------------------------------------------------------------------
# Why the optimum is pi*: with beta_pi = 1 and theta = log pi* + c we have, for ANY group,
#   h_i = log pi*(y_i) - log pi_ref(y_i) = r_i / beta - log Z,
# so q = softmax(h) = softmax(r / beta) = p exactly and every group's KL(q || p) is 0, the
# global minimum of a non-negative objective. Conversely loss 0 on a group forces
# h_i - r_i / beta to be constant within that group; when the sampler gives every pair of
# candidates positive probability of sharing a group, that constant is global, so
# pi_theta ∝ pi_ref exp(r / beta) = pi* is the unique minimiser. Hence it is the minimiser for
# candidates drawn i.i.d. from pi_ref (what the method does) and equally for uniform sampling;
# both are checked. Because the loss is 0 on every sample at the optimum (interpolation), the
# stochastic gradients vanish there too and Adam converges with no noise floor.
def _tabular_problem(k=8, beta=0.5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    pi_ref = torch.softmax(torch.randn(k, generator=gen, dtype=torch.float64), 0)
    r = torch.randn(k, generator=gen, dtype=torch.float64)
    log_pi_star = torch.log_softmax(torch.log(pi_ref) + r / beta, 0)
    return pi_ref, r, log_pi_star


def _population_exo_loss(theta, pi_ref, r, beta, group_size):
    """Exact E_{groups ~ pi_ref iid}[KL(q || p)] by enumerating all K^group_size groups."""
    k = len(pi_ref)
    idx = torch.tensor(list(itertools.product(range(k), repeat=group_size)))
    weights = pi_ref[idx].prod(-1)
    pol = torch.log_softmax(theta, 0)[idx]
    per_group = [
        alignment_loss(pol[i:i + 1], torch.log(pi_ref)[idx[i:i + 1]], r[idx[i:i + 1]], "exo-rw", 1.0, beta)
        for i in range(len(idx))
    ]
    return sum(w * l for w, l in zip(weights, per_group))


def test_tabular_population_optimum_is_pi_star():
    """The exact expected exo-rw loss over pi_ref-sampled pairs is 0 with zero gradient at pi*."""
    beta = 0.5
    pi_ref, r, log_pi_star = _tabular_problem(k=5, beta=beta)
    theta = log_pi_star.clone().requires_grad_(True)
    pop = _population_exo_loss(theta, pi_ref, r, beta, 2)
    (grad,) = torch.autograd.grad(pop, theta)
    assert abs(pop.item()) < 1e-12
    assert grad.abs().max().item() < 1e-12
    assert _population_exo_loss(torch.log(pi_ref), pi_ref, r, beta, 2).item() > 1e-2


@pytest.mark.parametrize("sampler", ["pi_ref", "uniform"])
@pytest.mark.parametrize("group_size", [2, 4])
def test_tabular_exo_rw_converges_to_pi_star(sampler, group_size):
    """Adam on sampled-group exo-rw drives a tabular policy to pi* ∝ pi_ref exp(r / beta)."""
    torch.manual_seed(0)
    k, beta, batch, steps = 8, 0.5, 32, 1500
    pi_ref, r, log_pi_star = _tabular_problem(k=k, beta=beta)
    pi_star = log_pi_star.exp()
    log_ref = torch.log(pi_ref)

    def tv(log_pi):
        return 0.5 * (log_pi.exp() - pi_star).abs().sum().item()

    theta = log_ref.clone().requires_grad_(True)
    assert tv(torch.log_softmax(theta.detach(), 0)) > 0.1  # not trivially at the optimum

    sample_probs = pi_ref if sampler == "pi_ref" else torch.full((k,), 1.0 / k, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    # Plain Adam (lr 0.05, betas 0.9/0.999, eps 1e-8) written out: torch.optim.Adam's first
    # construction lazily imports torch._dynamo, which alone can take seconds on a cold cache.
    lr, b1, b2, adam_eps = 0.05, 0.9, 0.999, 1e-8
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    for step in range(1, steps + 1):
        idx = torch.multinomial(sample_probs.expand(batch, k), group_size, replacement=True, generator=gen)
        log_pi = torch.log_softmax(theta, 0)
        loss = alignment_loss(log_pi[idx], log_ref[idx], r[idx], "exo-rw", 1.0, beta)
        (grad,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
            theta -= lr * m_hat / (v_hat.sqrt() + adam_eps)

    log_pi = torch.log_softmax(theta.detach(), 0)
    kl = (pi_star * (log_pi_star - log_pi)).sum().item()
    # Far tighter than needed (TV < 0.02, KL < 1e-3): at pi* every sampled group has zero loss
    # and zero gradient, so nothing stops Adam from converging (observed TV ~1e-15).
    assert tv(log_pi) < 1e-4
    assert kl < 1e-6
