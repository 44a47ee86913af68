"""Supervised fine-tuning: maximum likelihood of the chosen completion given the prompt.

    deepspeed src/train_sft.py --model_name_or_path gpt2-large \\
        --data_name_path imdb/sft:data/imdb --output_dir models/gpt2-large_imdb/sft

Trains on `sft` records (`pref` records work too: their prompt + chosen). The loss of a
micro batch is the mean negative log-likelihood per completion token (EOS included),
token-weighted across its sequences:

    loss = -sum_i log pi(y_i | x_i) / sum_i |y_i|

with `--train_on_prompt` the prompt tokens count as well (all but the first, which nothing
predicts). Evaluation reports the loss and the perplexity exp(total NLL / total tokens) over
the whole eval set. Dropout stays as the model's config has it unless --disable_dropout.
"""
import torch

from utils.data.collators import SFTCollator
from utils.data.encoders import SFTEncoder
from utils.fileio import InputError, cli_main
from utils.logprobs import add_fused_logprobs_arg, model_sequence_logprobs
from utils.model_utils import apply_lora, load_causal_lm
from utils.args import add_disable_dropout_arg, add_training_args, base_parser, check_training_args
from utils.training_setup import TrainingSetup
from utils.process_exit import run_and_exit
from utils.training import train

SFT_KINDS = ("sft", "pref")


def parse_args(argv=None):
    parser = add_training_args(base_parser(__doc__.split("\n\n")[0]))
    g = parser.add_argument_group("sft")
    g.add_argument("--train_on_prompt", action="store_true",
                   help="put the loss on the prompt tokens too, not only on the completion")
    add_disable_dropout_arg(g)
    add_fused_logprobs_arg(g)
    args = parser.parse_args(argv)
    check_training_args(args)
    return args


def sft_loss(model, batch, fused=True):
    """(mean NLL per trained token, {nll_sum, num_tokens}) of a collated SFT batch.

    The NLL is minus the sequences' log-probs (fused or not, as --fused_logprobs says), which
    sum over loss_mask positions 1..T-1 (position 0 has no predecessor), so the token count
    skips column 0 too."""
    nll_sum = -model_sequence_logprobs(model, batch, fused=fused).sum()
    num_tokens = batch["loss_mask"][:, 1:].sum()
    return nll_sum / num_tokens, {"nll_sum": nll_sum.detach(), "num_tokens": num_tokens}


def perplexity(metrics):
    """Replace the per-batch means of nll_sum and num_tokens by exp(total NLL / total tokens):
    both means share one divisor, so their ratio is the token-weighted NLL of all batches."""
    metrics = dict(metrics)
    nll_per_token = metrics.pop("nll_sum") / metrics.pop("num_tokens")
    metrics["perplexity"] = torch.tensor(nll_per_token, dtype=torch.float64).exp().item()  # inf, not an error
    return metrics


@cli_main
def main(argv=None):
    args = parse_args(argv)
    setup = TrainingSetup(args)
    for dataset in setup.raw:
        if dataset.kind not in SFT_KINDS:
            raise InputError(f"dataset {dataset.name}/{dataset.kind}: SFT trains on sft data "
                             f"(or pref: prompt + chosen), got kind {dataset.kind!r}")
    splits = setup.datasets({"stage": "sft"}, SFTEncoder)

    model = load_causal_lm(args.model_name_or_path, setup.tokenizer, args.dtype, args.trust_remote_code,
                           disable_dropout=args.disable_dropout)
    if args.lora_dim > 0:
        model = apply_lora(model, args.lora_dim, args.lora_alpha, args.lora_module_name, args.only_optimize_lora)

    collator = SFTCollator(setup.tokenizer.pad_token_id, args.train_on_prompt)
    def compute_loss(model, batch):
        return sft_loss(model, batch, args.fused_logprobs)

    train(args, model, setup.tokenizer, splits["train"][0], splits["test"][0], collator, compute_loss, setup.device,
          summarize_metrics=perplexity)


if __name__ == "__main__":
    run_and_exit(main)
