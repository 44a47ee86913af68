"""The HF sampler: completions of fitted prompts drawn by generate, each prompt's KV cache computed once.

What inference_sft's `--backend hf` runs (utils/vllm_sampling.py is `--backend vllm`): the
generation config from the flags alone (`sampling_config`), the prompt cut by the training
rule (`fit_prompt`), the stop tokens (`stop_tokens`), a batch's seed (`batch_seed`), and
`sample`, which draws, cuts each completion at its first stop token, decodes it and (with
save_logps) sums the log-probs of the drawn tokens (`CompletionLogprobs`).
`generate_once_per_prompt` is generate with each prompt prefilled once and its cache repeated
for its K samples.
"""
import copy
import inspect

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, SuppressTokensLogitsProcessor

from .data.chat import is_conversation
from .heads import token_vocab_size


def batch_seed(seed, first_index):
    """The seed of the batch whose first prompt is prompt `first_index`."""
    return int(np.random.SeedSequence([seed, first_index]).generate_state(1)[0])


def sampling_config(args, tokenizer, stop_ids=None):
    """The whole generation config, from the flags alone; `stop_ids` end a completion (default EOS),
    as the list `sample` reads."""
    sampling = dict(do_sample=True, temperature=args.temp, top_k=args.top_k, top_p=args.top_p) if args.temp > 0 \
        else dict(do_sample=False)
    return GenerationConfig(**sampling, max_new_tokens=args.max_new_tokens, num_return_sequences=args.return_num,
                            eos_token_id=list(stop_ids or [tokenizer.eos_token_id]),
                            pad_token_id=tokenizer.pad_token_id, use_cache=True)


def stop_tokens(tokenisation, prompts):
    """The ids a completion stops at: EOS for text prompts; for conversations also the chat
    template's end-of-turn token, which ends them (a chat model ends its turn with it, as it is
    served)."""
    if any(is_conversation(p) for p in prompts):
        return tokenisation.chat.end_of_turn_ids
    return [tokenisation.tokenizer.eos_token_id]


def fit_prompt(tokenisation, prompt_ids):
    """The prompt as generation sees it: cut on the left by the training rule, as if a completion
    of all max_gen_len (= max_new_tokens) tokens followed it, so prompt + completion always fits."""
    ids, prompt_len = tokenisation.join(prompt_ids, [tokenisation.tokenizer.eos_token_id] * tokenisation.max_gen_len)
    return ids[:prompt_len]


class CompletionLogprobs(LogitsProcessor):
    """Records log softmax(logits / temp) of every drawn token, without keeping the logits.

    `generate` calls a processor once per step with the ids so far, before the temperature
    warper; the distribution of step t is kept until step t + 1 shows which token was drawn
    from it, and `finish` reads the last step's token. Nothing else changes the logits (no
    filtering, no bar on EOS; only the padded-vocabulary mask, before it), so this is the
    distribution each token was drawn from.
    """

    def __init__(self, temperature):
        self.temperature = temperature
        self.last = None
        self.steps = []

    def __call__(self, input_ids, scores):
        if self.last is not None:
            self.steps.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences):
        """[N, new tokens] log-prob of each drawn token."""
        return torch.stack(self.steps + [self.last.gather(-1, sequences[:, -1:]).squeeze(-1)], dim=1)


@torch.no_grad()
def sample(model, tokenizer, prompt_ids, config, seed, save_logps=False):
    """Draw config.num_return_sequences completions of each prompt (token ids, already fitted).

    Returns per prompt, a list per completion of: `ids`, the drawn token ids up to and with
    the first stop token (config.eos_token_id, a list; all max_new_tokens of them when none was
    drawn; never an id past the tokenizer of a padded vocabulary, utils.heads.token_vocab_size); `stops`, that stop token or None; `texts`, the decoded ids before it; and `logps`
    (with `save_logps`, else None), log p^temp(ids | prompt) summed over exactly those ids.
    """
    device = next(model.parameters()).device
    batch = tokenizer.pad({"input_ids": prompt_ids}, padding_side="left", return_tensors="pt").to(device)
    prompt_len = batch["input_ids"].shape[1]
    recorder = CompletionLogprobs(config.temperature) if save_logps else None
    processors = [recorder] if recorder else []
    tokens = token_vocab_size(model)
    if tokens is not None:  # the padded-vocabulary rule: ids past the tokenizer are never drawn
        vocab = model.config.get_text_config().vocab_size
        processors.insert(0, SuppressTokensLogitsProcessor(range(tokens, vocab), device=device))
    torch.manual_seed(seed)
    sequences = generate_once_per_prompt(model, batch, config, logits_processor=LogitsProcessorList(processors))
    drawn = sequences[:, prompt_len:]

    is_stop = torch.isin(drawn, torch.tensor(config.eos_token_id, device=drawn.device))
    ended = is_stop.any(-1)
    length = torch.where(ended, is_stop.int().argmax(-1) + 1, drawn.shape[1])  # the stop token counts when drawn
    ids = [row[:n] for row, n in zip(drawn.tolist(), length.tolist())]
    stops = [row[-1] if e else None for row, e in zip(ids, ended.tolist())]
    texts = tokenizer.batch_decode([row[:-1] if stop is not None else row for row, stop in zip(ids, stops)],
                                   skip_special_tokens=False, clean_up_tokenization_spaces=False)
    logps = None
    if save_logps:
        counted = torch.arange(drawn.shape[1], device=device)[None] < length[:, None]
        logps = (recorder.finish(sequences) * counted).sum(-1).tolist()

    k = config.num_return_sequences
    return tuple(_per_prompt(rows, k) for rows in (ids, stops, texts, logps))


