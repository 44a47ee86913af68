"""The benchmark's model and data, built locally (no downloads): a Llama-config causal LM of
roughly 10M parameters (``--quick``: a toy one) and `pref` pairs whose prompts are 8-64 tokens
and completions 16-128 tokens (before EOS), uniform, so batches have a realistic length spread.
"""
import json
import os
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from utils.tiny_model import make_tiny_model

SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vel", "or", "pi", "nex", "da", "qui", "bo", "ler", "fa", "zi",
             "mon", "te", "gra", "us", "hel", "ri", "cam", "po", "ster", "in", "wy", "eth", "ju", "sol"]


def word_pool(rng, size):
    return sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(size)})


def text_of_tokens(tokenizer, words, rng, num_tokens, leading_space):
    """Random words until the text is `num_tokens` tokens long (it may end one word over)."""
    out = []
    while True:
        out.append(rng.choice(words))
        text = (" " if leading_space else "") + " ".join(out)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= num_tokens:
            return text


def build(work_dir, model_size, num_train, num_test, seed=0):
    """Write model/, ref_model/ (the model with perturbed weights, for the same-math check) and
    data/{train,test}.json; returns their paths and the token-length statistics of the data."""
    rng = random.Random(seed)
    words = word_pool(rng, 12000)
    corpus = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(6000)]
    model_dir = os.path.join(work_dir, "model")
    make_tiny_model(model_dir, corpus, arch="llama", max_positions=256, seed=seed, **model_size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def record():
        # completions start with a space, so prompt + completion tokenises as prompt, completion
        # (what TRL tokenises) and as the two apart (what exo-align tokenises): the same ids
        return {"prompt": text_of_tokens(tokenizer, words, rng, rng.randint(8, 64), False),
                "chosen": text_of_tokens(tokenizer, words, rng, rng.randint(16, 128), True),
                "rejected": text_of_tokens(tokenizer, words, rng, rng.randint(16, 128), True)}

    data_dir = os.path.join(work_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    lengths = {"prompt": [], "completion": []}
    for split, count in (("train", num_train), ("test", num_test)):
        records = [record() for _ in range(count)]
        with open(os.path.join(data_dir, f"{split}.json"), "w") as f:
            json.dump(records, f)
        for r in records:
            lengths["prompt"].append(len(tokenizer(r["prompt"])["input_ids"]))
            lengths["completion"] += [len(tokenizer(r[k])["input_ids"]) for k in ("chosen", "rejected")]

    ref_dir = os.path.join(work_dir, "ref_model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(ref_dir)
    tokenizer.save_pretrained(ref_dir)
    params = sum(p.numel() for p in model.parameters())
    stats = {k: (min(v), sum(v) / len(v), max(v)) for k, v in lengths.items()}
    return {"model": model_dir, "ref_model": ref_dir, "data": data_dir, "params": params,
            "vocab": len(tokenizer), "lengths": stats}


def build_sampling(work_dir, model_size, num_prompts, prompt_tokens, max_positions, seed=0):
    """A Llama-config model of `model_size` under work_dir/sampling_model and `num_prompts`
    prompts of `prompt_tokens` = [min, max] tokens (uniform) in work_dir/sampling_prompts.json;
    returns their paths and the model's parameter count."""
    rng = random.Random(seed)
    words = word_pool(rng, 12000)
    corpus = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(6000)]
    model_dir = os.path.join(work_dir, "sampling_model")
    make_tiny_model(model_dir, corpus, arch="llama", max_positions=max_positions, seed=seed, **model_size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [text_of_tokens(tokenizer, words, rng, rng.randint(*prompt_tokens), False) for _ in range(num_prompts)]
    prompts_path = os.path.join(work_dir, "sampling_prompts.json")
    with open(prompts_path, "w") as f:
        json.dump(prompts, f)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    return {"model": model_dir, "prompts": prompts_path, "params": params}
