"""The architecture matrix: on a tiny random model of every family that prefix sharing or the
fused head enables, and of the families they must refuse, each fast path equals the plain
forward (unshared rows, the model's own full logits) in float32 to 1e-4 of each tensor's scale
(its largest |entry|, at least 1), log-probs and every parameter's gradient, or says in one line
why it falls back; and sampling, which prefills each prompt once, draws the tokens plain
`generate` draws. Built from configs, no download.

    PYTHONPATH=src python tests/test_arch_matrix.py     # prints the matrix (each path's choice, max |diff| / scale)
"""
import random
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from utils.data.collators import pad_sequences
from utils.heads import HeadInput, lm_head
from utils.logprobs import model_sequence_logprobs, sequence_logprobs
from utils.prefix_sharing import resolve_prefix_sharing, shared_prefix_hidden_states, sharing_support

ATOL = 1e-5  # per-token log-probs of sampling (one token's, no sum)
# Packed and unpacked rows (or fused and full logits) sum in other orders, so float32 rounding
# differs with the CPU's kernels: ~3e-7 of the scale on one machine, 3.5e-5 absolute on another
# (gpt2, CI). Summing a few hundred float32 terms bounds that at ~1e-5 of their magnitude; a real
# mistake (a token placed or masked wrongly, as the forced column of the matrix shows) errs by
# about 1e-1 of the scale and more.
RTOL = 1e-4
VOCAB = 96
TEMPERATURE = 0.7
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64)
# name -> (model_type, config fields, what prefix sharing must say (None: share), what the fused head must say)
FAMILIES = {
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=1, n_head=2, n_positions=64), None, None),
    "gpt_neox": ("gpt_neox", dict(_DECODER, num_key_value_heads=None), None, None),
    "llama": ("llama", _DECODER, None, None),
    "qwen2": ("qwen2", dict(_DECODER, use_sliding_window=False), None, None),
    "qwen2 sliding": ("qwen2", dict(_DECODER, use_sliding_window=True, sliding_window=4, max_window_layers=0),
                      "sliding", None),
    "qwen3": ("qwen3", dict(_DECODER, head_dim=16), None, None),
    "mistral": ("mistral", dict(_DECODER, sliding_window=None), None, None),
    "mistral sliding": ("mistral", dict(_DECODER, sliding_window=4), "sliding-window", None),
    "mixtral": ("mixtral", dict(_DECODER, sliding_window=None, num_local_experts=2, num_experts_per_tok=2), None,
                None),
    "gemma": ("gemma", dict(_DECODER, head_dim=16), None, None),
    "gemma2": ("gemma2", dict(_DECODER, head_dim=16, sliding_window=4), "sliding", "final_logit_softcapping"),
    "phi3": ("phi3", dict(_DECODER, sliding_window=None, pad_token_id=0), None, None),
    "opt": ("opt", dict(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=64), None, None),
    "gpt_neo global": ("gpt_neo", dict(hidden_size=32, num_layers=1, num_heads=2, attention_types=[[["global"], 1]],
                                       max_position_embeddings=64), None, None),
    "gpt_neo local": ("gpt_neo", dict(hidden_size=32, num_layers=1, num_heads=2, attention_types=[[["local"], 1]],
                                      window_size=4, max_position_embeddings=64), "local attention", None),
    "falcon": ("falcon", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, alibi=False), None, None),
    "falcon alibi": ("falcon", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, alibi=True),
                     "ALiBi", None),
    "bloom": ("bloom", dict(hidden_size=32, n_layer=1, n_head=2), "ALiBi", None),
    "bamba": ("bamba", dict(_DECODER, num_hidden_layers=2, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=16,
                            mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8, mamba_expand=2), "outside the attention mask",
              None),
    "jamba": ("jamba", dict(_DECODER, num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1,
                            expert_layer_period=2, expert_layer_offset=1, num_experts=2, mamba_d_state=8,
                            mamba_dt_rank=4), "outside the attention mask", None),
    "falcon_h1": ("falcon_h1", dict(_DECODER, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                                    mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8),
                  "outside the attention mask", None),
    "lfm2": ("lfm2", dict(_DECODER, num_hidden_layers=2, layer_types=["conv", "full_attention"]),
             "outside the attention mask", None),
    "qwen3_next": ("qwen3_next", dict(_DECODER, num_hidden_layers=2, head_dim=16,
                                      layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
                                      linear_num_key_heads=1, linear_key_head_dim=16, linear_value_head_dim=16,
                                      num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=32), "outside the attention mask", None),
    "gemma3": ("gemma3_text", dict(_DECODER, head_dim=16, sliding_window=4), "sliding-window", None),
    "llama4": ("llama4_text", dict(_DECODER, head_dim=16, attention_chunk_size=4, num_local_experts=2,
                                   intermediate_size_mlp=64), "chunked attention", None),
    "mpt": ("mpt", dict(d_model=32, n_heads=2, n_layers=1), "ALiBi", None),
}
# name -> how sampling hands each prompt's cache to its K samples where it is not "static"
# (utils/sampling.py: prompt_cache_kind): "dynamic" repeats it in place, None feeds each prompt K times
SAMPLING_CACHE = {"qwen2 sliding": "dynamic", "mistral sliding": "dynamic", "gemma2": "dynamic",
                  "gpt_neo global": "dynamic", "gpt_neo local": "dynamic", "falcon": "dynamic",
                  "falcon alibi": "dynamic", "bloom": "dynamic", "gemma3": "dynamic", "llama4": "dynamic",
                  "mpt": None, "bamba": None, "jamba": None, "falcon_h1": None, "lfm2": None, "qwen3_next": None}


