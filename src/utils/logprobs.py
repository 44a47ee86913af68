"""Every per-sequence log-prob: of given logits (chunked over time), and of a causal LM through
its LM head, fused so that it never builds the logits, or after a shared prompt prefix.

    log p(y | x) = sum_t loss_mask[t] * log softmax((h[t-1] W^T + b) / tau)[labels[t]]

A model's log-probs are computed in two steps, so that another way of running the model (a
shared prompt prefix, say) can replace the first and keep the second:

1. a producer turns a collated batch into (hidden [N, L, H], labels [N, L], loss_mask [N, L]):
   the final hidden states the LM head reads, in the Hugging Face convention (hidden[:, t-1]
   predicts labels[:, t]). Both producers run the model's own forward through one
   utils.heads.HeadInput, which catches the head's input with a pre-hook on the head.
   `prompt_cut_hidden_states` is the plain one: one forward of the batch, the prompt prefix
   every row shares cut before the head (`logits_to_keep`, where the model's forward takes it);
   utils.prefix_sharing.shared_prefix_hidden_states packs each group's prompt once.
2. the head reduction: `fused_sequence_logprobs` (default) or the model's own head followed by
   `sequence_logprobs` (the unfused path, which builds [N, L, V] logits and reduces them in
   time chunks, never as a full-vocabulary log_softmax).

The fused reduction works on the positions in the loss only, in chunks of rows: each chunk's
logits are made, reduced (logsumexp, the label's logit, the temperature) and dropped; the
backward recomputes them chunk by chunk and accumulates the gradients of the hidden states and
of the head weight (and bias). Peak extra memory is one chunk of logits, not [N, L, V]: with a
128k vocabulary, 16 candidates x 1024 tokens of logits would be 8.6 GB in fp32, and as much
again for their gradient. The reduction runs as the head module's own forward (`head_logprobs`),
so whatever hooks the head carries run around it: under ZeRO-3 they gather a partitioned head
(tied or untied, with or without a bias) for the forward and again for the backward, until its
gradient is accumulated. Heads that are more than a linear map (logit soft-capping, a final
logit scale, a head that is not an nn.Linear or has forward hooks of its own) are not fused:
they take the unfused path, with one logged line.
"""
import argparse
import inspect
import logging

import torch

from .heads import HeadInput, lm_head, token_vocab_size, unwrap
from .prefix_sharing import packed_layout, shared_prefix_hidden_states

logger = logging.getLogger(__name__)

# The two reductions chunk differently, so each has its own bound:
# sequence_logprobs (logits given) reduces them a chunk of time steps at a time; one
# [rows, time chunk, vocab] float32 slice holds at most this many elements (~64 MiB) however
# long the batch is.
_TIME_CHUNK_ELEMENTS = 1 << 24
# fused_sequence_logprobs (logits made from the head) makes them a chunk of rows at a time; one
# [rows, vocab] chunk holds at most this many: 32 MiB in fp32, 64 rows at a 128k vocabulary
# (enough for the matmul to run at speed; the chunk is all the memory the reduction adds).
_ROW_CHUNK_ELEMENTS = 1 << 23

_fallback_logged = set()


def add_fused_logprobs_arg(parser):
    """--fused_logprobs / --no-fused_logprobs, for every stage that computes log-probs."""
    parser.add_argument("--fused_logprobs", action=argparse.BooleanOptionalAction, default=True,
                        help="compute log-probs from the final hidden states and the LM head weight in chunks, "
                             "never building the [rows, tokens, vocab] logits (exact; models whose head is more "
                             "than a linear map fall back by themselves); --no-fused_logprobs builds the logits")
    return parser


