"""What a result was made from, and whether it is still that: one rule for every reuse.

Every output that a later run may reuse instead of redoing it (a driver's stage, a tokenised
cache entry, the cached reference log-probs, a resumable checkpoint, an HF export) is reused
only when a record written beside it when it was finished says it was made from exactly the
inputs the current run would make it from, and its files are still the ones it wrote. Both
are checked when the result is about to be reused, from the files themselves, so nothing an
earlier run did or did not do (a stage redone under fewer `--rounds`, a model retrained in
place, a checkpoint cut short by a full disk) can make a stale or damaged result look done.

Digests. A file's digest is its size and an xxh3-128 hash: of the whole file up to
WHOLE_FILE_LIMIT bytes, and beyond it of SAMPLED_BLOCKS blocks of BLOCK bytes spread evenly over
the file, the last one included. Hashing costs ~0.1 s/GB from memory, so whole-file hashing
is only I/O, but a 70B run's resumable checkpoint (weights and Adam states, ~1 TB) would cost
minutes to read twice at resume; the sampled digest reads at most 17 MiB per file, whatever
its size, so verifying one is seconds. It catches what damages checkpoints in practice (a
file cut short or grown: the size; a partial copy, a block zeroed or overwritten: each sampled
block), not a single flipped bit between sampled blocks, which neither a copy nor a full disk
makes. Data files are small and hashed whole.

A record is JSON; one that cannot be read (a crash or a full disk while it was written) means
"not done": the result is redone, with one line saying why.
"""
import json
import os

import xxhash

RECORD_VERSION = 1
WHOLE_FILE_LIMIT = 64 << 20
BLOCK = 1 << 20
SAMPLED_BLOCKS = 16


def file_digest(path):
    """'SIZE:HASH' of one file (see the module docstring)."""
    size = os.path.getsize(path)
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: f.read(BLOCK), b""):
                digest.update(block)
        else:
            stride = (size - BLOCK) // SAMPLED_BLOCKS
            for i in range(SAMPLED_BLOCKS + 1):
                f.seek(min(i * stride, size - BLOCK))
                digest.update(f.read(BLOCK))
    return f"{size}:{digest.hexdigest()}"


def _visible_files(root):
    """Files under directory `root`, relative and sorted, leaving out hidden ones (temporary
    files of atomic writes, probes), logs (a launcher appends its console to a log beside the
    data it reads: a log is never an input) and the record itself."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and not name.endswith(".log") and name != RECORD_FILE:
                found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)


def file_digests(path):
    """{relative file: digest} of a directory, {"": digest} of a file; None if `path` is missing."""
    if os.path.isdir(path):
        return {name: file_digest(os.path.join(path, name)) for name in _visible_files(path)}
    if os.path.isfile(path):
        return {"": file_digest(path)}
    return None


def digest(path):
    """One hex string for a file or directory's contents (its files' names and digests);
    None if it is missing."""
    files = file_digests(path)
    if files is None:
        return None
    return xxhash.xxh3_128(json.dumps(files, sort_keys=True).encode()).hexdigest()


def fingerprint(value):
    """One hex string for any JSON value (settings, a list of digests)."""
    return xxhash.xxh3_128(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# -- records ---------------------------------------------------------------------------------
RECORD_FILE = "provenance.json"


class Unreadable(Exception):
    """A record that exists but cannot be read: its result counts as not done."""


def read_record(path):
    """The record at `path`; None if there is none; Unreadable if it is damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise Unreadable(f"{path}: unreadable record ({err})") from None
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        raise Unreadable(f"{path}: not a record of this version")
    return record


def write_record(path, made_from, outputs):
    """Record that `outputs` (paths) were made from `made_from` (JSON: settings and input
    digests), with the digests of their files now."""
    from .fileio import atomic_write_json

    atomic_write_json(path, {"version": RECORD_VERSION, "made_from": made_from,
                             "outputs": {str(p): file_digests(p) for p in outputs}})


def why_not_reusable(path, made_from, outputs=None):
    """None when the record at `path` says its outputs were made from `made_from` and they are
    unchanged (`outputs`, default those it recorded); else why not, in a few words."""
    try:
        record = read_record(path)
    except Unreadable as err:
        return str(err)
    if record is None:
        return "not done yet"
    if record["made_from"] != json.loads(json.dumps(made_from)):
        return _what_changed(record["made_from"], made_from)
    for output in [str(p) for p in outputs] if outputs is not None else record["outputs"]:
        recorded = record["outputs"].get(output)
        now = file_digests(output)
        if now != recorded:
            if now is None:
                return f"{output} is missing"
            changed = sorted(set(now) ^ set(recorded or {}) | {k for k in now if (recorded or {}).get(k) != now[k]})
            return f"{os.path.join(output, changed[0]) if changed[0] else output} changed since it was written"
    return None


def _what_changed(old, new, at=""):
    """'inputs.round2_align changed'-style: the first key whose value differs; a key that is a
    path goes in brackets ('inputs[/data/model] changed')."""
    new = json.loads(json.dumps(new))
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                if not at:
                    where = str(key)
                else:
                    where = f"{at}[{key}]" if "/" in str(key) else f"{at}.{key}"
                return _what_changed(old.get(key), new.get(key), where)
    return f"{at or 'its settings'} changed"


def verify_dir(directory):
    """Check the files of `directory` against the record in it (DIRECTORY/provenance.json,
    written by `record_dir`): None when they match or it has no record (older results), else
    what is wrong, in a few words."""
    try:
        record = read_record(os.path.join(directory, RECORD_FILE))
    except Unreadable as err:
        return str(err)
    if record is None:
        return None
    now = file_digests(directory) or {}
    for name, recorded in sorted(record["files"].items()):
        if name not in now:
            return f"{os.path.join(directory, name)} is missing"
        if now[name] != recorded:  # files added since (a later export's log) damage nothing recorded
            size, actual = recorded.split(":")[0], now[name].split(":")[0]
            detail = f"{actual} bytes, written with {size}" if size != actual else "its contents differ"
            return f"{os.path.join(directory, name)} is damaged ({detail})"
    return None


def record_dir(directory, made_from=None):
    """Write DIRECTORY/provenance.json with the digests of its files (a checkpoint, an export,
    a cache entry), to be checked with `verify_dir` before it is read. Paths are relative, so
    the directory may be renamed into place (or copied, or its files moved into another)
    afterwards."""
    from .fileio import atomic_write_json

    atomic_write_json(os.path.join(directory, RECORD_FILE),
                      {"version": RECORD_VERSION, "made_from": made_from, "files": file_digests(directory)})


def verified(directory, what):
    """Raise InputError (one line) unless `directory`'s files are the ones its record names."""
    from .fileio import InputError

    problem = verify_dir(directory)
    if problem:
        raise InputError(f"{what} {directory}: {problem}; it cannot be read as written")
