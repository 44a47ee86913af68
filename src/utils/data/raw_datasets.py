"""Raw datasets: where records come from, before tokenisation.

Every dataset is addressed as `NAME/KIND:PATH` (docs/data.md). KIND is one of the
standard record formats below; any NAME works with them (`JsonDataset` reads
`PATH/{train,test}` as `.json`, `.jsonl` or `.parquet`, or a `datasets` `save_to_disk`
folder; a PATH that is a Hub dataset id, or a local Hub-style repository, is read with
`datasets.load_dataset`). `--data_split_names` renames the splits (e.g. `train_prefs
test_prefs`) and `--columns` maps our field names to the data's columns. Records may be
conversational (utils/data/chat.py). A custom format is a `PromptRawDataset` subclass
registered under its own name, in a module passed with `--dataset_module`:

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
import re

from .chat import COMPLETION_FIELDS, is_conversation, normalise_conversation
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
# Optional fields of gen and rw records that tie each completion to the exact tokens sampled
# (written by inference_sft, carried by inference_rm); records without them are scored from
# their text. Per completion: completion_ids (the sampled ids, the stop token included when one
# was sampled) and stop_token (that id, or None when --max_new_tokens cut the completion); per
# record: tokenizer_fingerprint (of the tokenizer the ids belong to) and source_model.
TOKEN_FIELDS = ("completion_ids", "stop_token", "tokenizer_fingerprint", "source_model")
OPTIONAL_FIELDS = {"gen": TOKEN_FIELDS, "rw": TOKEN_FIELDS}
SPLITS = ("train", "test")

FIELDS = tuple(dict.fromkeys(f for fields in KIND_FIELDS.values() for f in fields))
SPLIT_FILE_EXTENSIONS = (".json", ".jsonl", ".parquet")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

_REGISTRY = {}


def add_source_args(group):
    """The flags that say how to read the files users have: split names and column names."""
    group.add_argument("--data_split_names", nargs=2, default=None, metavar=("TRAIN", "TEST"),
                       help="the names of the train and test splits in the data (file stems or a Hub "
                            "dataset's splits), e.g. train_prefs test_prefs; default train test")
    group.add_argument("--columns", default=None, metavar="FIELD=COLUMN,...",
                       help="read our fields from differently named columns, e.g. prompt=question,chosen=good")


def parse_columns(spec):
    """'prompt=question,chosen=good' -> {"prompt": "question", "chosen": "good"}."""
    if not spec:
        return {}
    columns = {}
    for item in spec.split(","):
        field, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not field or not column:
            raise InputError(f"--columns {spec!r}: expected FIELD=COLUMN,..., e.g. prompt=question,chosen=good")
        if field not in FIELDS:
            raise InputError(f"--columns {item.strip()}: {field!r} is not a field; fields are {', '.join(FIELDS)}")
        if field in columns:
            raise InputError(f"--columns {spec!r}: field {field!r} is given twice ({field}={columns[field]} and "
                             f"{field}={column}); give each field once")
        columns[field] = column
    return columns


def check_columns_for_kind(columns, kind, name_kind):
    """Refuse a --columns field that data of `kind` does not have (it would be silently ignored)."""
    if kind not in KIND_FIELDS:
        return
    known = (*KIND_FIELDS[kind], *OPTIONAL_FIELDS.get(kind, ()))
    for field, column in columns.items():
        if field not in known:
            raise InputError(f"--columns {field}={column}: {name_kind} is {kind} data, which has no field {field!r}; "
                             f"its fields are {', '.join(known)}")


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
    split_names = {}  # our split -> the data's name for it (--data_split_names)
    columns = {}  # our field -> the data's column (--columns)

    def __init__(self, name, path, kind=None):
        self.name = name
        self.path = path
        self.kind = kind or self.kind
        if self.kind not in KIND_FIELDS:
            raise InputError(f"dataset {name!r}: unknown kind {self.kind!r}; standard kinds are {', '.join(KINDS)}")

    def split_name(self, split):
        return self.split_names.get(split, split)

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

    def get_optional(self, sample, field):
        """An optional field of a sample (OPTIONAL_FIELDS), or None when it has none."""
        return sample.get(field) if isinstance(sample, dict) else None

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
            if self.columns and isinstance(sample, dict):
                sample = self.map_columns(sample, source, index)
            record = {}
            for field in KIND_FIELDS[self.kind]:
                try:
                    record[field] = getattr(self, f"get_{field}")(sample)
                except (KeyError, IndexError, TypeError):
                    raise InputError(f"{where(source, index, field)}: missing field") from None
            for field in OPTIONAL_FIELDS.get(self.kind, ()):
                value = self.get_optional(sample, field)
                if value is not None:
                    record[field] = value
            validate_record(record, self.kind, source, index)
            out.append(record)
        if not out:
            raise InputError(f"{source}: no records")
        check_one_format(out, self.kind, source)
        return out

    def map_columns(self, sample, source, index):
        """`sample` with its --columns renamed to our field names."""
        renamed = dict(sample)
        for field, column in self.columns.items():
            if field not in KIND_FIELDS[self.kind]:
                continue
            if column not in sample:
                raise InputError(f"{where(source, index)}: no column {column!r} (--columns {field}={column}); "
                                 f"its columns are {', '.join(map(str, sample)) or 'none'}")
            renamed[field] = sample[column]
        return renamed


def check_one_format(records, kind, source):
    """A dataset is all text or all conversational: its records must tokenise by one rule."""
    if kind not in COMPLETION_FIELDS:
        return
    first = is_conversation(records[0]["prompt"])
    for index, record in enumerate(records):
        if is_conversation(record["prompt"]) != first:
            shape = "a list of messages" if not first else "text"
            raise InputError(f"{where(source, index, 'prompt')}: {shape}, but record 0's prompt is not; a dataset's "
                             "records are all text or all conversational")


def validate_record(record, kind, source, index):
    """Check one standard record's field types and values; raise InputError naming the field.
    A conversational record is normalised (utils/data/chat.py)."""
    conversational = kind in COMPLETION_FIELDS and is_conversation(record["prompt"])
    if conversational:
        normalise_conversation(record, kind, source, index)
    for field, expected in KIND_FIELDS[kind].items():
        if conversational and (field == "prompt" or field in COMPLETION_FIELDS[kind]):
            continue  # checked as messages
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
        for j, completion in enumerate([] if conversational else completions):
            if not isinstance(completion, str):
                raise InputError(f"{at}[{j}]: expected str, got {type(completion).__name__}")
            # a sample that drew the stop token first is a legal empty completion: its ids say so
            if completion == "" and "completion_ids" not in record:
                raise InputError(f"{at}[{j}]: empty completion; drop it or fill it in")
        validate_token_fields(record, source, index)
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


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def validate_token_fields(record, source, index):
    """The optional TOKEN_FIELDS of a gen/rw record: one entry per completion, ids non-negative
    integers, a stop token that is the last id. (That the ids are in the vocabulary is checked
    where the tokenizer is known, utils.data.encoders.Encoder.)"""
    num = len(record["completions"])
    for field in ("tokenizer_fingerprint", "source_model"):
        if field in record and not isinstance(record[field], str):
            raise InputError(f"{where(source, index, field)}: expected str, got {type(record[field]).__name__}")
    if "completion_ids" in record and "tokenizer_fingerprint" not in record:
        raise InputError(f"{where(source, index, 'tokenizer_fingerprint')}: missing field; completion_ids need the "
                         "fingerprint of the tokenizer they come from")
    for field in ("completion_ids", "stop_token"):
        if field in record and (not isinstance(record[field], list) or len(record[field]) != num):
            got = f"{len(record[field])} entries" if isinstance(record[field], list) else type(record[field]).__name__
            raise InputError(f"{where(source, index, field)}: expected a list of one entry per completion "
                             f"({num}), got {got}")
    for j, ids in enumerate(record.get("completion_ids", ())):
        at = f"{where(source, index, 'completion_ids')}[{j}]"
        if not isinstance(ids, list) or not ids:
            raise InputError(f"{at}: expected a non-empty list of token ids")
        bad = next((i for i in ids if not _is_int(i) or i < 0), None)
        if bad is not None:
            raise InputError(f"{at}: expected non-negative integer token ids, got {bad!r:.40}")
    for j, stop in enumerate(record.get("stop_token", ())):
        at = f"{where(source, index, 'stop_token')}[{j}]"
        if stop is not None and (not _is_int(stop) or stop < 0):
            raise InputError(f"{at}: expected a token id or null, got {stop!r:.40}")
        if stop is not None and "completion_ids" in record and record["completion_ids"][j][-1] != stop:
            raise InputError(f"{at}: {stop} is not the last of completion_ids[{j}]; the stop token is part "
                             "of the sampled ids")


def token_fields(record):
    """The TOKEN_FIELDS a record carries, to pass on into the records made from it."""
    return {field: record[field] for field in TOKEN_FIELDS if record.get(field) is not None}


class MissingSplit(InputError):
    """No file or folder holds the split asked for."""


class JsonDataset(PromptRawDataset):
    """Standard records of the files users have, one split at a time:

    - `PATH/SPLIT.json` (a JSON list), `.jsonl` (one record a line) or `.parquet`;
    - a `datasets` `save_to_disk` folder: PATH itself (a DatasetDict) or `PATH/SPLIT`;
    - `datasets.load_dataset(PATH, split=SPLIT)`: a Hub dataset id such as
      `HuggingFaceH4/ultrafeedback_binarized`, or a local directory laid out like a Hub
      repository (a README.md with its configs, or a `data/` folder) and none of the above.

    SPLIT is `train` / `test` or what --data_split_names calls them.
    """

    def locate(self, split):
        """('file', path) | ('disk', folder) | ('hub', PATH) for `split`; InputError when none."""
        name, path = self.split_name(split), self.path
        files = [os.path.join(path, name + ext) for ext in SPLIT_FILE_EXTENSIONS
                 if os.path.isfile(os.path.join(path, name + ext))]
        if len(files) > 1:
            raise InputError(f"{path}: holds {' and '.join(os.path.basename(f) for f in files)}; keep one file per "
                             "split, so that what is trained on is not a guess")
        if files:
            return "file", files[0]
        folder = os.path.join(path, name)
        if os.path.isfile(os.path.join(folder, "state.json")):
            return "disk", folder
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            return "disk", path
        if (os.path.isdir(path) and (os.path.isfile(os.path.join(path, "README.md"))
                                     or os.path.isdir(os.path.join(path, "data")))) \
                or (not os.path.exists(path) and not path.startswith((".", "~")) and HUB_ID.match(path)):
            return "hub", path
        raise MissingSplit(
            f"{path}: no {name}.json, {name}.jsonl, {name}.parquet or save_to_disk folder for dataset "
            f"{self.name}/{self.kind}; check the path in --data_name_path (or --data_split_names)")

    def split_file(self, split):
        return self.locate(split)[1]

    def source(self, split):
        where_from, path = self.locate(split)
        return path if where_from == "file" else f"{path} ({self.split_name(split)})"

    def data_files(self, split):
        where_from, path = self.locate(split)
        if where_from == "file":
            return [path]
        if where_from == "disk":
            folder = path if os.path.isfile(os.path.join(path, "state.json")) else \
                os.path.join(path, self.split_name(split))
            return sorted(os.path.join(folder, f) for f in os.listdir(folder) if not f.startswith("."))
        return []  # a Hub dataset: the cache is keyed on its records

    def load_split(self, split):
        where_from, path = self.locate(split)
        name = self.split_name(split)
        if where_from == "file" and path.endswith(".parquet"):
            return self._checked_columns(_read_parquet(path), path)
        if where_from == "file":
            return read_json_records(path)
        import datasets
        try:
            if where_from == "disk":
                loaded = datasets.load_from_disk(path)
                if isinstance(loaded, datasets.DatasetDict):
                    if name not in loaded:
                        raise InputError(f"{path}: no split {name!r} (it has {', '.join(loaded)}); "
                                         "name them with --data_split_names")
                    loaded = loaded[name]
            else:
                loaded = datasets.load_dataset(path, split=name)
        except InputError:
            raise
        except Exception as err:  # datasets raises many kinds; one line says which
            while err.__cause__ is not None:  # "An error occurred while generating the dataset" wraps the why
                err = err.__cause__
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            what = "" if os.path.exists(path) else "no such local directory, and as a Hub dataset id "
            raise InputError(f"{path}: {what}cannot load split {name!r} with datasets.load_dataset ({reason}); "
                             "check the path, --data_split_names and that the dataset is downloaded or reachable") \
                from None
        return self._checked_columns(loaded.to_list(), self.source(split), loaded.column_names)

    def _checked_columns(self, samples, source, column_names=None):
        """Fail before any record when --columns names a column the data lacks."""
        column_names = column_names if column_names is not None else (list(samples[0]) if samples else [])
        for field, column in self.columns.items():
            if field in KIND_FIELDS[self.kind] and column not in column_names:
                raise InputError(f"{source}: no column {column!r} (--columns {field}={column}); "
                                 f"its columns are {', '.join(column_names)}")
        return samples


def _read_parquet(path):
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except Exception as err:  # pyarrow's ArrowInvalid, OSError, ...
        raise InputError(f"{path}: cannot read as parquet ({str(err).strip().splitlines()[0]})") from None


def resolve_dataset(name_kind, path):
    """The dataset for `NAME[/KIND]` at `path`: a registered class or the standard one
    (dataset_names.get_raw_dataset is the place to add one by hand)."""
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