def build(name):
    model_type, fields, _, _ = FAMILIES[name]
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()  # sdpa where it has it
    with torch.no_grad():  # untrained heads and norms make near-uniform log-probs; spread them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def group_batch(seed=0, groups=2, k=3):
    """Groups of `k` rows continuing one prompt each (one group's prompts cut on the left), of
    ~10-20 tokens, longer than the sliding and local windows above."""
    rng = random.Random(seed)
    sequences, prompt_lens = [], []
    for g in range(groups):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(6, 10))]
        for i in range(k):
            cut = (0, 1, 2)[i] if g % 2 else 0
            sequences.append(prompt[cut:] + [rng.randrange(1, VOCAB) for _ in range(rng.randint(3, 8))])
            prompt_lens.append(len(prompt) - cut)
    batch = pad_sequences(sequences, prompt_lens, 0)
    batch["group_sizes"] = [k] * groups
    return batch


def logps_and_grads(model, logps_fn, batch):
    model.zero_grad(set_to_none=True)
    logps = logps_fn(model, batch)
    (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()  # rows weighted differently
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def max_difference(model, fast, batch):
    """(max |fast - plain| / scale, the tensor's name) over the log-probs and every parameter's
    gradient, where a tensor's scale is its largest |plain entry|, at least 1."""
    plain = logps_and_grads(model, lambda m, b: model_sequence_logprobs(m, b, TEMPERATURE, fused=False), batch)
    result = logps_and_grads(model, fast, batch)
    assert result[1].keys() == plain[1].keys() and plain[1]
    pairs = [("log-probs", result[0], plain[0])] + [(n, result[1][n], plain[1][n]) for n in plain[1]]
    return max((float((got - want).abs().max()) / max(1.0, float(want.abs().max())), name)
               for name, got, want in pairs)


def forced_sharing(model, batch):
    """The packed forward even where sharing_support refuses it (to show what auto avoids)."""
    hidden, labels, loss_mask = shared_prefix_hidden_states(HeadInput(model), batch)
    return sequence_logprobs(model.get_output_embeddings()(hidden), labels, loss_mask, TEMPERATURE)


@pytest.fixture(scope="module")
def batch():
    return group_batch()


@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_sharing_is_exact_or_refused(name, batch, capsys):
    model = build(name)
    expected = FAMILIES[name][2]
    reason = sharing_support(model)
    if expected is None:
        assert reason is None
        assert resolve_prefix_sharing("auto", model) == "auto"  # shares the batches packing makes cheaper
        diff, where = max_difference(model, lambda m, b: model_sequence_logprobs(m, b, TEMPERATURE, fused=False,
                                                                                  prefix_sharing=True), batch)
        assert diff <= RTOL, f"{name}: shared differs from unshared by {diff:.2e} of the scale of {where}"
    else:
        assert reason is not None and expected in reason, reason
        assert resolve_prefix_sharing("auto", model) is False
        assert capsys.readouterr().out.strip() == f"prefix sharing off for the model: {reason}"


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_head_is_exact_or_falls_back(name, batch):
    model = build(name)
    expected = FAMILIES[name][3]
    head, why = lm_head(model)
    if expected is None:
        assert why is None and head is model.get_output_embeddings()
        diff, where = max_difference(model, lambda m, b: model_sequence_logprobs(m, b, TEMPERATURE, fused=True),
                                     batch)
        assert diff <= RTOL, f"{name}: fused differs from unfused by {diff:.2e} of the scale of {where}"
    else:
        assert head is None and expected in why


@pytest.mark.parametrize("name", FAMILIES)
def test_sampling_prefills_each_prompt_once_and_draws_what_generate_draws(name):
    """For one seed, generate_once_per_prompt draws the ids plain generate(num_return_sequences=K)
    draws, with the same per-token log-probs, on left-padded prompts of 9, 1 and 5 tokens (the
    1-token one shares only padding), on the cache kind the family is meant to take."""
    from helpers import plain_and_once_draws
    from transformers import GenerationConfig
    from utils.sampling import prompt_cache_kind

    model = build(name)
    assert prompt_cache_kind(model) == SAMPLING_CACHE.get(name, "static")
    rng = random.Random(1)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (9, 1, 5)]
    width = max(map(len, prompts))
    batch = {"input_ids": torch.tensor([[0] * (width - len(p)) + p for p in prompts]),
             "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])}
    config = GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=6,
                              num_return_sequences=3, eos_token_id=[2], pad_token_id=0, use_cache=True)
    drawn = plain_and_once_draws(model, batch, config, TEMPERATURE)
    assert torch.equal(drawn["once"][0], drawn["plain"][0]), name
    torch.testing.assert_close(drawn["once"][1], drawn["plain"][1], atol=ATOL, rtol=0)


def matrix():
    """The table of the report: family, what auto chose and each path's max |diff| (of the scale)."""
    batch = group_batch()
    rows = ["| family | prefix sharing (auto) | max diff shared | fused head | max diff fused |",
            "|---|---|---|---|---|"]
    for name in FAMILIES:
        model = build(name)
        reason = sharing_support(model)
        try:
            shared = f"{max_difference(model, forced_sharing, batch)[0]:.1e}"
        except Exception as err:  # noqa: BLE001 (a refused family may not even run packed)
            shared = f"{type(err).__name__}"
        why = lm_head(model)[1]
        fused = (max_difference(model, lambda m, b: model_sequence_logprobs(m, b, TEMPERATURE), batch)[0]
                 if why is None else None)
        rows.append(f"| {name} | {'shared' if reason is None else 'unshared: ' + reason} | "
                    f"{shared}{'' if reason is None else ' (forced)'} | "
                    f"{'fused' if why is None else 'fallback: ' + why} | {'-' if fused is None else f'{fused:.1e}'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(print(matrix()))
