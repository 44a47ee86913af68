"""Dynamic-padding collators: a batch is padded to its own longest sequence, on the right.

Every collator returns `input_ids`, `attention_mask` and `loss_mask` ([N, T]); `loss_mask` is
1 on the tokens whose log-prob is trained (the completion), aligned with `input_ids`.
"""
import torch


def pad_sequences(sequences, prompt_lens, pad_token_id):
    """Right-pad token lists into input_ids / attention_mask / loss_mask tensors."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(zip(sequences, prompt_lens)):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
        loss_mask[row, prompt_len:len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


class SFTCollator:
    """{input_ids, prompt_len} examples -> one padded batch; `train_on_prompt` puts the loss
    on the prompt tokens too (all but the first, which nothing predicts)."""

    def __init__(self, pad_token_id, train_on_prompt=False):
        self.pad_token_id = pad_token_id
        self.train_on_prompt = train_on_prompt

    def __call__(self, examples):
        prompt_lens = [0 if self.train_on_prompt else e["prompt_len"] for e in examples]
        return pad_sequences([e["input_ids"] for e in examples], prompt_lens, self.pad_token_id)


class PairCollator:
    """B examples of K sequences each ({input_ids [K][T], prompt_lens [K]}) -> B*K padded rows,
    group-major: a reward model's (chosen, rejected) pairs become rows c0, r0, c1, r1, ..., so
    one forward scores both and `.view(B, 2)` splits them again. `group_sizes` ([B] ints, the
    K of every example) tells prefix sharing which rows continue one prompt."""

    def __init__(self, pad_token_id):
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        sequences = [ids for e in examples for ids in e["input_ids"]]
        prompt_lens = [n for e in examples for n in e["prompt_lens"]]
        batch = pad_sequences(sequences, prompt_lens, self.pad_token_id)
        batch["group_sizes"] = [len(e["input_ids"]) for e in examples]
        return batch


class AlignmentCollator(PairCollator):
    """B groups of K candidates -> B*K padded sequences (group-major) plus `rewards` [B, K],
    and `ref_logps` [B, K] when the examples carry cached reference log-probs."""

    def __call__(self, examples):
        batch = super().__call__(examples)
        batch["rewards"] = torch.tensor([e["rewards"] for e in examples], dtype=torch.float32)
        if "ref_logps" in examples[0]:
            batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples], dtype=torch.float32)
        return batch


class ClassCollator:
    """{input_ids, label} examples -> one padded batch plus `labels` [N] (float, for BCE)."""

    def __init__(self, pad_token_id):
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        batch = pad_sequences([e["input_ids"] for e in examples], [0] * len(examples), self.pad_token_id)
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.float32)
        return batch
