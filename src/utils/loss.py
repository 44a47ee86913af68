"""Sequence log-probabilities and the EXO / DPO alignment losses (README: The objective).

Notation, for one prompt x with K candidates y_1..y_K and labels r_1..r_K:

    h_i = log pi_theta^tau(y_i | x) - log pi_ref^tau(y_i | x)   (summed over completion tokens)
    q   = softmax(beta_pi * h)                                 (policy over the K candidates)
    p   = softmax(r / beta_r)                                  (rw labels)
        | p_winner = 1 - eps, p_other = eps / (K - 1)         (pref labels, winner = argmax r)

    EXO: KL(q || p) = sum_i q_i (log q_i - log p_i)            (reverse KL, mode-seeking)
    DPO: CE(p, q)   = -sum_i p_i log q_i                       (forward KL + const, mean-seeking)
"""
import torch
import torch.nn.functional as F

LOSS_TYPES = ("exo-pref", "exo-rw", "dpo-pref", "dpo-rw")
DEFAULT_PREF_EPSILON = {"exo": 1e-3, "dpo": 0.0}

# Elements of one [rows, chunk, vocab] float32 slice; bounds the working memory of
# sequence_logprobs to ~64 MiB however long the batch is.
_CHUNK_ELEMENTS = 1 << 24


