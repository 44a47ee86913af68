"""Convert `pref` data to `rw` data: DIR/{train,test}.{json,jsonl,parquet} -> DIR_p2r/{train,test}.json.

Each {prompt, chosen, rejected} becomes {prompt, completions: [chosen, rejected],
rewards: [1, 0]}, so preference data can be trained with the -rw losses (with a small
beta_r, softmax(r / beta_r) approaches the one-hot preference). A conversational record stays
one: its prompt messages, and its answers as assistant messages.

    python src/utils/data/pref_to_rw.py data/hh_pref        # writes data/hh_pref_p2r
"""
import argparse
import importlib
import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script (`python src/utils/data/pref_to_rw.py`): make it the package module it is,
    # so its relative imports resolve (PEP 366).
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # src/
    __package__ = "utils.data"
    importlib.import_module(__package__)

from .raw_datasets import SPLITS, JsonDataset  # noqa: E402
from ..fileio import InputError, atomic_dir, atomic_write_json, cli_main, commit_dir  # noqa: E402


def pref_to_rw(records):
    return [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]], "rewards": [1.0, 0.0]}
            for r in records]


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", help="directory with pref records in train and test .json, .jsonl or .parquet "
                                         "(or a save_to_disk folder)")
    parser.add_argument("--output_dir", default=None, help="where to write rw data (default: DATA_DIR_p2r)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data_dir):
        raise InputError(f"{args.data_dir}: no such directory")
    output_dir = args.output_dir or args.data_dir.rstrip("/") + "_p2r"
    source = JsonDataset(os.path.basename(args.data_dir.rstrip("/")), args.data_dir, "pref")
    converted = {split: pref_to_rw(source.records(split)) for split in SPLITS}  # validate all first
    tmp = atomic_dir(output_dir)
    for split, records in converted.items():
        atomic_write_json(os.path.join(tmp, f"{split}.json"), records)
    commit_dir(tmp, output_dir)
    print(f"wrote {', '.join(f'{len(r)} {s}' for s, r in converted.items())} rw records to {output_dir}")


if __name__ == "__main__":
    main()
