"""A model's output head (the LM head of a causal LM, the score head of a sequence
classifier) and the hidden states it reads.

Both log-prob paths (utils.logprobs: the fused head reduction) and the shared-prompt path
(utils.prefix_sharing) need the final hidden states of a model that may sit inside a peft
wrapper and a DeepSpeed engine. `HeadInput` runs the model's whole top-level forward (so the
engine's ZeRO-3 bookkeeping and peft's wrappers work as in any forward) and catches the head's
input with a forward pre-hook on the head itself. That is the exact tensor the head reads,
whatever the model does before it (OPT's `model.decoder`, a projection or a scale before the
head), and it needs no argument the model's forward may not take (`logits_to_keep`). This
module imports nothing else of the package's model code, so both users can import it.
"""
import torch

# Config fields by which a model transforms its head's output, with the value that means "no
# transform": a reduction that computes h W^T + b itself (the fused head; the shared path's own
# head call) would skip the transform, so a model with any other value does not qualify.
_HEAD_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": None, "logits_scaling": 1.0,
                    "lm_head_multiplier": 1.0, "output_multiplier_scale": None, "logit_softcapping": None}


def unwrap(model):
    """The Hugging Face model inside a DeepSpeed engine and/or a peft wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _output_embeddings(hf):
    return hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None


def output_head(model):
    """The module whose input is the final hidden state: the LM head, else the score head
    (a sequence classifier's `score`), else None."""
    hf = unwrap(model)
    head = _output_embeddings(hf)
    return head if head is not None else getattr(hf, "score", None)


def lm_head(model):
    """(head, None) when `model`'s logits are exactly its final hidden states through an
    nn.Linear (weight, maybe bias), the case a caller can compute itself from the head's input;
    else (None, why)."""
    base = unwrap(model)
    head = _output_embeddings(base)
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


def token_vocab_size(model):
    """How many of the head's outputs are tokens: len(tokenizer) where the model was loaded for
    one (utils.model_utils.prepare_for_tokenizer) and its vocabulary is padded beyond it (Pythia:
    50304 rows for 50277 tokens; Qwen), else None (all of them).

    The padded-vocabulary rule, the same everywhere: an id >= len(tokenizer) is no token. The
    sampler never draws one (its logit is -inf) and every log-prob's normaliser leaves it out
    (log softmax over the first len(tokenizer) logits), in sampling, scoring and training alike,
    so the distribution a completion was sampled from is the one it is scored under."""
    hf = unwrap(model)
    size, rows = getattr(hf, "token_vocab_size", None), getattr(hf.config.get_text_config(), "vocab_size", None)
    return size if size is not None and rows is not None and size < rows else None


class HeadInput:
    """The model up to its head. Calling it runs the model's whole forward with the given
    keyword arguments and returns (hidden [N, L, H], the model's output): what the head read.

    An LM head then computes the last position only (the caller reduces the hidden states
    itself, fused or through the head); a score head computes every position (one output per
    position, a negligible cost, and the classifier's forward indexes them)."""

    def __init__(self, model, head=None):
        self.model = model
        self.head = head if head is not None else output_head(model)
        if self.head is None:
            raise ValueError(f"{type(unwrap(model)).__name__} has neither an LM head nor a score head")
        self.cut = self.head is _output_embeddings(unwrap(model))

    def __call__(self, **model_kwargs):
        captured = []

        def record(module, args):
            captured.append(args[0])
            return (args[0][:, -1:], *args[1:]) if self.cut else None

        # first of the head's hooks, so that ZeRO-3's hooks see only the cut input: they tie the
        # head's backward to its inputs and outputs, and the head's output here has no backward
        handle = self.head.register_forward_pre_hook(record, prepend=True)
        try:
            outputs = self.model(**model_kwargs)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"the model's head ran {len(captured)} times in one forward; expected once")
        return captured[0], outputs
