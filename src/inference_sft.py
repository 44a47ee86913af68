"""Sampling stage: draw completions of a dataset's prompts from a model, as `gen` data.

    deepspeed --include localhost:0,1 src/inference_sft.py --model_name_or_path models/x_imdb/sft \\
        --data_name_path imdb/sft:data/imdb --split train --return_num 4 --temp 0.8 \\
        --max_new_tokens 200 --max_length 512           # writes data/imdb_sft/train.json

Only the records' prompts are used (any kind with a prompt: sft, pref, gen, rw). Each prompt
is tokenised as training tokenises it (a conversation rendered with the chat template and its
generation prompt) and cut on the left (keeping a BOS) to
max_length - max_new_tokens tokens, so every prompt fits and none is dropped; the record keeps
the full prompt text. Generation is batched with left padding and the KV cache, each prompt's
cache computed once and shared by its --return_num samples (the sampler: utils/sampling.py),
sharded across ranks and resumable (utils/sharding.py). The checkpoint's generation_config is ignored: what
is sampled is exactly what the flags say.

A completion ends at the first stop token: EOS, and for conversational prompts the chat
template's end-of-turn token too (the completion is then written as an assistant message
{"role": "assistant", "content": text}). Each record keeps what was sampled, token for token,
beside the decoded text: per completion "completion_ids", the drawn ids up to and with the
first stop token (or all --max_new_tokens of them when none was drawn), and "stop_token", the
stop token drawn or null when --max_new_tokens cut the completion; per record "tokenizer_fingerprint" and "source_model". Every later stage scores
these ids, not the re-tokenised text (decoding then encoding byte-level BPE is not the
identity), and appends no EOS to a completion that did not draw one. Nothing is barred: EOS
may be drawn at the first step, which is a legal, empty completion ("" with ids [EOS]), so a
sample's log-prob is the model's own.

--save_logps stores per completion "logps": log pi^temp(completion_ids | prompt) summed over
exactly those ids, from the sampler's own distributions, with "temp" and "scored_tokens" as
calc_logprobs writes them. calc_logprobs on the same model and --temp gives the same numbers
when its --max_gen_len is at least --max_new_tokens and --max_seq_len at least --max_length
(then it cuts nothing the sampler did not).

Reproducible: a batch's seed comes from --seed and the position of its first prompt, so the
same command (same --seed, --batch_size and number of ranks) gives the same file, also when
it resumes after a crash. The random draws are those of plain generate(num_return_sequences=K) with
the batch's seed, so files sampled before the prompt was shared hold the same samples up to
float rounding (a draw on a near tie can flip).

--backend vllm samples the same records with a vLLM engine per rank (utils/vllm_sampling.py;
vllm is optional and imported only then): each completion seeded from --seed, its prompt's
position and its number, so its file depends on neither --batch_size nor the number of ranks.
"""
import argparse
import os

# transformers loads before utils, as it always has in this stage: utils/quiet.py's switch of the
# other ranks' progress bars, read when transformers loads, has never applied here
import transformers  # noqa: F401

from utils.data.chat import add_chat_template_arg, is_conversation
from utils.data.tokenisation import Tokenisation, tokenizer_fingerprint
from utils.data.dataset_names import load_raw_datasets
from utils.data.raw_datasets import add_source_args
from utils.fileio import InputError, cli_main
from utils.inference import add_inference_args, check_inference_args, check_output_dir, check_prompts, scored_tokens
from utils.model_utils import check_position_limit, load_causal_lm, load_tokenizer, model_fingerprint
from utils.sampling import batch_seed, fit_prompt, sample, sampling_config, stop_tokens
from utils.sharding import sharded_map
from utils.args import base_parser
from utils.distributed import init_distributed
from utils.process_exit import run_and_exit


