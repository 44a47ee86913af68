"""The encoders: one stage's training examples from a batch of records (a `datasets.map` function).

Each encoder checks every record of a split first, then tokenises by the rule of
utils/data/tokenisation.py.
"""
import sys

from .chat import is_conversation
from .tokenisation import tokenizer_fingerprint
from ..fileio import InputError, where


class Encoder:
    """Turns a batch of standard records into training examples (a `datasets.map` function).

    `check(record, index)` validates one record first, over the whole split, so a bad record
    stops the run before any tokenisation starts and nothing half-done is left behind.
    """

    def __init__(self, tokenisation, source, kind):
        self.tokenisation, self.source, self.kind = tokenisation, source, kind
        self.warned = False

    def check(self, record, index):
        if is_conversation(record["prompt"]):
            self.tokenisation.check_conversation(record, self.kind, self.source, index)
        elif not record["prompt"].strip() and self.tokenisation.num_prefix == 0:
            raise InputError(f"{where(self.source, index, 'prompt')}: empty prompt and the tokenizer adds no BOS; "
                             "give every record a prompt")
        if record.get("completion_ids") is None:
            return
        if not self.tokenisation.uses_ids(record):
            if not self.warned:  # once per file: every record of it usually shares the reason
                self.warned = True
                print(f"warning: {where(self.source, index, 'tokenizer_fingerprint')}: the completion ids come from "
                      f"tokenizer {record['tokenizer_fingerprint']} (of {record.get('source_model', '?')}), not "
                      f"this one ({tokenizer_fingerprint(self.tokenisation.tokenizer)}); its records are scored from "
                      "their text + EOS, which is not the sequence that was sampled", file=sys.stderr, flush=True)
            return
        vocab = len(self.tokenisation.tokenizer)
        texts = record.get("completions") or []
        if len(texts) != len(record["completion_ids"]):
            raise InputError(f"{where(self.source, index, 'completion_ids')}: {len(record['completion_ids'])} lists of "
                             f"ids for {len(texts)} completions")
        for j, ids in enumerate(record["completion_ids"]):
            if max(ids) >= vocab:
                raise InputError(f"{where(self.source, index, 'completion_ids')}[{j}]: token id {max(ids)} is outside "
                                 f"the tokenizer's vocabulary of {vocab}")
        for j, ids in enumerate(record["completion_ids"]):
            text = texts[j]["content"] if isinstance(texts[j], dict) else texts[j]
            if not self.tokenisation.ids_spell(ids, text):
                raise InputError(f"{where(self.source, index, f'completions[{j}]')}: the text is not what its "
                                 f"completion_ids decode to (edited after sampling?); the ids are what is scored, "
                                 "so fix both, or drop completion_ids and tokenizer_fingerprint to score the text")


class SFTEncoder(Encoder):
    """record -> {input_ids, prompt_len}: one prompt + chosen sequence."""

    def __call__(self, batch, indices):
        prompts = self.tokenisation.prompts(batch["prompt"])
        completions = self.tokenisation.completions(batch["chosen"], batch["prompt"])
        joined = [self.tokenisation.join(p, c) for p, c in zip(prompts, completions)]
        return {"input_ids": [ids for ids, _ in joined], "prompt_len": [n for _, n in joined]}