# -- logits given: the reduction over time chunks -------------------------------------------
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
        step = max(1, _TIME_CHUNK_ELEMENTS // max(1, n * v))
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


# -- the fused head reduction ---------------------------------------------------------------
class _FusedSequenceLogprobs(torch.autograd.Function):
    """sum_t mask_t * log softmax((hidden_{t-1} W^T + b) / tau)[labels_t], chunked over rows.

    Only the positions in the loss (mask != 0) go through the head, flattened into M rows; the
    forward keeps their logsumexp ([M]) for the backward, which recomputes each chunk's logits,
    turns them into d/dlogits = g mask (onehot - softmax) / tau in place and multiplies out the
    gradients of the chunk's hidden rows and of W (and b), accumulated in float32 or wider.
    Logits are made in the weight's dtype (as the model's own head makes them) and reduced in
    float32 at least. Under ZeRO-3 it runs as the head module's forward (`head_logprobs`), so
    the weight is gathered around the forward and the backward by the head's own hooks.
    """

    @staticmethod
    def _logits(rows, weight, bias, compute_dtype, temperature):
        logits = torch.nn.functional.linear(rows, weight, bias).to(compute_dtype)
        return logits if temperature == 1.0 else logits.div_(temperature)

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, loss_mask, temperature):
        compute_dtype = torch.promote_types(weight.dtype, torch.float32)
        n = hidden.shape[0]
        mask = loss_mask[:, 1:].to(compute_dtype)
        seq, pos = mask.nonzero(as_tuple=True)  # row-major: each sequence's positions together
        rows = hidden[seq, pos]  # [M, H], position t-1 ...
        targets = labels[:, 1:][seq, pos]  # ... predicts token t
        weights = mask[seq, pos]
        out = torch.zeros(n, dtype=compute_dtype, device=hidden.device)
        lse = torch.empty(len(seq), dtype=compute_dtype, device=hidden.device)
        step = max(1, _ROW_CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, len(seq), step):
            chunk = slice(start, start + step)
            logits = _FusedSequenceLogprobs._logits(rows[chunk], weight, bias, compute_dtype, temperature)
            label_logits = logits.gather(-1, targets[chunk, None]).squeeze(-1)
            # logsumexp in the chunk's own memory (torch.logsumexp would allocate another chunk)
            top = logits.amax(-1, keepdim=True)
            lse[chunk] = logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))
            out.index_add_(0, seq[chunk], (label_logits - lse[chunk]) * weights[chunk])
        # the rows in the loss, not all of hidden: nothing else need keep hidden alive
        ctx.save_for_backward(rows, weight, bias, seq, pos, targets, weights, lse)
        ctx.temperature = temperature
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight, bias, seq, pos, targets, weights, lse = ctx.saved_tensors
        tau = ctx.temperature
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        compute_dtype = lse.dtype
        grad_rows = torch.empty_like(rows) if need_hidden else None
        grad_weight = grad_bias = None
        row_scale = grad_out.to(compute_dtype)[seq] * weights / tau  # d out_seq / d logit, up to (onehot - p)
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device)
        if need_bias and bias is not None:
            grad_bias = torch.zeros(bias.shape, dtype=compute_dtype, device=bias.device)
        step = max(1, _ROW_CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, len(seq), step):
            chunk = slice(start, start + step)
            grad_logits = _FusedSequenceLogprobs._logits(rows[chunk], weight, bias, compute_dtype, tau)
            grad_logits.sub_(lse[chunk, None]).exp_().neg_()  # -softmax
            grad_logits.scatter_add_(-1, targets[chunk, None],
                                     torch.ones_like(targets[chunk, None], dtype=compute_dtype))
            grad_logits.mul_(row_scale[chunk, None])
            if need_hidden:
                grad_rows[chunk] = grad_logits.to(weight.dtype) @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.T, rows[chunk].to(compute_dtype))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        grad_hidden = None
        if need_hidden:
            grad_hidden = torch.zeros(ctx.hidden_shape, dtype=ctx.hidden_dtype, device=rows.device)
            grad_hidden[seq, pos] = grad_rows
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def fused_sequence_logprobs(hidden, weight, labels, loss_mask, temperature=1.0, bias=None):
    """Per-sequence log-probability of the labelled tokens, from the final hidden states and the
    LM head, without the [N, L, V] logits:

        logp(y | x) = sum_t loss_mask[t] * log softmax((hidden[t-1] @ weight.T + bias) / temperature)[labels[t]]

    hidden: [N, L, H]; weight: [V, H] (bias: [V]); labels, loss_mask: [N, L], aligned as in
    `sequence_logprobs` (the Hugging Face convention, the shift happens here).
    Returns [N] in float32 (float64 for a float64 weight). Differentiable in hidden, weight and
    bias. `weight` and `bias` must be whole tensors: for a model's head, partitioned under
    ZeRO-3, call `head_logprobs`, which runs this as the head module's forward.
    """
    return _FusedSequenceLogprobs.apply(hidden, weight, bias, labels, loss_mask, float(temperature))


# -- the model: its head, its final hidden states -------------------------------------------
def _log_fallback(model, why):
    if why not in _fallback_logged:
        _fallback_logged.add(why)
        logger.warning("fused log-probs: %s: %s; using the unfused path (full logits)",
                       type(unwrap(model)).__name__, why)