class _SequenceLogprobs(torch.autograd.Function):
    """sum_t mask_t * log softmax(logits_{t-1} / tau)[labels_t], chunked over time.

    Forward keeps no [N, T, V] intermediate: each time chunk is reduced with logsumexp and
    gathered, then dropped; only the per-position logsumexp ([N, T]) is kept for backward.
    Backward writes d/d logits = mask * g * (onehot(label) - softmax(logits / tau)) / tau
    straight into the gradient buffer, built in place from exp(logits / tau - logsumexp), so
    it needs no memory beyond the gradient it returns (one chunk for half-precision logits,
    whose softmax is taken in float32 first). With `overwrite_logits` the gradient buffer is
    the logits tensor itself, so backward needs no logits-sized memory at all.
    """

    @staticmethod
    def _chunks(logits, loss_mask):
        """(start, stop, mask) for every time chunk; mask is None where no position in the
        chunk predicts a loss token (nothing to compute there, its gradient is 0)."""
        n, t, v = logits.shape
        step = max(1, _CHUNK_ELEMENTS // max(1, n * v))
        for start in range(0, t - 1, step):
            stop = min(start + step, t - 1)
            # logits at positions start..stop-1 predict tokens start+1..stop
            mask = loss_mask[:, start + 1:stop + 1]
            yield start, stop, (mask if mask.any() else None)

    @staticmethod
    def _scaled(logits, compute_dtype, temperature):
        scaled = logits.to(compute_dtype)
        return scaled if temperature == 1.0 else scaled / temperature  # no copy at tau = 1 in fp32

    @staticmethod
    def forward(ctx, logits, labels, loss_mask, temperature, overwrite_logits):
        # half-precision logits are reduced in float32; float64 stays float64
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        out = torch.zeros(logits.shape[0], dtype=compute_dtype, device=logits.device)
        lse = torch.zeros(logits.shape[:2], dtype=compute_dtype, device=logits.device)
        scratch = None  # one chunk, reused: a fresh allocation per chunk costs more than the arithmetic
        for start, stop, mask in _SequenceLogprobs._chunks(logits, loss_mask):
            if mask is None:
                continue
            chunk = logits[:, start:stop]
            if scratch is None:
                scratch = torch.empty(chunk.shape, dtype=compute_dtype, device=logits.device)
            work = scratch[:, :stop - start]
            # logsumexp(x / tau) = max / tau + log sum exp((x - max) / tau), built in the scratch
            top = chunk.amax(-1, keepdim=True).to(compute_dtype)
            if chunk.dtype == compute_dtype:
                torch.sub(chunk, top, out=work)
            else:
                work.copy_(chunk).sub_(top)
            if temperature != 1.0:
                work.div_(temperature)
                top = top / temperature
            lse[:, start:stop] = work.exp_().sum(-1).log_().add_(top.squeeze(-1))
            target = labels[:, start + 1:stop + 1].unsqueeze(-1)
            label_logits = _SequenceLogprobs._scaled(chunk.gather(-1, target).squeeze(-1), compute_dtype, temperature)
            out += ((label_logits - lse[:, start:stop]) * mask).sum(-1)
        ctx.save_for_backward(logits, labels, loss_mask, lse)
        ctx.temperature = temperature
        ctx.overwrite_logits = overwrite_logits
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, loss_mask, lse = ctx.saved_tensors
        tau = ctx.temperature
        grad = logits if ctx.overwrite_logits else torch.zeros_like(logits)
        in_place = logits.dtype == lse.dtype  # fp32/fp64: softmax can be built inside the gradient
        if ctx.overwrite_logits:
            grad[:, -1] = 0  # the last position predicts nothing
        for start, stop, mask in _SequenceLogprobs._chunks(logits, loss_mask):
            if mask is None:
                if ctx.overwrite_logits:
                    grad[:, start:stop] = 0
                continue
            if in_place:
                chunk_grad = grad[:, start:stop]
                torch.div(logits[:, start:stop], tau, out=chunk_grad)
            else:
                chunk_grad = logits[:, start:stop].to(lse.dtype) / tau
            chunk_grad.sub_(lse[:, start:stop, None]).exp_().neg_()  # -softmax(logits / tau)
            target = labels[:, start + 1:stop + 1].unsqueeze(-1)
            chunk_grad.scatter_add_(-1, target, torch.ones_like(target, dtype=chunk_grad.dtype))
            chunk_grad.mul_((grad_out[:, None] * mask / tau).unsqueeze(-1))
            if not in_place:
                grad[:, start:stop] = chunk_grad
        return grad, None, None, None, None


def sequence_logprobs(logits, labels, loss_mask, temperature=1.0, overwrite_logits=False):
    """Per-sequence log-probability of the labelled tokens at a sampling temperature.

        logp(y | x) = sum_t loss_mask[t] * log softmax(logits[t-1] / temperature)[labels[t]]

    `logits` is [N, T, V]; `labels` and `loss_mask` are [N, T] and aligned with the input ids
    (the Hugging Face convention: position t-1 predicts token t, the shift happens here).
    `loss_mask` is 1 on completion tokens. Returns [N] in float32 (float64 for float64
    logits). Computed as the gathered
    label logit minus logsumexp, in time chunks, never as a full-vocabulary log_softmax.

    overwrite_logits: let the backward pass turn `logits` into their own gradient instead of
    allocating one as large, for a caller that uses the logits for nothing else (a model's
    fresh output, as in model_sequence_logprobs). Using them afterwards is an error: autograd
    raises if anything saved them for its own backward.
    """
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    return _SequenceLogprobs.apply(logits, labels, loss_mask.to(compute_dtype), float(temperature),
                                   bool(overwrite_logits))


def resolve_pref_epsilon(loss_type, pref_epsilon=None):
    """--pref_epsilon default: 1e-3 for EXO (its KL needs p > 0), 0 (one-hot) for DPO."""
    if pref_epsilon is None:
        return DEFAULT_PREF_EPSILON[loss_type.split("-")[0]]
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


def alignment_loss(policy_logps, ref_logps, rewards, loss_type, beta_pi, beta_r, pref_epsilon=None):
    """EXO or DPO loss over G groups of K candidates, averaged over groups.

    policy_logps, ref_logps, rewards: [G, K]. With h = policy_logps - ref_logps,
    log q = log_softmax(beta_pi * h) and log p = target_distribution(rewards, ...):

        exo-*:  mean_g sum_i q_i (log q_i - log p_i)      = KL(q || p)
        dpo-*:  mean_g -sum_i p_i log q_i                 = CE(p, q)

    For K = 2, dpo-pref reduces to -logsigmoid(beta_pi (h_w - h_l)) and exo-pref to
    s(z)(logsig(z) - log(1-eps)) + s(-z)(logsig(-z) - log eps), z = beta_pi (h_w - h_l).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    log_q = F.log_softmax(beta_pi * (policy_logps - ref_logps), dim=-1)
    log_p = target_distribution(rewards.to(log_q.dtype), loss_type, beta_r, pref_epsilon)
    if loss_type.startswith("exo"):
        if torch.isinf(log_p).any():
            raise ValueError("EXO needs pref_epsilon > 0: KL(q || p) is infinite where p = 0")
        per_group = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        # xlogy-style: candidates with p = 0 contribute exactly 0, not 0 * log q
        per_group = -(log_p.exp() * log_q).sum(-1)
    return per_group.mean()
