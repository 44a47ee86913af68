"""A tiny, randomly initialised causal LM and its tokenizer, made locally with no hub access.

The test-suite and the CPU quickstart need a real Hugging Face model directory to run the
EXO/DPO pipeline end to end, but must never download anything. `make_tiny_model` writes one:

* a byte-level BPE tokenizer trained with `tokenizers` on the given text (every byte string
  is encodable, "<|endoftext|>" is bos/eos/unk, no pad token unless asked for, nothing is
  added automatically when encoding), wrapped as a `PreTrainedTokenizerFast`;
* a small GPT-2, GPT-NeoX or Llama model sized by the arguments, initialised from a fixed
  seed so that the same arguments give bit-identical weights;
* optionally a chat template in `tokenizer_config.json` with its special tokens: `chatml`
  (`<|im_start|>role\n...<|im_end|>\n`, as Qwen) or `llama3` (`<|start_header_id|>role
  <|end_header_id|>\n\n...<|eot_id|>` after `<|begin_of_text|>`), EOS staying
  `<|endoftext|>`, so that conversational data runs without a download.

Both are saved with `save_pretrained` (weights as safetensors) into a temporary sibling
directory that is renamed into place only when complete.

From the shell: src/make_tiny_model.py.
"""
import itertools
import math
import os
import shutil

import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from .fileio import atomic_dir, commit_dir

EOS = "<|endoftext|>"
ARCHS = ("gpt2", "gpt_neox", "llama")
# style -> (special tokens, BOS or None, Jinja template), after the real models' templates
CHAT_TEMPLATES = {
    "chatml": (["<|im_start|>", "<|im_end|>"], None,
               "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}"),
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>",
               "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
               "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
}


def builtin_corpus():
    """A few dozen varied English sentences built from word lists (deterministic)."""
    subjects = ["The model", "A student", "My friend", "The teacher", "Our assistant", "The old cat"]
    verbs = ["reads", "writes", "explains", "answers", "remembers", "prefers"]
    objects = ["a short story.", "the question carefully.", "every line of the poem.",
               "what the user wants.", "the best response, not the longest.", "how the weather changed."]
    sentences = [f"{s} {v} {o}" for s, v, o in itertools.product(subjects, verbs, objects)][::5]
    sentences += [
        "Human: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
        "Human: Can you help me write an email?\n\nAssistant: Of course! Who is it for?",
        "Numbers like 1, 2, 3 and 42 appear in text, and so do dates such as 2024-05-17.",
        "Is this helpful? I think so; however, it could be clearer and more concise.",
    ]
    return sentences


def train_tokenizer(texts, vocab_size=512, max_positions=256, pad_token=None, chat_template=None):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`."""
    bpe = Tokenizer(models.BPE(unk_token=EOS))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        model_max_length=max_positions,
        clean_up_tokenization_spaces=False,
    )
    if pad_token is not None:
        tokenizer.add_special_tokens({"pad_token": pad_token})
    if chat_template is not None:
        specials, bos, template = CHAT_TEMPLATES[chat_template]
        tokenizer.add_special_tokens({"additional_special_tokens": specials, **({"bos_token": bos} if bos else {})})
        tokenizer.chat_template = template
    return tokenizer


def build_config(arch, vocab_size, hidden_size, num_layers, num_heads, max_positions, token_ids):
    """The model config of `arch`; `token_ids` holds bos/eos (and maybe pad) token ids."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if arch == "gpt2":
        sizes = dict(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions)
    else:
        sizes = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                     intermediate_size=4 * hidden_size, max_position_embeddings=max_positions)
        if arch == "llama":
            sizes["num_key_value_heads"] = num_heads
    return AutoConfig.for_model(arch, vocab_size=vocab_size, **sizes, **token_ids)


def make_tiny_model(out_dir, texts, arch="gpt2", vocab_size=512, hidden_size=64, num_layers=2,
                    num_heads=4, max_positions=256, seed=0, pad_token=None, chat_template=None):
    """Write a tiny random `arch` causal LM and a BPE tokenizer trained on `texts` to `out_dir`.

    Returns `out_dir`. An existing `out_dir` is replaced, atomically.
    """
    out_dir = os.fspath(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size, max_positions, pad_token, chat_template)
    token_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if pad_token is not None:
        token_ids["pad_token_id"] = tokenizer.pad_token_id
    config = build_config(arch, len(tokenizer), hidden_size, num_layers, num_heads, max_positions, token_ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    tmp_dir = atomic_dir(out_dir)
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        commit_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def count_saved_parameters(model_dir):
    """Parameters stored in `model_dir`'s safetensors files (tied weights counted once)."""
    total = 0
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), framework="pt") as f:
                total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total