def _prompt_cut(model, batch):
    """(start, kwargs): the first position whose output predicts a loss token, and the
    `logits_to_keep` that cuts everything before it (when the model's forward takes one)."""
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    if "logits_to_keep" not in inspect.signature(unwrap(model).forward).parameters:
        return 0, {}
    first_loss_pos = int(loss_mask.float().argmax(-1).min())
    start = max(0, first_loss_pos - 1)  # the position before a token predicts it
    return start, {"logits_to_keep": input_ids.shape[1] - start}


def prompt_cut_hidden_states(backbone, batch):
    """Producer of (hidden, labels, loss_mask) for the head reduction: one forward of the
    collated batch through `backbone` (a utils.heads.HeadInput); only positions from the one
    before the first completion token on are kept (the prompt prefix every row shares is cut
    with `logits_to_keep` where the model takes it)."""
    start, kwargs = _prompt_cut(backbone.model, batch)
    hidden, _ = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                         **kwargs)
    return hidden, batch["input_ids"][:, start:], batch["loss_mask"][:, start:]


def _unfused_model_logprobs(model, batch, temperature, vocab=None):
    """The model's own logits, then sequence_logprobs: the unfused path."""
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    start, kwargs = _prompt_cut(model, batch)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False, **kwargs).logits
    if vocab is not None:  # the padded-vocabulary rule (utils.heads.token_vocab_size)
        logits = logits[..., :vocab]
    # nothing else reads these logits, so backward may build their gradient in their place
    return sequence_logprobs(logits, input_ids[:, start:], loss_mask[:, start:], temperature, overwrite_logits=True)


def _as_forward_of(head, reduction, hidden):
    """reduction(hidden) computed as `head`'s own forward, so that the hooks on the head run
    around it as around any forward of it. Under ZeRO-3 they gather the partitioned weight for
    the forward, gather it again when the backward reaches the head and release it only once
    autograd has accumulated the weight's gradient. (A gather of one's own around the backward
    releases the weight before that accumulation, which then fails on the partitioned,
    0-element parameter of an untied head.)"""
    own = head.__dict__.get("forward")
    head.forward = reduction
    try:
        return head(hidden)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def head_logprobs(head, hidden, labels, loss_mask, temperature=1.0, fused=True, vocab=None):
    """Step 2: per-sequence log-probs [N] from final hidden states through the LM head `head`
    (an nn.Linear, see utils.heads.lm_head), fused or through its [N, L, V] logits; over the
    first `vocab` outputs only where given (utils.heads.token_vocab_size)."""
    if fused:
        def reduction(rows):
            bias = None if head.bias is None else head.bias[:vocab]
            return fused_sequence_logprobs(rows, head.weight[:vocab], labels, loss_mask, temperature, bias)
        return _as_forward_of(head, reduction, hidden)
    logits = head(hidden) if vocab is None else head(hidden)[..., :vocab]
    return sequence_logprobs(logits, labels, loss_mask, temperature, overwrite_logits=True)


def model_sequence_logprobs(model, batch, temperature=1.0, fused=True, prefix_sharing=False):
    """log p(completion | prompt) of every sequence in a collated batch, [N] float32.

    `model` is a causal LM, maybe inside a peft wrapper or a DeepSpeed engine. fused: the head
    reduction without logits (fused_sequence_logprobs); a model whose head is more than a
    linear map takes the unfused path instead, saying so once. prefix_sharing (True or "on";
    "auto": only where packing saves work, utils.prefix_sharing.packed_layout): the hidden
    states come from utils.prefix_sharing.shared_prefix_hidden_states, which encodes each
    group's shared prompt once (the caller has checked the model with sharing_support). Ids
    past the tokenizer of a padded vocabulary are left out of the normaliser
    (utils.heads.token_vocab_size).
    """
    head, why = lm_head(model)
    vocab = token_vocab_size(model)
    if head is None:
        if prefix_sharing:
            raise ValueError(f"prefix sharing needs the LM head's input, but {why}")
        if fused:
            _log_fallback(model, why)
        return _unfused_model_logprobs(model, batch, temperature, vocab)
    packed = packed_layout(model, batch, prefix_sharing)  # auto: None where packing costs more
    if not fused and packed is None:
        return _unfused_model_logprobs(model, batch, temperature, vocab)
    backbone = HeadInput(model, head)
    if packed is not None:
        hidden, labels, loss_mask = shared_prefix_hidden_states(backbone, batch, packed)
    else:
        hidden, labels, loss_mask = prompt_cut_hidden_states(backbone, batch)
    return head_logprobs(head, hidden, labels, loss_mask, temperature, fused, vocab)
