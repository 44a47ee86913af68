"""Per-sequence log-probs of a causal LM, with a fused LM head that never builds the logits.

    log p(y | x) = sum_t loss_mask[t] * log softmax((h[t-1] W^T + b) / tau)[labels[t]]

A model's log-probs are computed in two steps, so that another way of running the model (a
shared prompt prefix, say) can replace the first and keep the second:

1. a producer turns a collated batch into (hidden [N, L, H], labels [N, L], loss_mask [N, L]):
   the final hidden states the LM head reads, in the Hugging Face convention (hidden[:, t-1]
   predicts labels[:, t]). `prompt_cut_hidden_states` is the plain one: one forward of the
   batch, the prompt prefix every row shares cut before the head (`logits_to_keep`).
2. the head reduction: `fused_sequence_logprobs` (default) or the model's own head followed by
   `utils.loss.sequence_logprobs` (the unfused path, which builds [N, L, V] logits).

The fused reduction works on the positions in the loss only, in chunks of rows: each chunk's
logits are made, reduced (logsumexp, the label's logit, the temperature) and dropped; the
backward recomputes them chunk by chunk and accumulates the gradients of the hidden states and
of the head weight (and bias). Peak extra memory is one chunk of logits, not [N, L, V]: with a
128k vocabulary, 16 candidates x 1024 tokens of logits would be 8.6 GB in fp32, and as much
again for their gradient. Heads that are more than a linear map (logit soft-capping, a final
logit scale, a head that is not an nn.Linear or has forward hooks of its own) are not fused:
they take the unfused path, with one logged line.
"""
import argparse
import contextlib
import logging

import torch

from .loss import sequence_logprobs
from .model_utils import _accepts_logits_to_keep, _unwrap

logger = logging.getLogger(__name__)

# Elements of one [rows, vocab] chunk of logits: 32 MiB in fp32, 64 rows at a 128k vocabulary
# (enough for the matmul to run at speed; the chunk is all the memory the reduction adds).
_CHUNK_ELEMENTS = 1 << 23

# Config fields by which a model transforms its head's output, with the value that means "no
# transform": the fused head computes h W^T + b only, so a model with any other value is not fused.
_HEAD_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": None, "logits_scaling": 1.0,
                    "lm_head_multiplier": 1.0, "output_multiplier_scale": None, "logit_softcapping": None}

_fallback_logged = set()


def add_fused_logprobs_arg(parser):
    """--fused_logprobs / --no-fused_logprobs, for every stage that computes log-probs."""
    parser.add_argument("--fused_logprobs", action=argparse.BooleanOptionalAction, default=True,
                        help="compute log-probs from the final hidden states and the LM head weight in chunks, "
                             "never building the [rows, tokens, vocab] logits (exact; models whose head is more "
                             "than a linear map fall back by themselves); --no-fused_logprobs builds the logits")
    return parser


# -- the fused head reduction ---------------------------------------------------------------
def _gathered(params):
    """Every rank's share of ZeRO-3 partitioned parameters, gathered for the duration of the
    `with`; a no-op for ordinary tensors. Collective under ZeRO-3: every rank must enter it."""
    params = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class _FusedSequenceLogprobs(torch.autograd.Function):
    """sum_t mask_t * log softmax((hidden_{t-1} W^T + b) / tau)[labels_t], chunked over rows.

    Only the positions in the loss (mask != 0) go through the head, flattened into M rows; the
    forward keeps their logsumexp ([M]) for the backward, which recomputes each chunk's logits,
    turns them into d/dlogits = g mask (onehot - softmax) / tau in place and multiplies out the
    gradients of the chunk's hidden rows and of W (and b), accumulated in float32 or wider.
    Logits are made in the weight's dtype (as the model's own head makes them) and reduced in
    float32 at least. Under ZeRO-3 the caller gathers the weight around the forward (autograd
    records the full shape the gradient must have); the backward gathers it again itself.
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
        step = max(1, _CHUNK_ELEMENTS // weight.shape[0])
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
        with _gathered((weight, bias)):
            if need_weight:
                grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device)
            if need_bias and bias is not None:
                grad_bias = torch.zeros(bias.shape, dtype=compute_dtype, device=bias.device)
            step = max(1, _CHUNK_ELEMENTS // weight.shape[0])
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
    `utils.loss.sequence_logprobs` (the Hugging Face convention, the shift happens here).
    Returns [N] in float32 (float64 for a float64 weight). Differentiable in hidden, weight and
    bias. Under ZeRO-3 a partitioned weight (and bias) is gathered for the forward and again
    for the backward, so every rank must call it, also with nothing in its loss mask.
    """
    with _gathered((weight, bias)):
        return _FusedSequenceLogprobs.apply(hidden, weight, bias, labels, loss_mask, float(temperature))


