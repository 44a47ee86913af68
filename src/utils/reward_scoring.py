"""A reward model's score of every row of a collated batch, read where transformers reads it.

A one-label sequence classifier scores a row at its last token that is not the pad id (the
transformers rule; train_rm.py says why). With prefix sharing the rows of one
group (a pref pair, the completions of a `gen` record) are scored in one packed row
(utils/prefix_sharing.py), read at the same positions.
"""
import torch

from .heads import unwrap
from .prefix_sharing import packed_layout, shared_prefix_hidden_at


def last_token_positions(input_ids, pad_token_id):
    """Where a transformers sequence classifier reads its score: the rightmost token that is
    not the pad id (position 0 if there is none)."""
    index = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (index * (input_ids != pad_token_id)).argmax(-1)


def shared_prefix_scores(model, batch, packed=None):
    """A one-label sequence classifier's score of every row, [N], as its own forward reads it
    (at the last non-pad token), with each group's prompt encoded once."""
    hf = unwrap(model)
    last = last_token_positions(batch["input_ids"], hf.config.pad_token_id)[:, None]
    return hf.score(shared_prefix_hidden_at(model, batch, last, packed)[:, 0])[:, 0]


def reward_scores(model, batch, prefix_sharing=False):
    """A one-label sequence classifier's score of every row of a collated batch, [N], read at
    the last non-pad token; with `prefix_sharing` (auto: where it saves work, see
    packed_layout), each group's prompt is encoded once."""
    packed = packed_layout(model, batch, prefix_sharing)
    if packed is not None:
        return shared_prefix_scores(model, batch, packed)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
