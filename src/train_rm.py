"""Reward model: a one-label AutoModelForSequenceClassification trained on preference pairs.

    deepspeed src/train_rm.py --model_name_or_path models/gpt2-large_hh/sft \\
        --data_name_path hh/pref:data/hh --output_dir models/gpt2-large_hh/rm

Each `pref` record gives the pair (prompt + chosen, prompt + rejected), tokenised by the
same rule as every stage (EOS appended to the completion); both rows of every pair go
through one forward. With r the scalar score the model reads at the last non-pad token,
the loss is the Bradley-Terry negative log-likelihood

    loss = -mean log sigmoid(r(x, y_chosen) - r(x, y_rejected))

and the metrics are `accuracy` (how often r_chosen > r_rejected), `margin` (mean
r_chosen - r_rejected) and `rewards/chosen`, `rewards/rejected` (mean scores). The score head
starts fresh on a causal LM checkpoint; the result is saved so that
`AutoModelForSequenceClassification.from_pretrained(output_dir)` scores text anywhere.

Where the reward is read: we score with the model's own forward, which takes the rightmost
token that is not `config.pad_token_id` (the transformers rule, also used by TRL and serving
engines). For a model without a pad token, load_tokenizer pads with EOS, so the EOS appended
to every completion counts as padding and the reward is read at the last completion token;
with a real pad token it is read at the EOS. Either way training and any later scoring of the
same tokenisation with `from_pretrained` (inference_rm) read the same position, and with
pad == EOS a text scores the same with or without its trailing EOS. Reading the score at the
attention mask's last position instead would train a position that every other user of the
saved model ignores.
"""
import torch
import torch.nn.functional as F
from transformers.integrations import HfDeepSpeedConfig

from utils.data.collators import PairCollator
from utils.data.data_utils import DEFAULT_CACHE_DIR, PairEncoder, Tokenisation, build_dataset, load_raw_datasets
from utils.ds_utils import train_ds_config
from utils.fileio import cli_main
from utils.model_utils import apply_lora, load_reward_model, load_tokenizer
from utils.training import add_training_args, base_parser, check_training_args, init_distributed, train


def parse_args(argv=None):
    parser = add_training_args(base_parser(__doc__.split("\n\n")[0]))
    g = parser.add_argument_group("reward model")
    g.add_argument("--disable_dropout", action="store_true",
                   help="set every dropout rate of the model to 0 (default: as in the model's config)")
    args = parser.parse_args(argv)
    check_training_args(args)
    return args


def pairwise_loss(model, batch):
    """-log sigmoid(r_chosen - r_rejected), averaged over the pairs of a PairCollator batch
    (rows c0, r0, c1, r1, ...), with the metrics TRL reports for reward models."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    chosen, rejected = logits.float().view(-1, 2).unbind(-1)
    margin = chosen - rejected
    return -F.logsigmoid(margin).mean(), {
        "accuracy": (margin > 0).float().mean(),
        "margin": margin.mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
    }


@cli_main
def main(argv=None):
    args = parse_args(argv)
    device = init_distributed(args)
    world_size = torch.distributed.get_world_size()
    args.data_output_path = args.data_output_path or DEFAULT_CACHE_DIR
    # Keep the ZeRO-3 config alive while the model loads, so transformers partitions it at load.
    hf_ds_config = HfDeepSpeedConfig(train_ds_config(args, world_size)) if args.zero_stage == 3 else None  # noqa: F841

    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    tok = Tokenisation(tokenizer, args.max_seq_len, args.max_gen_len)
    raw = load_raw_datasets(args.data_name_path, args.dataset_module)
    splits = {split: build_dataset(raw, split, tok, args.data_output_path, {"stage": "rm"}, PairEncoder)[0]
              for split in ("train", "test")}

    model = load_reward_model(args.model_name_or_path, tokenizer, args.dtype, args.trust_remote_code,
                              disable_dropout=args.disable_dropout)
    if args.lora_dim > 0:  # SEQ_CLS: peft keeps the fresh score head fully trainable
        model = apply_lora(model, args.lora_dim, args.lora_alpha, args.lora_module_name, args.only_optimize_lora,
                           task_type="SEQ_CLS")

    train(args, model, tokenizer, splits["train"], splits["test"], PairCollator(tokenizer.pad_token_id),
          pairwise_loss, device)


if __name__ == "__main__":
    main()
