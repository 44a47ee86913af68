"""Oracle classifier: a one-logit AutoModelForSequenceClassification trained on labelled text.

    deepspeed src/train_class.py --model_name_or_path gpt2-large \\
        --data_name_path imdb/class:data/imdb_class --output_dir models/gpt2-large_imdb/class

Trains on `class` records {text, label} (label 1 = positive, 0 = negative). Each text + EOS is
cut on the right to --max_seq_len and scored by the model's single logit z, read where
transformers reads it (the last non-pad token, as for the reward model: see train_rm.py). The
loss is the binary cross-entropy of sigmoid(z) against the label,

    loss = -mean [ y log sigmoid(z) + (1 - y) log sigmoid(-z) ]

so z is the classifier's log-odds log p(positive | text) - log p(negative | text): the oracle
reward of the IMDB experiment (inference_class.py). Metrics: `accuracy` (sign of z agrees with
the label) and `logodds/positive`, `logodds/negative` (mean z over each class, per batch;
0 when a batch holds none of that class).

Why one logit rather than two labels with a softmax: the two-label head's log-odds is the
difference of its logits, the same function with one redundant direction; one logit saves it
and makes the oracle a model of the reward-model format, loadable and scorable by everything
that reads reward models (load_reward_model, inference_rm.py, `.logits[:, 0]`).
"""
import torch
import torch.nn.functional as F

from utils.data.collators import ClassCollator
from utils.data.encoders import ClassEncoder
from utils.fileio import cli_main
from utils.model_utils import trainable_reward_model
from utils.args import add_disable_dropout_arg, add_training_args, base_parser, check_training_args
from utils.training_setup import TrainingSetup
from utils.process_exit import run_and_exit
from utils.training import train


def parse_args(argv=None):
    parser = add_training_args(base_parser(__doc__.split("\n\n")[0]))
    g = parser.add_argument_group("classifier")
    add_disable_dropout_arg(g)
    args = parser.parse_args(argv)
    check_training_args(args)
    return args


def _class_mean(values, mask):
    """Mean of `values` where `mask` holds; 0 when it holds nowhere (a batch without that class)."""
    count = mask.sum()
    return torch.where(count > 0, (values * mask).sum() / count.clamp(min=1), torch.zeros_like(count))


def classification_loss(model, batch):
    """Binary cross-entropy of the one-logit classifier on a ClassCollator batch."""
    logodds = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
    labels = batch["labels"]
    loss = F.binary_cross_entropy_with_logits(logodds, labels)
    return loss, {
        "accuracy": ((logodds > 0).float() == labels).float().mean(),
        "logodds/positive": _class_mean(logodds, labels),
        "logodds/negative": _class_mean(logodds, 1 - labels),
    }


@cli_main
def main(argv=None):
    args = parse_args(argv)
    setup = TrainingSetup(args)
    splits = setup.datasets({"stage": "class"}, ClassEncoder)

    model = trainable_reward_model(args, setup.tokenizer)

    train(args, model, setup.tokenizer, splits["train"][0], splits["test"][0],
          ClassCollator(setup.tokenizer.pad_token_id), classification_loss, setup.device)


if __name__ == "__main__":
    run_and_exit(main)
