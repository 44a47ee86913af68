"""Run on 2 ranks (deepspeed --num_gpus 2): for a tiny model whose LM head is tied, untied, or
untied with a bias, under ZeRO-3 (every parameter partitioned), one SGD step of the log-probs
through the fused head and one through the unfused path from the same start; rank 0 writes the
log-probs and the whole updated weights of both to OUT (torch.save), {head: {"fused": ...,
"unfused": ...}} for each head named (comma-separated: one launch serves them all).

    deepspeed --num_gpus 2 tests/zero3_heads.py tied,untied,bias OUT
"""
import sys

import deepspeed
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from test_fused_logprobs import random_batch
from utils.process_exit import run_and_exit
from utils.logprobs import model_sequence_logprobs

VOCAB = 300


def build(head):
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                  tie_word_embeddings=head == "tied")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if head == "bias":
        model.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
        torch.nn.init.normal_(model.lm_head.bias)
    return model


def step(head, fused, batch):
    model = build(head)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    logps = model_sequence_logprobs(engine, batch, 0.7, fused=fused)
    engine.backward((logps * torch.linspace(0.5, 1.5, len(logps))).sum())
    engine.step()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return logps.detach(), weights


def main():
    heads, out = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]  # the launcher adds it
    deepspeed.init_distributed("gloo")
    batch = random_batch(VOCAB)
    results = {head: {name: step(head, fused, batch) for name, fused in (("fused", True), ("unfused", False))}
               for head in heads.split(",")}
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    run_and_exit(main)  # a plain exit can abort in gloo teardown (utils.process_exit.run_and_exit)