def parse_args(argv=None):
    parser = add_inference_args(base_parser(__doc__.split("\n\n")[0]))
    g = parser.add_argument_group("sampling")
    g.add_argument("--model_name_or_path", required=True, help="Hugging Face model directory to sample from")
    g.add_argument("--data_name_path", required=True,
                   help="NAME/KIND:PATH of the prompts; KIND is any kind with a prompt (sft, pref, gen, rw)")
    g.add_argument("--dataset_module", nargs="*", default=[],
                   help="python files or modules to import first, so their @register_dataset classes can be named")
    add_source_args(g)
    add_chat_template_arg(g)
    g.add_argument("--split", default="test", choices=["train", "test"], help="which split's prompts to sample for")
    g.add_argument("--prompt_num", type=int, default=-1, help="sample for the first N prompts of the split; -1: all")
    g.add_argument("--return_num", type=int, default=4, help="completions per prompt")
    g.add_argument("--temp", type=float, default=1.0,
                   help="sampling temperature; 0 is greedy decoding (then --return_num must be 1)")
    g.add_argument("--top_k", type=int, default=0, help="sample from the K most likely tokens only; 0: off")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: the smallest set of mass P; 1.0: off")
    g.add_argument("--max_new_tokens", type=int, default=256, help="tokens drawn per completion at most (EOS included)")
    g.add_argument("--max_length", type=int, default=512,
                   help="prompt + new tokens; longer prompts are cut on the left to max_length - max_new_tokens")
    g.add_argument("--save_logps", action="store_true",
                   help="store each completion's log-prob at --temp, log pi^temp(completion_ids | prompt), as "
                        "\"logps\" (needs --top_k 0 and --top_p 1.0: then the sampler's distribution is the model's)")
    g.add_argument("--output_path", default=None, help="directory of the gen data (SPLIT.json in it); default PATH_sft")
    g = parser.add_argument_group("backend")
    g.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                   help="hf: transformers' generate; vllm: a vLLM engine per rank (needs vllm installed: README: "
                        "Install), the same records, stop rule and --save_logps, seeded per completion")
    g.add_argument("--vllm_tensor_parallel_size", type=int, default=1,
                   help="--backend vllm: devices (ranks) per engine, for a model too large for one; must divide "
                        "the number of ranks")
    g.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.9,
                   help="--backend vllm: fraction of each GPU's memory the engine may take (weights and KV cache); "
                        "on CPU ranks VLLM_CPU_KVCACHE_SPACE (GiB, default 1 here) sizes the cache instead")
    g.add_argument("--vllm_enforce_eager", action=argparse.BooleanOptionalAction, default=True,
                   help="--backend vllm: run the model eagerly, without CUDA graphs or torch.compile (they cost "
                        "minutes of start-up, which pays off only for long sampling runs)")
    args = parser.parse_args(argv)

    check_inference_args(args, "return_num", "max_new_tokens", "max_length", "vllm_tensor_parallel_size")
    if not 0 < args.vllm_gpu_memory_utilization <= 1:
        raise InputError(f"--vllm_gpu_memory_utilization must be in (0, 1], got {args.vllm_gpu_memory_utilization}")
    if args.prompt_num == 0 or args.prompt_num < -1:
        raise InputError(f"--prompt_num must be -1 (all prompts) or at least 1, got {args.prompt_num}")
    if args.temp < 0:
        raise InputError(f"--temp must be non-negative, got {args.temp}")
    if args.temp == 0 and args.return_num > 1:
        raise InputError(f"--temp 0 is greedy decoding: its {args.return_num} completions would all be the same; "
                         "use --return_num 1 or a positive --temp")
    if args.top_k < 0:
        raise InputError(f"--top_k must be non-negative (0: off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise InputError(f"--top_p must be in (0, 1] (1.0: off), got {args.top_p}")
    if args.max_new_tokens >= args.max_length:
        raise InputError(f"--max_new_tokens {args.max_new_tokens} must be smaller than --max_length {args.max_length} "
                         "so that at least one prompt token conditions the completion")
    if args.save_logps and (args.top_k != 0 or args.top_p != 1.0 or args.temp == 0):
        raise InputError("--save_logps needs --top_k 0, --top_p 1.0 and --temp > 0: with filtering (or greedy "
                         "decoding) the sampler's log-probs are not the model's")
    if args.output_path is None:
        args.output_path = args.data_name_path.partition(":")[2].rstrip("/") + "_sft"
    check_output_dir(args.output_path)
    check_position_limit(args.model_name_or_path, args.max_length, "--max_length", args.trust_remote_code)
    return args


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if args.backend == "vllm":  # before anything loads: a missing vllm is one line
        from utils.vllm_sampling import import_vllm
        import_vllm()
    device = init_distributed(args)
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    tokenisation = Tokenisation(tokenizer, args.max_length, args.max_new_tokens, args.chat_template,
                                args.chat_template_date)
    raw = load_raw_datasets([args.data_name_path], args.dataset_module, args.data_split_names, args.columns)[0]
    records = raw.records(args.split)
    if args.prompt_num > 0:
        records = records[:args.prompt_num]
    # only prompts are used
    check_prompts([{"prompt": r["prompt"]} for r in records], tokenisation, raw.source(args.split))
    prompts = [r["prompt"] for r in records]

    stop_ids = stop_tokens(tokenisation, prompts)
    if args.backend == "vllm":
        from utils.vllm_sampling import VllmSampler

        sampler = VllmSampler(args, tokenizer, stop_ids, device)
        draw, map_ranks = sampler.sample, sampler.map_ranks
    else:
        model = load_causal_lm(args.model_name_or_path, tokenizer, args.dtype, args.trust_remote_code,
                               disable_dropout=True).to(device).eval()
        config = sampling_config(args, tokenizer, stop_ids)
        model.generation_config = config  # nothing from the checkpoint's generation_config.json
        map_ranks = {}

        def draw(prompt_ids, first_index):
            return sample(model, tokenizer, prompt_ids, config, batch_seed(args.seed, first_index), args.save_logps)

    fingerprint = tokenizer_fingerprint(tokenisation.tokenizer)  # of every record: the tokenizer its ids belong to

    def process(batch_prompts, first_index):
        prompt_ids = [fit_prompt(tokenisation, ids) for ids in tokenisation.prompts(batch_prompts)]
        ids, stops, texts, logps = draw(prompt_ids, first_index)
        out = [{"prompt": p,
                "completions": [{"role": "assistant", "content": c} for c in t] if is_conversation(p) else t,
                "completion_ids": i, "stop_token": s,
                "tokenizer_fingerprint": fingerprint, "source_model": args.model_name_or_path}
               for p, t, i, s in zip(batch_prompts, texts, ids, stops)]
        for record, prompt, values in zip(out, prompt_ids, logps or ()):
            # what calc_logprobs writes for the same tokens, so eval_kl can take either file
            record.update(logps=values, temp=args.temp,
                          scored_tokens=[scored_tokens(prompt + c, len(prompt)) for c in record["completion_ids"]])
        return out

    settings = {"stage": "sample", "model": model_fingerprint(args.model_name_or_path),
                "tokenisation": tokenisation.settings_fingerprint(),
                **{name: getattr(args, name) for name in ("return_num", "temp", "top_k", "top_p", "max_new_tokens",
                                                          "max_length", "seed", "dtype", "save_logps",
                                                          "backend")}}
    output_file = os.path.join(args.output_path, f"{args.split}.json")
    try:
        merged = sharded_map(prompts, process, output_file, settings, args.batch_size, desc="sampling",
                             save_interval=args.save_interval, **map_ranks)
    finally:
        if args.backend == "vllm":
            sampler.close()
    if merged is not None:
        print(f"wrote {len(merged)} prompts x {args.return_num} completions to {output_file}")


if __name__ == "__main__":
    run_and_exit(main)
