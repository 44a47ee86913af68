"""What the recipe preprocessors (exp/*_exp/preproc*.py) share: reading exported JSON lines,
counting what they skip and why, and writing whole dataset directories atomically.

A preprocessor reads every input first; a bad record stops it with one `error:` line naming
the file, the record and the field (exit 2) before anything is written. Records it can drop
for a known reason (an empty answer, a quirk of the source data) are skipped and counted, and
the counts are printed with the reasons.
"""
import os
from collections import Counter

from .raw_datasets import validate_record
from ..fileio import InputError, atomic_dir, atomic_write_json, commit_dir, parse_json_records, read_text, where


def read_json_lines(path):
    """Records of a JSON-lines file, whatever its extension: `datasets`' `to_json` writes JSON
    lines into `.json` files too. A file that is one JSON list is read as such."""
    text = read_text(path)
    return parse_json_records(text, path, json_lines=not text.lstrip().startswith("["))


def field(record, path, index, *keys, kind=str, nullable=False):
    """record[k1][k2]... (a key or a list index each) checked to be of `kind` (None passes when `nullable`), or an InputError
    naming the file, the record and the dotted field."""
    value = record
    for depth, key in enumerate(keys):
        name = ".".join(map(str, keys[:depth + 1]))
        present = key in value if isinstance(value, dict) else (
            isinstance(value, list) and isinstance(key, int) and 0 <= key < len(value))
        if not present:
            raise InputError(f"{where(path, index, name)}: missing field")
        value = value[key]
    if value is None and nullable:
        return None
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InputError(f"{where(path, index, '.'.join(map(str, keys)))}: expected {expected}, "
                         f"got {type(value).__name__}")
    return value


class Skips:
    """Counts, by split and reason, of skipped records and of kept records that were fixed,
    printed as one line per reason."""

    def __init__(self):
        self.counts, self.fixes = Counter(), Counter()

    def add(self, split, reason):
        """A record of `split` dropped for `reason`."""
        self.counts[split, reason] += 1

    def fix(self, split, what):
        """A record of `split` kept after repairing `what`."""
        self.fixes[split, what] += 1

    def report(self, kept):
        """Print, per split, how many records were kept, how many skipped for each reason and
        how many were fixed."""
        for split in sorted({s for s, _ in self.counts + self.fixes} | set(kept)):
            skipped = {r: n for (s, r), n in sorted(self.counts.items()) if s == split}
            print(f"{split}: kept {kept.get(split, 0)}, skipped {sum(skipped.values())}")
            for reason, count in skipped.items():
                print(f"  skipped {count}: {reason}")
            for what, count in sorted((w, n) for (s, w), n in self.fixes.items() if s == split):
                print(f"  fixed {count}: {what}")


def write_datasets(outputs, kinds):
    """Write {directory: {split: records}} as DIRECTORY/SPLIT.json, each directory whole or
    not at all; every record is validated as its dataset kind (`kinds[directory]`) first."""
    for directory, splits in outputs.items():
        for split, records in splits.items():
            if not records:
                raise InputError(f"{directory}: no {split} records left after skipping; see the counts above")
            for index, record in enumerate(records):
                validate_record(record, kinds[directory], os.path.join(directory, f"{split}.json"), index)
    for directory, splits in outputs.items():
        tmp = atomic_dir(directory)
        for split, records in splits.items():
            atomic_write_json(os.path.join(tmp, f"{split}.json"), records)
        commit_dir(tmp, directory)
        print(f"wrote {', '.join(f'{len(r)} {s}' for s, r in splits.items())} records to {directory}")