class AlignmentEncoder(Encoder):
    """record -> C / K groups of K candidates {input_ids [K][T], prompt_lens [K], rewards [K]}.

    `pref` records become the pair (chosen, rejected) with rewards (1, 0). With pref labels
    every group needs a single best reward, since the winner is argmax r. `group_check`, if
    given, says why a group's rewards cannot train the loss (a string), or None where they can.
    """

    def __init__(self, tokenisation, source, kind, num_contrastive, pref_labels, group_check=None):
        if kind not in ("pref", "rw"):
            raise InputError(f"{source}: alignment needs pref or rw data, got kind {kind!r}")
        super().__init__(tokenisation, source, kind)
        self.num_contrastive, self.pref_labels, self.group_check = num_contrastive, pref_labels, group_check

    def candidates(self, record):
        if self.kind == "pref":
            return [record["chosen"], record["rejected"]], [1.0, 0.0]
        return record["completions"], record["rewards"]

    def check(self, record, index):
        super().check(record, index)
        texts, rewards = self.candidates(record)
        k = self.num_contrastive
        at = where(self.source, index, "completions" if self.kind == "rw" else "rejected")
        if len(texts) < k:
            pair = ("; pref records hold one pair (chosen, rejected), so no ranking of more: use --num_contrastive 2, "
                    "or rw data with K scored candidates") if self.kind == "pref" else ""
            raise InputError(f"{at}: {len(texts)} candidates, fewer than --num_contrastive {k}{pair}")
        if len(texts) % k:
            raise InputError(f"{at}: {len(texts)} candidates is not a multiple of --num_contrastive {k}; "
                             "they are split into groups of K")
        for start in range(0, len(texts), k) if self.pref_labels else ():
            group = rewards[start:start + k]
            if group.count(max(group)) > 1:
                raise InputError(f"{where(self.source, index, 'rewards')}: candidates {start}..{start + k - 1} tie "
                                 "for the best reward; a pref loss needs one winner (use an -rw loss or drop the tie)")
        for start in range(0, len(texts), k) if self.group_check else ():
            reason = self.group_check(rewards[start:start + k])
            if reason:
                raise InputError(f"{where(self.source, index, 'rewards')}: candidates {start}..{start + k - 1}: {reason}")

    def __call__(self, batch, indices):
        out = {"input_ids": [], "prompt_lens": [], "rewards": []}
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        for prompt_ids, record in zip(self.tokenisation.prompts(batch["prompt"]), records):
            texts, rewards = self.candidates(record)
            completions = self.tokenisation.record_completions(record, texts)
            for start in range(0, len(texts), self.num_contrastive):
                group = slice(start, start + self.num_contrastive)
                joined = self.tokenisation.join_group(prompt_ids, completions[group])
                out["input_ids"].append([ids for ids, _ in joined])
                out["prompt_lens"].append([n for _, n in joined])
                out["rewards"].append(rewards[group])
        return out


class PairEncoder(Encoder):
    """pref record -> {input_ids [2][T], prompt_lens [2]}: (prompt + chosen, prompt + rejected)
    by the Tokenisation rule (one group: the prompt is cut once, for the longer of the two),
    for the pairwise reward-model loss."""

    def __init__(self, tokenisation, source, kind):
        if kind != "pref":
            raise InputError(f"{source}: a reward model trains on pref data (prompt, chosen, rejected), "
                             f"got kind {kind!r}")
        super().__init__(tokenisation, source, kind)

    def __call__(self, batch, indices):
        prompts = self.tokenisation.prompts(batch["prompt"])
        chosen = self.tokenisation.completions(batch["chosen"], batch["prompt"])
        rejected = self.tokenisation.completions(batch["rejected"], batch["prompt"])
        pairs = [self.tokenisation.join_group(p, [c, r]) for p, c, r in zip(prompts, chosen, rejected)]
        return {"input_ids": [[ids for ids, _ in pair] for pair in pairs],
                "prompt_lens": [[n for _, n in pair] for pair in pairs]}


class ClassEncoder(Encoder):
    """class record -> {input_ids, label}: the text + EOS, cut on the right to max_seq_len.

    The EOS ends the text as it ends the completions the classifier later scores (scoring
    joins prompt + completion + EOS by the training rule, or takes a sample's ids, which end
    with EOS unless --max_new_tokens cut it), so the classifier sees texts much the way it will
    be asked about them. Labels are 0 or 1 (1 = positive)."""

    def __init__(self, tokenisation, source, kind):
        if kind != "class":
            raise InputError(f"{source}: a classifier trains on class data (text, label), got kind {kind!r}")
        super().__init__(tokenisation, source, kind)

    def check(self, record, index):
        if record["label"] not in (0, 1):
            raise InputError(f"{where(self.source, index, 'label')}: expected 0 or 1, got {record['label']}")

    def __call__(self, batch, indices):
        eos, limit = self.tokenisation.tokenizer.eos_token_id, self.tokenisation.max_seq_len
        texts = self.tokenisation.tokenizer(list(batch["text"]))["input_ids"]
        return {"input_ids": [(ids + [eos])[:limit] for ids in texts], "label": list(batch["label"])}
