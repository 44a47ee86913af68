"""Raw datasets: where records come from, before tokenisation.

Every dataset is addressed as `NAME/KIND:PATH` (README: Data formats). KIND is one of the
standard record formats below; any NAME works with them (`JsonDataset` reads
`PATH/{train,test}.json[l]`). A custom format is a `PromptRawDataset` subclass registered
under its own name, in a module passed with `--dataset_module`:

    from utils.data.raw_datasets import PromptRawDataset, register_dataset

    @register_dataset("my_tsv")
    class MyTsv(PromptRawDataset):
        kind = "pref"
        def load_split(self, split):          # raw samples, any shape
            return [line.split("\\t") for line in open(f"{self.path}/{split}.tsv")]
        def get_prompt(self, sample): return sample[0]
        def get_chosen(self, sample): return sample[1]
        def get_rejected(self, sample): return sample[2]

and used as `--dataset_module my_datasets.py --data_name_path my_tsv:/data/tsv`.
"""
import math
import os

from ..fileio import InputError, read_json_records, where

# The standard record of each kind: field -> expected type.
KIND_FIELDS = {
    "sft": {"prompt": str, "chosen": str},
    "pref": {"prompt": str, "chosen": str, "rejected": str},
    "gen": {"prompt": str, "completions": list},
    "rw": {"prompt": str, "completions": list, "rewards": list},
    "class": {"text": str, "label": int},
}
KINDS = tuple(KIND_FIELDS)
SPLITS = ("train", "test")

_REGISTRY = {}


def register_dataset(name):
    """Class decorator: make `name` usable in `--data_name_path name[/kind]:path`."""

    def decorate(cls):
        if not issubclass(cls, PromptRawDataset):
            raise TypeError(f"{cls.__name__} must subclass PromptRawDataset")
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_datasets():
    return sorted(_REGISTRY)


class PromptRawDataset:
    """A named source of prompt/completion records of one standard kind.

    Subclasses override `load_split` (raw samples of a split, in any shape) and, when the
    samples are not already standard records, the `get_*` accessors. `records(split)` turns
    raw samples into validated standard records, so every stage sees one format.
    """

    kind = None  # one of KINDS; a subclass fixes it, or it comes from NAME/KIND

    def __init__(self, name, path, kind=None):
        self.name = name
        self.path = path
        self.kind = kind or self.kind
        if self.kind not in KIND_FIELDS:
            raise InputError(f"dataset {name!r}: unknown kind {self.kind!r}; standard kinds are {', '.join(KINDS)}")

    # -- what a subclass provides ------------------------------------------------------
    def load_split(self, split):
        """Raw samples of `split` ("train" or "test")."""
        raise NotImplementedError

    def source(self, split):
        """Where `split` comes from, for error messages (a file path if there is one)."""
        return f"{self.name}:{self.path} ({split})"

    def data_files(self, split):
        """Files whose content determines `split`; the tokenisation cache is keyed on them.
        Return [] when unknown: the cache is then keyed on the records themselves."""
        return []

    def get_prompt(self, sample):
        return sample["prompt"]

    def get_chosen(self, sample):
        return sample["chosen"]

    def get_rejected(self, sample):
        return sample["rejected"]

    def get_completions(self, sample):
        return sample["completions"]

    def get_rewards(self, sample):
        return sample["rewards"]

    def get_text(self, sample):
        return sample["text"]

    def get_label(self, sample):
        return sample["label"]

    # -- DeepSpeed-Chat-style entry points -----------------------------------------------
    def get_train_data(self):
        return self.records("train")

    def get_eval_data(self):
        return self.records("test")

    def records(self, split):
        """Validated standard records of `split` (a list of dicts with KIND_FIELDS[kind])."""
        source = self.source(split)
        out = []
        for index, sample in enumerate(self.load_split(split)):
            record = {}
            for field in KIND_FIELDS[self.kind]:
                try:
                    record[field] = getattr(self, f"get_{field}")(sample)
                except (KeyError, IndexError, TypeError):
                    raise InputError(f"{where(source, index, field)}: missing field") from None
            validate_record(record, self.kind, source, index)
            out.append(record)
        if not out:
            raise InputError(f"{source}: no records")
        return out


def validate_record(record, kind, source, index):
    """Check one standard record's field types and values; raise InputError naming the field."""
    for field, expected in KIND_FIELDS[kind].items():
        value = record[field]
        at = where(source, index, field)
        if expected is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"{at}: expected an integer, got {type(value).__name__}")
        elif not isinstance(value, expected):
            raise InputError(f"{at}: expected {expected.__name__}, got {type(value).__name__}")
        if field in ("chosen", "rejected", "text") and value == "":
            raise InputError(f"{at}: empty text; drop the record or fill it in")
    if "completions" in record:
        completions = record["completions"]
        at = where(source, index, "completions")
        if not completions:
            raise InputError(f"{at}: empty list")
        for j, completion in enumerate(completions):
            if not isinstance(completion, str):
                raise InputError(f"{at}[{j}]: expected str, got {type(completion).__name__}")
            if completion == "":
                raise InputError(f"{at}[{j}]: empty completion; drop it or fill it in")
    if "rewards" in record:
        rewards = record["rewards"]
        at = where(source, index, "rewards")
        if len(rewards) != len(record["completions"]):
            raise InputError(f"{at}: {len(rewards)} rewards for {len(record['completions'])} completions")
        for j, reward in enumerate(rewards):
            if isinstance(reward, bool) or not isinstance(reward, (int, float)):
                raise InputError(f"{at}[{j}]: expected a number, got {type(reward).__name__}")
            try:
                reward = float(reward)
            except OverflowError:  # an int beyond float range
                reward = math.inf
            if not math.isfinite(reward):
                raise InputError(f"{at}[{j}]: non-finite reward {rewards[j]!r:.40}")
        record["rewards"] = [float(r) for r in rewards]


class JsonDataset(PromptRawDataset):
    """Standard records in `PATH/train.json` / `PATH/test.json` (a JSON list) or `.jsonl`."""

    def split_file(self, split):
        for ext in (".json", ".jsonl"):
            candidate = os.path.join(self.path, split + ext)
            if os.path.isfile(candidate):
                return candidate
        raise InputError(
            f"{self.path}: no {split}.json or {split}.jsonl for dataset {self.name}/{self.kind}; "
            f"check the path in --data_name_path")

    def source(self, split):
        return self.split_file(split)

    def data_files(self, split):
        return [self.split_file(split)]

    def load_split(self, split):
        return read_json_records(self.split_file(split))


def get_raw_dataset(name_kind, path):
    """The dataset for `NAME[/KIND]` at `path`: a registered class or the standard JSON one."""
    name, _, kind = name_kind.partition("/")
    if name in _REGISTRY:
        return _REGISTRY[name](name, path, kind or None)
    if kind in KIND_FIELDS:
        return JsonDataset(name, path, kind)
    if kind:
        raise InputError(f"dataset {name_kind!r}: unknown kind {kind!r}; standard kinds are {', '.join(KINDS)}")
    registered = ", ".join(registered_datasets()) or "none"
    raise InputError(
        f"unknown dataset {name!r} (registered: {registered}); name a standard kind as "
        f"NAME/KIND:PATH with KIND one of {', '.join(KINDS)}, or register a class with --dataset_module")