def _per_prompt(rows, k):
    """generate's rows (k per prompt, prompt-major) -> one list of k per prompt."""
    return None if rows is None else [rows[i:i + k] for i in range(0, len(rows), k)]


# -- each prompt's cache computed once ----------------------------------------------------
def cache_argument(model):
    """The name under which `model`'s forward takes and returns its KV cache (`cache` in recent
    transformers, `past_key_values` before), or None for a model that takes neither."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


# How sampling hands each prompt's cache to its K samples, by model_type: "static" repeats it
# into a cache preallocated for the whole completion (written in place each step), "dynamic"
# repeats it in place and lets it grow by concatenation. Only families that
# tests/test_arch_matrix.py shows drawing plain `generate`'s tokens are listed; any other model
# is sampled by plain `generate` (each prompt fed K times: slower, never wrong). Not static:
# GPT-Neo (local attention the static cache does not know of drew other tokens), Falcon (ALiBi
# failed), the sliding-window and chunked families. MPT is left out: its repeated cache fails in
# transformers 4.56.
PROMPT_CACHE_ARCHITECTURES = {
    **dict.fromkeys(("gemma", "gpt2", "gpt_neox", "llama", "mistral", "mixtral", "opt", "phi3", "qwen2", "qwen3"),
                    "static"),
    **dict.fromkeys(("bloom", "falcon", "gemma2", "gemma3_text", "gpt_neo", "llama4_text"), "dynamic"),
}


def prompt_cache_kind(model):
    """How `generate_once_per_prompt` hands each prompt's cache to its K samples: "static",
    "dynamic" (see PROMPT_CACHE_ARCHITECTURES) or None (plain `generate`). A static cache also
    needs every layer to be full attention (a sliding-window config of a listed family repeats
    in place); repeating at all needs a cache of keys and values only: an SSM, convolution or
    linear-attention state (Mamba hybrids, LFM2, Qwen3-Next) is a layer kind whose repeat
    transformers does not define, or defines for its attention half only."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    kind = PROMPT_CACHE_ARCHITECTURES.get(model.config.model_type)
    if kind is None or cache_argument(model) is None or not model._supports_default_dynamic_cache():
        return None
    layers = DynamicCache(config=model.config.get_text_config(decoder=True)).layers
    if not layers or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        return None
    return "static" if kind == "static" and all(type(layer) is DynamicLayer for layer in layers) else "dynamic"


def _static_repeat(model, cache, repeats, max_cache_len):
    """`cache` repeated `repeats` times along the batch into a StaticCache of `max_cache_len`.

    A DynamicCache grows by concatenation: every decode step copies every layer's whole cache
    (at TL;DR shape ~250 MB a step, a third of the time; exp/bench/README.md). A StaticCache
    writes each step's keys and values in place; attention then spans all `max_cache_len`
    positions, the unwritten ones masked out."""
    from transformers.cache_utils import StaticCache

    static = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=max_cache_len)
    for layer, filled in zip(static.layers, cache.layers, strict=True):
        layer.update(filled.keys.repeat_interleave(repeats, 0), filled.values.repeat_interleave(repeats, 0))
    return static


def generate_once_per_prompt(model, batch, config, preallocate=True, **generate_kwargs):
    """`model.generate(**batch, generation_config=config)`, each prompt's KV cache computed once.

    With num_return_sequences = K, `generate` repeats every prompt K times and runs the K copies
    through the model, so K - 1 of every K prompt tokens fed are redundant (at TL;DR shapes,
    ~400-token prompts and ~50-token completions, prefill is most of the arithmetic). Here all
    but each prompt's last token go through the model once, the resulting cache is repeated K
    times (rows prompt-major as `generate` orders them), and `generate` continues from it with
    one row per sample, feeding each row's last prompt token. The repeat goes into a cache
    preallocated for the whole completion where `prompt_cache_kind` says "static" and
    `preallocate` (False keeps the concatenating cache, for the benchmark's side-by-side).
    Its random draws are the ones plain `generate` makes (one multinomial over the same
    [B*K, vocab] rows a step, after the same seed), so the samples follow the same
    distribution and, up to float rounding of a differently split prefill, are the same
    samples (tests/test_arch_matrix.py holds this for every family there). Where there is
    nothing to share (K = 1, 1-token prompts) or the family is not one tested, plain `generate`.
    """
    k = config.num_return_sequences or 1
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    kind = prompt_cache_kind(model) if k > 1 and input_ids.shape[1] >= 2 else None
    if kind is None:
        return model.generate(**batch, generation_config=config, **generate_kwargs)
    from transformers.cache_utils import DynamicCache

    name = cache_argument(model)
    params = inspect.signature(model.forward).parameters
    prefix = {"input_ids": input_ids[:, :-1], "attention_mask": mask[:, :-1], "use_cache": True,
              name: DynamicCache(config=model.config.get_text_config(decoder=True))}
    if "position_ids" in params:  # left padding: positions count real tokens, as generate counts them
        prefix["position_ids"] = (mask[:, :-1].long().cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in params:
        prefix["logits_to_keep"] = 1  # the prefix's logits are never read
    cache = getattr(model(**prefix), name)
    per_sample = copy.deepcopy(config)
    per_sample.num_return_sequences = 1
    if kind == "static" and preallocate:
        new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - input_ids.shape[1]
        cache = _static_repeat(model, cache, k, input_ids.shape[1] + new_tokens)
        # generate would torch.compile the decode step for a static cache on a GPU, once per
        # batch width; sampling stays eager, as it is with the concatenating cache
        per_sample.disable_compile = True
    else:
        cache.batch_repeat_interleave(k)
    return model.generate(input_ids=input_ids.repeat_interleave(k, 0), attention_mask=mask.repeat_interleave(k, 0),
                          generation_config=per_sample, **{name: cache}, **generate_kwargs)
