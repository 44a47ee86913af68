"""User-facing errors, JSON/JSONL reading with precise locations, and atomic writes.

A bad input must end a run with one line that names the file, the record and the field,
exit code 2 and no traceback; everything a stage writes appears whole or not at all.
"""
import contextlib
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import time

INPUT_ERROR_EXIT_CODE = 2
STOPPED_EXIT_CODE = 1


class InputError(Exception):
    """A problem with the user's data, flags or paths: reported as one line, never a traceback."""


class TrainingStopped(Exception):
    """A run that cannot usefully go on (e.g. its loss keeps diverging), stopped on purpose after
    writing what is needed to continue: one line and exit code 1, never a traceback."""


def where(path, record=None, field=None):
    """'file.json record 3 field "rewards"' — the location prefix of every data error."""
    text = str(path)
    if record is not None:
        text += f" record {record}"
    if field is not None:
        text += f' field "{field}"'
    return text


# How long a rank other than 0 holds back its error line. Input errors are mostly the same on
# every rank (same flags, same data), and the launcher stops the other ranks soon after rank 0
# fails (seconds; ~10 s on an overloaded machine), so the line is printed once. An error of one
# rank alone (a file missing on one node's disk) is still printed, this much later.
OTHER_RANKS_ERROR_DELAY_S = 30


def report_error(err, exit_code):
    """One `error:` line on stderr and `exit_code`; from rank 0 at once, from others after a delay."""
    if int(os.environ.get("RANK", "0")) != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's stop must end this wait, not be deferred
        time.sleep(OTHER_RANKS_ERROR_DELAY_S)
        print(f"error: [rank {os.environ['RANK']}] {err}", file=sys.stderr, flush=True)
    else:
        print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def cli_main(main):
    """Wrap a stage's main(): an InputError becomes one stderr line and exit code 2, a
    TrainingStopped one line and exit code 1 (once for all ranks: `report_error`)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as err:
            report_error(err, INPUT_ERROR_EXIT_CODE)
        except TrainingStopped as err:
            report_error(err, STOPPED_EXIT_CODE)

    return wrapper


def read_text(path):
    """The whole of a UTF-8 text file, or one InputError line saying why it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return text


def read_json_records(path):
    """Records of a `.json` file (one JSON list) or a `.jsonl` file (one object per line).

    Malformed JSON is reported with its line (and column); a record that is not an object
    with its index.
    """
    return parse_json_records(read_text(path), path, json_lines=str(path).endswith(".jsonl"))


def parse_json_records(text, path, json_lines):
    """The records in `text` (read from `path`, named in errors): one JSON object per line when
    `json_lines`, else one JSON list of objects."""
    if json_lines:
        records = []
        # split on "\n" only: str.splitlines() would also split inside JSON strings that hold
        # U+2028, U+2029 or U+0085 unescaped, which is valid JSON
        for line_no, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(f"{path} line {line_no}: malformed JSON ({err.msg} at column {err.colno})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{path} line {err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(records, list):
            raise InputError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{where(path, index)}: expected a JSON object, got {type(record).__name__}")
    return records


@contextlib.contextmanager
def atomic_file(path, suffix=".tmp"):
    """Yield a temporary path beside `path` to write; on success it is fsynced and renamed onto
    `path`, on any error removed. A run killed meanwhile leaves the old `path` (or none) and a
    hidden `.NAME.*.tmp` file that nothing reads."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result should not be
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path, obj, indent=1):
    """Write JSON to a temporary file in the same directory, fsync, then rename into place."""
    text = json.dumps(obj, ensure_ascii=False, indent=indent, allow_nan=False)  # fails before any file exists
    atomic_write_text(path, text)


def atomic_write_text(path, text):
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_dir(final_dir):
    """A fresh temporary sibling of `final_dir`; pass it to `commit_dir` once fully written."""
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final_dir)}.", suffix=".tmp")
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    return tmp


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def commit_dir(tmp_dir, final_dir):
    """Move a fully written directory into place, replacing an older one.

    The old directory is renamed aside first and removed only after the new one is in
    place, so a crash leaves a complete old or a complete new directory at `final_dir`.
    """
    old = None
    if os.path.exists(final_dir):
        old = f"{tmp_dir}.old"
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def commit_new_dir(tmp_dir, final_dir):
    """Move a fully written directory into place unless another process (another node's
    builder of the same cache entry) got there first: then its equal copy stays and ours goes."""
    try:
        os.replace(tmp_dir, final_dir)
    except OSError:
        if not os.path.isdir(final_dir):
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)


def commit_files(tmp_dir, final_dir):
    """Move each file of a fully written directory into `final_dir`, one atomic rename each,
    leaving whatever else `final_dir` holds (such as checkpoint subdirectories) in place."""
    os.makedirs(final_dir, exist_ok=True)
    for name in sorted(os.listdir(tmp_dir)):
        os.replace(os.path.join(tmp_dir, name), os.path.join(final_dir, name))
    os.rmdir(tmp_dir)
