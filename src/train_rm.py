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
import torch.nn.functional as F

from utils.data.collators import PairCollator
from utils.data.encoders import PairEncoder
from utils.fileio import cli_main
from utils.model_utils import trainable_reward_model
from utils.prefix_sharing import add_prefix_sharing_arg, resolve_prefix_sharing
from utils.reward_scoring import reward_scores
from utils.sharing_cost import sharing_summary
from utils.args import add_disable_dropout_arg, add_training_args, base_parser, check_training_args
from utils.training_setup import TrainingSetup
from utils.process_exit import run_and_exit
from utils.training import train


def parse_args(argv=None):
    parser = add_training_args(base_parser(__doc__.split("\n\n")[0]))
    g = parser.add_argument_group("reward model")
    add_disable_dropout_arg(g)
    add_prefix_sharing_arg(g)
    args = parser.parse_args(argv)
    check_training_args(args)
    return args


def pairwise_loss(model, batch, prefix_sharing=False):
    """-log sigmoid(r_chosen - r_rejected), averaged over the pairs of a PairCollator batch
    (rows c0, r0, c1, r1, ...), with the metrics TRL reports for reward models; with
    `prefix_sharing` each pair's prompt is encoded once."""
    scores = reward_scores(model, batch, prefix_sharing)
    chosen, rejected = scores.float().view(-1, 2).unbind(-1)
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
    setup = TrainingSetup(args)
    splits = setup.datasets({"stage": "rm"}, PairEncoder)

    model = trainable_reward_model(args, setup.tokenizer)
    prefix_sharing = resolve_prefix_sharing(args.prefix_sharing, model, "the reward model")

    def compute_loss(model, batch):
        return pairwise_loss(model, batch, prefix_sharing)

    train(args, model, setup.tokenizer, splits["train"][0], splits["test"][0],
          PairCollator(setup.tokenizer.pad_token_id), compute_loss, setup.device,
          closing_note=sharing_summary)  # which batches --prefix_sharing auto packed


if __name__ == "__main__":
    run_and_exit(main)