# -- the model: its head, its final hidden states -------------------------------------------
def lm_head(model):
    """(head, None) when `model`'s logits are exactly its final hidden states through an
    nn.Linear (weight, maybe bias), the case the fused reduction computes; else (None, why)."""
    base = _unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        return None, "the model has no output embeddings"
    if type(head).forward is not torch.nn.Linear.forward:
        return None, f"its LM head is a {type(head).__name__}, not a plain nn.Linear"
    # a hook may change what the head returns; DeepSpeed's only gather and release its weight
    hooks = [*head._forward_pre_hooks.values(), *head._forward_hooks.values()]
    foreign = [h for h in hooks if not getattr(h, "__module__", "").startswith("deepspeed")]
    if foreign:
        return None, f"its LM head has forward hooks ({getattr(foreign[0], '__qualname__', foreign[0])})"
    configs = [base.config]
    if hasattr(base.config, "get_text_config"):
        configs.append(base.config.get_text_config())
    for config in configs:
        for key, identity in _HEAD_TRANSFORMS.items():
            value = getattr(config, key, identity)
            if value != identity:
                return None, f"its logits are transformed after the head ({key}={value})"
    return head, None


def _log_fallback(model, why):
    if why not in _fallback_logged:
        _fallback_logged.add(why)
        logger.warning("fused log-probs: %s: %s; using the unfused path (full logits)",
                       type(_unwrap(model)).__name__, why)


class Backbone:
    """The model up to its LM head. Calling it runs the model's whole forward (through the
    DeepSpeed engine and peft wrapper, so their hooks fire as in any forward) with the given
    keyword arguments, records what the head reads and lets the head compute the last position
    only. Returns (hidden [N, L, H], the model's output); L is what the model passes to its
    head (all positions, or the last `logits_to_keep`)."""

    def __init__(self, model, head):
        self.model, self.head = model, head

    def __call__(self, **model_kwargs):
        captured = []

        def record(module, args):
            captured.append(args[0])
            return (args[0][:, -1:], *args[1:])

        # first of the head's hooks, so that ZeRO-3's hooks see only the cut input: they tie the
        # head's backward to its inputs and outputs, and the head's output here has no backward
        handle = self.head.register_forward_pre_hook(record, prepend=True)
        try:
            outputs = self.model(**model_kwargs)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"the LM head ran {len(captured)} times in one forward; expected once")
        return captured[0], outputs


def _prompt_cut(model, batch):
    """(start, kwargs): the first position whose output predicts a loss token, and the
    `logits_to_keep` that cuts everything before it (when the model takes one)."""
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    if not _accepts_logits_to_keep(model):
        return 0, {}
    first_loss_pos = int(loss_mask.float().argmax(-1).min())
    start = max(0, first_loss_pos - 1)  # the position before a token predicts it
    return start, {"logits_to_keep": input_ids.shape[1] - start}


def prompt_cut_hidden_states(backbone, batch):
    """Producer of (hidden, labels, loss_mask) for the head reduction: one forward of the
    collated batch; only positions from the one before the first completion token on are
    kept (the prompt prefix every row shares is cut with `logits_to_keep`)."""
    start, kwargs = _prompt_cut(backbone.model, batch)
    hidden, _ = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                         **kwargs)
    return hidden, batch["input_ids"][:, start:], batch["loss_mask"][:, start:]


def _unfused_model_logprobs(model, batch, temperature):
    """The model's own logits, then utils.loss.sequence_logprobs: the unfused path."""
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    start, kwargs = _prompt_cut(model, batch)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False, **kwargs).logits
    # nothing else reads these logits, so backward may build their gradient in their place
    return sequence_logprobs(logits, input_ids[:, start:], loss_mask[:, start:], temperature, overwrite_logits=True)


def head_logprobs(head, hidden, labels, loss_mask, temperature=1.0, fused=True):
    """Step 2: per-sequence log-probs [N] from final hidden states through the LM head `head`
    (an nn.Linear, see lm_head), fused or through its [N, L, V] logits."""
    if fused:
        return fused_sequence_logprobs(hidden, head.weight, labels, loss_mask, temperature, head.bias)
    return sequence_logprobs(head(hidden), labels, loss_mask, temperature, overwrite_logits=True)


def model_sequence_logprobs(model, batch, temperature=1.0, fused=True, prefix_sharing=False):
    """log p(completion | prompt) of every sequence in a collated batch, [N] float32.

    `model` is a causal LM, maybe inside a peft wrapper or a DeepSpeed engine. fused: the head
    reduction without logits (fused_sequence_logprobs); a model whose head is more than a
    linear map takes the unfused path instead, saying so once. prefix_sharing (True or "on";
    "auto": only where packing saves work, utils.prefix_sharing.packed_layout): the hidden
    states come from utils.prefix_sharing.shared_prefix_hidden_states(backbone, batch), which
    encodes each group's shared prompt once.
    """
    head, why = lm_head(model)
    if head is None:
        if prefix_sharing:
            raise ValueError(f"prefix sharing needs the LM head's input, but {why}")
        if fused:
            _log_fallback(model, why)
        return _unfused_model_logprobs(model, batch, temperature)
    packed = None
    if prefix_sharing:
        from .prefix_sharing import packed_layout
        packed = packed_layout(model, batch, prefix_sharing)  # auto: None where packing costs more
    if not fused and packed is None:
        return _unfused_model_logprobs(model, batch, temperature)
    if packed is not None:
        from .prefix_sharing import Decoder, shared_prefix_hidden_states
        hidden, labels, loss_mask = shared_prefix_hidden_states(Decoder(model), batch, packed)
    else:
        hidden, labels, loss_mask = prompt_cut_hidden_states(Backbone(model, head), batch)
    return head_logprobs(head, hidden, labels, loss_mask, temperature, fused)
